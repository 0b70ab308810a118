"""What a long-running service does once it has loaded everything."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (the model, the tokenizer, the imported
    modules: hundreds of thousands) out of the garbage collector's reach. They live as
    long as the process, and without this each full collection walks all of them again
    in the middle of some request's step."""
    gc.collect()
    gc.freeze()
