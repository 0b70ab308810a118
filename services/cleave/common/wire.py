"""Engine types to and from their ``cleave.v1`` messages. Torch-free, so that the router
(which only relays) does not load the engine to speak to workers."""

from __future__ import annotations

import math
from collections.abc import Iterable

from cleave.engine.sampling_params import SamplingParams
from cleave.protogen.cleave.v1 import common_pb2, prefill_pb2

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Engine params from the wire; unset optional fields take the engine's defaults.
    Raises ValueError (a client error) for values the engine refuses."""
    defaults = SamplingParams()
    temperature = msg.temperature if msg.HasField("temperature") else defaults.temperature
    top_p = msg.top_p if msg.HasField("top_p") else defaults.top_p
    if not (math.isfinite(temperature) and math.isfinite(top_p)):
        raise ValueError("temperature and top_p must be finite")
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=msg.top_k,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else defaults.max_tokens,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
    )


def params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, max_tokens=params.max_tokens,
        stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos, logprobs=params.logprobs,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


# Trailing metadata naming why a worker failed a call, when the fault is not the
# worker's own: ``experts`` means the shared expert pool, which every worker uses, so
# the router answers 503 at once instead of trying another worker.
FAILURE_CAUSE_KEY = "x-cleave-failure-cause"


def collect_prefill(responses: Iterable[prefill_pb2.PrefillResponse]) -> prefill_pb2.PrefillResponse:
    """A whole ``Prefill`` stream as one ``PrefillResponse``, for callers that want the
    first token and the stored blocks together: the first message's fields with the
    last one's ``block_hashes``."""
    messages = list(responses)
    if not messages:
        raise ValueError("the Prefill stream ended without a message")
    merged = prefill_pb2.PrefillResponse()
    merged.CopyFrom(messages[0])
    if len(messages) > 1:
        merged.block_hashes[:] = messages[-1].block_hashes
    return merged
