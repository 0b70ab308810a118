"""KV blocks as bytes: what prefill writes to the KV store and decode reads back.

Wire format of one block: a JSON header (hash, token ids, dtype, shape) behind a
4-byte length, then the raw tensor ``[layers, 2, block_size, kv_heads, head_dim]``."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import torch

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class KVBlock:
    block_hash: int
    token_ids: tuple[int, ...]
    data: torch.Tensor  # [layers, 2, block_size, kv_heads, head_dim], on the CPU

    def to_bytes(self) -> bytes:
        dtype = str(self.data.dtype).removeprefix("torch.")
        header = json.dumps(
            {"v": FORMAT_VERSION, "hash": self.block_hash, "tokens": list(self.token_ids), "dtype": dtype,
             "shape": list(self.data.shape)}
        ).encode()
        raw = self.data.contiguous().view(torch.uint8).numpy().tobytes()
        return struct.pack("<I", len(header)) + header + raw

    @classmethod
    def from_bytes(cls, payload: bytes) -> "KVBlock":
        if len(payload) < 4:
            raise ValueError("KV block payload is truncated")
        (header_len,) = struct.unpack_from("<I", payload)
        try:
            header = json.loads(payload[4 : 4 + header_len])
        except ValueError as exc:
            raise ValueError(f"KV block header is not valid JSON: {exc}") from None
        if header.get("v") != FORMAT_VERSION:
            raise ValueError(f"KV block format version {header.get('v')} is not {FORMAT_VERSION}")
        dtype = _DTYPES.get(header["dtype"])
        if dtype is None:
            raise ValueError(f"KV block dtype {header['dtype']!r} is not supported")
        raw = payload[4 + header_len :]
        expected = int(np.prod(header["shape"])) * dtype.itemsize
        if len(raw) != expected:
            raise ValueError(f"KV block carries {len(raw)} bytes, its header promises {expected}")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(header["shape"])
        return cls(header["hash"], tuple(header["tokens"]), data)
