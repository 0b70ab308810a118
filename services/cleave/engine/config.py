from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EngineConfig:
    """Engine settings; field names are also flags (``--block-size``), environment
    variables (``CLEAVE_BLOCK_SIZE``) and Helm values (``blockSize``)."""

    model: str = field(default="", metadata={"help": "path to a Hugging Face model folder"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:1"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_kv_blocks: int = field(default=0, metadata={"help": "KV blocks in the pool; 0 sizes it from kv_cache_memory_mb"})
    kv_cache_memory_mb: int = field(default=512, metadata={"help": "memory for the KV pool when num_kv_blocks is 0"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one batch"})
    max_num_batched_tokens: int = field(default=1024, metadata={"help": "token budget of one step (chunked prefill)"})
    max_prefill_tokens_with_decode: int = field(default=0, metadata={
        "help": "most prompt tokens computed in a step that also decodes (bounds the stall every running "
                "request's next token waits for); 0: up to max_num_batched_tokens"})
    max_model_len: int = field(default=0, metadata={"help": "longest prompt+output; 0 takes the model's own limit"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of shared prefixes"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 leaves torch's default"})

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_prefill_tokens_with_decode < 0:
            raise ValueError("max_prefill_tokens_with_decode must be >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
