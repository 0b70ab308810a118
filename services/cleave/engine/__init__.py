"""The inference engine: nano-vllm's five roles (sequence, block manager, scheduler,
model runner, engine loop) plus sampling and an asyncio front for servers."""

from cleave.engine.outputs import RequestOutput
from cleave.engine.sampling_params import SamplingParams

__all__ = ["RequestOutput", "SamplingParams"]
