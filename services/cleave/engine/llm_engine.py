"""The engine loop: ``step`` = schedule, run the model, post-process."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from cleave.engine.block_manager import BlockManager, hash_prefix_blocks
from cleave.engine.config import EngineConfig
from cleave.engine.kv_transfer import KVBlock
from cleave.engine.model_runner import ModelRunner
from cleave.engine.outputs import RequestOutput
from cleave.engine.sampling_params import SamplingParams
from cleave.engine.scheduler import Scheduler
from cleave.engine.sequence import Sequence, SequenceStatus
from cleave.models.loader import DTYPES, load_model
from cleave.models.moe import ExpertBackend

log = logging.getLogger("cleave.engine")


def read_eos_token_ids(model_path: str | Path) -> set[int]:
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_path) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return ids


def model_fingerprint(model_path: str | Path, dtype: str, block_size: int) -> int:
    """Root of every block hash chain: KV blocks of different models, dtypes or block
    sizes must never be taken for one another in a shared store."""
    config = (Path(model_path) / "config.json").read_bytes()
    digest = hashlib.blake2b(config + f"|{dtype}|{block_size}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class LLMEngine:
    """``expert_backend``: where an MoE model's routed experts run (e.g. expert
    replicas); the model then holds none of their weights. Default: its own."""

    def __init__(self, config: EngineConfig, expert_backend: ExpertBackend | None = None) -> None:
        if not config.model:
            raise ValueError("EngineConfig.model: a model folder is required")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.model = load_model(config.model, config.dtype, config.device, expert_backend)
        model_config = self.model.config
        self.model_config = model_config
        self.eos_token_ids = read_eos_token_ids(config.model)
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        if self.max_model_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's {model_config.max_position_embeddings}"
            )
        dtype = DTYPES[config.dtype]
        num_blocks = config.num_kv_blocks or max(
            2, config.kv_cache_memory_mb * 2**20 // ModelRunner.kv_bytes_per_block(model_config, config.block_size, dtype)
        )
        self.root_hash = model_fingerprint(config.model, config.dtype, config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, self.root_hash)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, config.max_prefill_tokens_with_decode
        )
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, config.device, dtype)
        self.sequences: dict[str, Sequence] = {}
        self.num_generated_tokens = 0
        # Cumulative, for metrics: mean batch size = scheduled sequences / steps.
        self.num_steps = self.num_scheduled_seqs = self.num_scheduled_tokens = 0
        log.info("engine ready", extra={"model": config.model, "kv_blocks": num_blocks, "block_size": config.block_size})

    # -- requests ---------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, num_output_tokens: int = 0) -> None:
        """Raise ValueError with a user-facing message if the request can never run."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if not 0 <= num_output_tokens < len(prompt_token_ids) or num_output_tokens >= params.max_tokens:
            raise ValueError(
                f"num_output_tokens {num_output_tokens} must be below the token count and max_tokens {params.max_tokens}"
            )
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len}"
            )
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stop:
            raise ValueError(f"stop_token_ids out of the vocabulary: {bad_stop}")
        longest = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_for(longest) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt plus max_tokens needs {self.block_manager.blocks_for(longest)} KV blocks; "
                f"the pool has {self.block_manager.num_blocks}"
            )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, num_output_tokens: int = 0
    ) -> None:
        """Queue a request. ``num_output_tokens`` > 0 resumes one: the last that many of
        ``prompt_token_ids`` were generated already (by a prefill worker, or by a decode
        worker that died); generation continues exactly as if it had not been split."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already running")
        self.validate(prompt_token_ids, params, num_output_tokens)
        seq = Sequence(request_id, prompt_token_ids, params, num_output_tokens)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        return self._output(seq, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.num_steps += 1
        self.num_scheduled_seqs += len(batch)
        self.num_scheduled_tokens += sum(item.num_new_tokens for item in batch)
        sampled = self.runner.run(batch)
        outputs: list[RequestOutput] = []
        for item in batch:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(seq)
            if seq.request_id not in sampled:
                continue
            token, logprob = sampled[seq.request_id]
            seq.token_ids.append(token)
            self.num_generated_tokens += 1
            self._check_finished(seq, token)
            if seq.is_finished:
                self.scheduler.remove(seq)
                del self.sequences[seq.request_id]
            outputs.append(self._output(seq, [token], [] if logprob is None else [logprob]))
        return outputs

    def _check_finished(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        else:
            return
        seq.status = SequenceStatus.FINISHED

    def _output(self, seq: Sequence, tokens: list[int], logprobs: list[float]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion in one continuous batch; output token ids per prompt."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]

    # -- KV blocks in and out ------------------------------------------------------------
    def block_hashes(self, token_ids: list[int]) -> list[int]:
        return hash_prefix_blocks(token_ids, self.config.block_size, self.root_hash)

    def export_blocks(self, block_hashes: list[int]) -> list[KVBlock]:
        """The cached blocks among ``block_hashes``, in order, stopping at the first miss."""
        blocks: list[KVBlock] = []
        for block_hash in block_hashes:
            block_id = self.block_manager.lookup(block_hash)
            if block_id is None:
                break
            block = self.block_manager.blocks[block_id]
            blocks.append(KVBlock(block_hash, block.token_ids, self.runner.read_block(block_id)))
        return blocks

    def import_blocks(self, blocks: list[KVBlock]) -> int:
        """Put blocks computed elsewhere into the prefix cache; returns how many were new."""
        expected_shape = self.runner.block_shape
        imported = 0
        for block in blocks:
            if tuple(block.data.shape) != expected_shape:
                raise ValueError(f"KV block shape {tuple(block.data.shape)} does not fit this model {expected_shape}")
            if len(block.token_ids) != self.config.block_size:
                raise ValueError(f"a KV block holds {self.config.block_size} tokens, got {len(block.token_ids)}")
            block_id = self.block_manager.take_block_for_import(block.block_hash, block.token_ids)
            if block_id is not None:
                self.runner.write_block(block_id, block.data)
                imported += 1
        return imported

    def stats(self) -> dict[str, int | float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_kv_blocks": bm.num_blocks,
            "num_free_kv_blocks": bm.num_free_blocks,
            "num_used_kv_blocks": bm.num_blocks - bm.num_free_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.num_cache_queries,
            "prefix_cache_hits": bm.num_cache_hits,
            "num_generated_tokens": self.num_generated_tokens,
            "num_steps": self.num_steps,
            "num_scheduled_seqs": self.num_scheduled_seqs,
            "num_scheduled_tokens": self.num_scheduled_tokens,
        }
