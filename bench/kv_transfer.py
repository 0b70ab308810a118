"""KV block transfer through the KV store against a raw loopback TCP stream, in one run.

    python bench/kv_transfer.py [--model smollm2-135m-instruct] [--blocks 256] [--repeats 9]

A real store process (``python -m cleave.kvstore``, standalone: no Redis) on a free port
of 127.0.0.1 receives N KV blocks from ``KVStoreClient.put_blocks`` in one stream and
sends them back to ``get_blocks``. The blocks are what prefill writes: ``KVBlock.to_bytes()``
of random ``[layers, 2, block_size, kv_heads, head_dim]`` tensors shaped by the model's
config, under chained prefix hashes rooted at its fingerprint. The baseline sends the
same bytes, cut into the same chunks, down one plain TCP connection to another process
that keeps them in newly allocated memory, as the store must, and acknowledges the last
byte. Sender and receiver are separate processes on both paths, so each side has its
own core. Figures are GB/s (1e9 bytes) of block bytes, and ratios store / raw."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def make_blocks(model: str, dtype: str, block_size: int, num_blocks: int, seed: int) -> tuple[list, tuple]:
    """``(hash, payload, token_ids)`` for ``num_blocks`` full blocks of one random prompt,
    and the block tensor's shape."""
    from cleave.engine.block_manager import hash_prefix_blocks
    from cleave.engine.kv_transfer import KVBlock
    from cleave.engine.llm_engine import model_fingerprint
    from cleave.models.config import ModelConfig
    from cleave.models.loader import DTYPES
    from cleave.modelzoo import registry

    model_dir = registry.resolve(model)
    config = ModelConfig.from_pretrained(model_dir)
    shape = (config.num_hidden_layers, 2, block_size, config.num_key_value_heads, config.head_dim)
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, config.vocab_size, (num_blocks * block_size,), generator=generator).tolist()
    hashes = hash_prefix_blocks(token_ids, block_size, model_fingerprint(model_dir, dtype, block_size))
    blocks = []
    for i, block_hash in enumerate(hashes):
        tokens = tuple(token_ids[i * block_size : (i + 1) * block_size])
        data = torch.randn(shape, generator=generator).to(DTYPES[dtype])
        blocks.append((block_hash, KVBlock(block_hash, tokens, data).to_bytes(), tokens))
    return blocks, shape


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_store(chunk_bytes: int, capacity_mb: float, log) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [
        sys.executable, "-m", "cleave.kvstore", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--redis-url", "", "--capacity-mb", str(capacity_mb), "--chunk-bytes", str(chunk_bytes),
    ]
    return subprocess.Popen(command, stdout=log, stderr=log), f"127.0.0.1:{port}"


async def wait_ready(client, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.stats(timeout=1)
            return
        except grpc.aio.AioRpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the kvstore process did not come up") from None
            await asyncio.sleep(0.05)


def _receive(conn, total_bytes: int) -> None:
    """The raw side's receiver: keep each round's ``total_bytes`` in new memory, as a
    store must, then answer one byte."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        conn.send(server.getsockname()[1])
        sock, _ = server.accept()
    with sock:
        while True:
            buffer = memoryview(bytearray(total_bytes))
            received = 0
            while received < total_bytes:
                n = sock.recv_into(buffer[received:])
                if n == 0:
                    return
                received += n
            sock.sendall(b"\x01")


def raw_round(sock: socket.socket, payloads: list[bytes], chunk_bytes: int) -> float:
    started = time.perf_counter()
    for payload in payloads:
        view = memoryview(payload)
        for offset in range(0, len(payload), chunk_bytes):
            sock.sendall(view[offset : offset + chunk_bytes])
    if sock.recv(1) != b"\x01":
        raise RuntimeError("the raw receiver went away")
    return time.perf_counter() - started


async def store_round(client, blocks: list) -> tuple[float, float]:
    """Seconds to put every block in one stream, then to get them all back."""
    hashes = [h for h, _, _ in blocks]
    started = time.perf_counter()
    result = await client.put_blocks([(h, data) for h, data, _ in blocks], token_ids={h: t for h, _, t in blocks})
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    got = await client.get_blocks(hashes)
    get_s = time.perf_counter() - started
    if result.stored_hashes != hashes or any(got.get(h) != data for h, data, _ in blocks):
        raise RuntimeError("the store did not give back the blocks it was given")
    return put_s, get_s


async def measure(args, blocks: list, total_bytes: int) -> list[tuple[float, float, float]]:
    """(raw, put, get) seconds for each repeat, interleaved."""
    from cleave.kvstore.client import KVStoreClient

    payloads = [data for _, data, _ in blocks]
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    receiver = context.Process(target=_receive, args=(child, total_bytes), daemon=True)
    receiver.start()
    capacity_mb = 2 * total_bytes / 2**20 + 64
    with tempfile.TemporaryFile() as log:
        proc, address = start_store(args.chunk_bytes, capacity_mb, log)
        try:
            with socket.create_connection(("127.0.0.1", parent.recv()), timeout=60) as sock:
                async with KVStoreClient(address, chunk_bytes=args.chunk_bytes) as client:
                    await wait_ready(client, proc)
                    await store_round(client, blocks[:8])  # warm-up
                    raw_round(sock, payloads, args.chunk_bytes)
                    runs = []
                    for _ in range(args.repeats):
                        # Interleaved: a busy neighbour slows whichever path runs at that moment.
                        raw_s = raw_round(sock, payloads, args.chunk_bytes)
                        put_s, get_s = await store_round(client, blocks)
                        runs.append((raw_s, put_s, get_s))
                    return runs
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            receiver.join(timeout=10)
            if receiver.is_alive():
                receiver.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or folder giving the block shape")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--blocks", type=int, default=256, help="blocks per put and per get")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="chunk size on both sides and for the raw stream")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved runs per path; medians are reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    blocks, shape = make_blocks(args.model, args.dtype, args.block_size, args.blocks, args.seed)
    total_bytes = sum(len(data) for _, data, _ in blocks)
    runs = asyncio.run(measure(args, blocks, total_bytes))
    seconds = {name: statistics.median(run[i] for run in runs) for i, name in enumerate(("raw", "put", "get"))}
    gbps = {name: total_bytes / s / 1e9 for name, s in seconds.items()}
    block_bytes = len(blocks[0][1])
    print(f"{args.model}, {args.dtype}, blocks of {args.block_size} tokens: shape {list(shape)}, "
          f"{block_bytes} bytes each ({block_bytes / 2**10:.1f} KiB with header); {args.blocks} blocks = "
          f"{total_bytes / 2**20:.1f} MiB per transfer, chunks of {args.chunk_bytes} bytes, "
          f"median of {args.repeats} interleaved runs, {os.cpu_count()} cores")
    print(f"{'path':<28} | {'GB/s':>6} | {'ms':>7} | {'vs raw':>6}")
    labels = {"raw": "raw TCP, loopback", "put": "kvstore PutBlocks (put)", "get": "kvstore GetBlocks (get)"}
    for name in ("raw", "put", "get"):
        print(f"{labels[name]:<28} | {gbps[name]:>6.2f} | {seconds[name] * 1e3:>7.1f} | {gbps[name] / gbps['raw']:>5.2f}x")
    if args.json:
        print(json.dumps({"block_bytes": block_bytes, "total_bytes": total_bytes, "seconds": seconds, "gb_per_s": gbps,
                          "runs_seconds": [dict(zip(("raw", "put", "get"), run)) for run in runs]}))


if __name__ == "__main__":
    main()
