"""A real-weight mixture-of-experts model made from a dense Llama folder.

Expert parallelism needs an MoE checkpoint whose output can be judged by eye, and
none can be downloaded here. Every layer's MLP becomes ``num_experts`` experts, each
the dense MLP with its weights scaled elementwise by ``1 + eps * noise``: the experts
differ (so routing mistakes change numbers a test can see) yet any convex mix of them
stays close to the dense MLP, so the text remains as coherent as the dense model's.
The result is a ``MixtralForCausalLM`` folder in the usual per-expert checkpoint
layout (``block_sparse_moe.experts.N.w1/w2/w3``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
# Mixtral's expert names: w1 gates, w3 projects up, w2 projects down.
_EXPERT_WEIGHTS = (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"cleave: {message}", file=sys.stderr, flush=True)


def mixtral_config(dense: dict, num_experts: int, top_k: int) -> dict:
    """The ``config.json`` of the MoE built from a dense Llama ``config.json``."""
    if dense.get("model_type") != "llama":
        raise ValueError(f"expected a llama model folder, got model_type {dense.get('model_type')!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
    rope_theta = dense.get("rope_theta") or dense.get("rope_parameters", {}).get("rope_theta", 10000.0)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": num_experts,
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
    }
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
                "rms_norm_eps", "vocab_size", "tie_word_embeddings", "initializer_range",
                "bos_token_id", "eos_token_id", "pad_token_id", "use_cache"):
        if key in dense:
            config[key] = dense[key]
    config["dtype"] = "float32"
    return config


def convert(
    dense_dir: str | Path,
    out_dir: str | Path,
    num_experts: int = 4,
    top_k: int = 2,
    eps: float = 1e-2,
    router_std: float = 0.5,
    seed: int = 0,
    progress: Progress | None = _stderr,
) -> Path:
    """Write a Mixtral folder into ``out_dir`` built from the dense Llama folder
    ``dense_dir``; the same arguments give byte-identical weights.

    ``router_std`` is the scale of the random router weights. It is set so that
    the top-k choice is rarely a near tie: ties would let an engine and a
    reference disagree on rounding alone, while any choice keeps the text coherent.
    """
    from safetensors import safe_open
    from safetensors.numpy import save_file

    say = progress or (lambda message: None)
    dense_path, out = Path(dense_dir), Path(out_dir)
    dense_config = json.loads((dense_path / "config.json").read_text(encoding="utf-8"))
    config = mixtral_config(dense_config, num_experts, top_k)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    say(f"splitting {config['num_hidden_layers']} dense MLPs into {num_experts} experts each (top-{top_k})")
    with safe_open(str(dense_path / "model.safetensors"), framework="numpy") as dense:
        names = sorted(dense.keys())
        for name in names:
            if ".mlp." not in name:
                tensors[name] = dense.get_tensor(name).astype(np.float32, copy=False)
        for layer in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}"
            moe = f"{prefix}.block_sparse_moe"
            mlp = {hf: dense.get_tensor(f"{prefix}.mlp.{hf}.weight").astype(np.float32) for _, hf in _EXPERT_WEIGHTS}
            # Router first, then experts in order: the draw order fixes the bytes.
            tensors[f"{moe}.gate.weight"] = (
                router_std * rng.standard_normal((num_experts, config["hidden_size"]), dtype=np.float32)
            )
            for expert in range(num_experts):
                for mixtral_name, hf in _EXPERT_WEIGHTS:
                    weights = mlp[hf]
                    noise = rng.standard_normal(weights.shape, dtype=np.float32)
                    noise *= np.float32(eps)
                    noise += np.float32(1.0)
                    noise *= weights
                    tensors[f"{moe}.experts.{expert}.{mixtral_name}.weight"] = noise
    leftover = [n for n in names if ".mlp." in n and not any(f".mlp.{hf}." in n for _, hf in _EXPERT_WEIGHTS)]
    if leftover:
        raise ValueError(f"dense MLP tensors this conversion does not understand: {leftover[:3]}")
    say(f"writing {sum(t.size for t in tensors.values()) / 1e6:.0f}M parameters")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in _COPIED_FILES:
        if (dense_path / name).is_file():
            shutil.copyfile(dense_path / name, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    say(f"built MoE in {time.monotonic() - started:.1f}s")
    return out
