"""torch tensors to and from ``cleave.v1.Tensor`` (raw little-endian bytes, row-major)."""

from __future__ import annotations

import sys

import torch

from cleave.protogen.cleave.v1 import common_pb2

DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ITEMSIZES = {dtype: dtype.itemsize for dtype in DTYPES.values()}
assert sys.byteorder == "little", "the wire format is little-endian"


class WireError(ValueError):
    """A Tensor message that does not describe a tensor."""


def to_proto(tensor: torch.Tensor) -> common_pb2.Tensor:
    # As few tensor ops as can be: a decode step's call carries a few rows, and every op
    # costs more than copying them.
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    raw = tensor.view(torch.uint8) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    return common_pb2.Tensor(data=raw.numpy().tobytes(), shape=tensor.shape, dtype=DTYPE_NAMES[tensor.dtype])


def from_proto(message: common_pb2.Tensor, what: str) -> torch.Tensor:
    """The tensor of ``message``; raises :class:`WireError` naming ``what`` when the
    dtype is unknown or the bytes do not match the shape."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise WireError(f"{what}: unknown dtype {message.dtype!r} (one of {', '.join(DTYPES)})")
    shape = list(message.shape)
    if any(size < 0 for size in shape):
        raise WireError(f"{what}: negative size in shape {shape}")
    numel = 1
    for size in shape:
        numel *= size
    expected = numel * ITEMSIZES[dtype]
    if len(message.data) != expected:
        raise WireError(f"{what}: {len(message.data)} bytes for shape {shape} of {message.dtype} ({expected} expected)")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # A bytearray copy: torch wants a writable buffer, and the message's bytes are not.
    return torch.frombuffer(bytearray(message.data), dtype=dtype).view(shape)
