"""Seeded tiny random checkpoints, one per model family the engine supports.

They exist so that tests can compare the engine with ``transformers`` token for token
in seconds on a laptop CPU. Random weights at the usual 0.02 init give near-uniform
logits, where greedy decoding hinges on differences of 1e-6 and any reordering of a
float sum flips tokens; the init here is scaled so that logits spread over several
units and routers pick experts by clear margins.

``transformers`` is needed to build them (its config classes and ``save_pretrained``
define the on-disk format) but not to serve them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FAMILIES = ("llama", "qwen2", "mixtral", "qwen2_moe")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 512
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with an optional tool list, so that templates exercise tojson,
# raise_exception and trimming the way real model templates do.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these tools:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the byte-level BPE: plain prose, numbers, punctuation and code,
# so that merges cover the kinds of strings tests send.
CORPUS = """\
The river ran quietly past the old mill, where the miller's daughter kept a ledger of
every sack of grain. In the spring of 1887 the water rose higher than anyone could
remember, and the wheel turned so fast that the stones sang. People came from the
villages to watch; some brought bread, others brought questions.

A language model reads a sequence of tokens and predicts the next one. Serving many
users at once means batching requests, caching keys and values for attention, and
scheduling prefill and decode so that the accelerator stays busy. Latency matters:
time to first token, time per output token, and the tail of the distribution.

Once upon a time, a small robot named Pip wanted to learn how to paint. It mixed
blue and yellow and found green; it mixed red and white and found pink. "Colors are
like words," said Pip, "you combine them and they mean something new!"

What is the capital of France? The capital of France is Paris. What is the capital
of Japan? The capital of Japan is Tokyo. Two plus two is four, and ten times ten is
one hundred. The temperature today is 21.5 degrees, with a chance of rain at 3 pm.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]

for index, value in enumerate(fibonacci(10)):
    print(f"{index}: {value}")

class Cache:
    def __init__(self, capacity):
        self.capacity = capacity
        self.blocks = {}

    def get(self, key):
        return self.blocks.get(key)

{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}

SELECT name, count(*) FROM requests WHERE status = 'ok' GROUP BY name ORDER BY 2 DESC;

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
Whether the weather is warm or cold, we will weather the weather, whatever the weather.
Les élèves étudient à l'école. Der Fluß ist schön. El niño comió una manzana. 東京は大きい。
"""

_DENSE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=2048, hidden_act="silu")

# tiny-mixtral with heads of 64: vLLM 0.32's CPU attention has no kernel for head_dim 16
# ("Unsupported CPU attention configuration: head_dim=16"), so the peer benchmark
# (bench/peer_vllm.py) needs a checkpoint both engines can serve.
MIXTRAL_HD64 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    intermediate_size=256)


def _require_transformers():
    try:
        import transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "building tiny models needs the test extras (transformers); "
            "install them with `make install-test` or `pip install -e .[test]`"
        ) from exc
    return transformers


def build_tokenizer(out_dir: str | Path) -> dict[str, int]:
    """Train the shared byte-level BPE on :data:`CORPUS` and write ``tokenizer.json``
    and ``tokenizer_config.json`` into ``out_dir``; returns the special token ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Qwen2's pipeline (NFC, its split regex, byte-level without a regex): the one
    # transformers' Qwen2Tokenizer rebuilds regardless of tokenizer.json, so every
    # family's folder tokenizes the same under transformers and under cleave.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _DENSE["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    return ids


def _config(family: str, vocab_size: int, ids: dict[str, int], dims: dict):
    transformers = _require_transformers()
    common = dict(
        _DENSE,
        vocab_size=vocab_size,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rms_norm_eps=1e-6,
    )
    if family == "llama":
        return transformers.LlamaConfig(**{**common, "intermediate_size": 128, **dims}, tie_word_embeddings=True,
                                        rope_theta=10000.0)
    if family == "qwen2":
        return transformers.Qwen2Config(**{**common, "intermediate_size": 128, **dims}, tie_word_embeddings=False,
                                        rope_theta=1_000_000.0, use_sliding_window=False)
    if family == "mixtral":
        return transformers.MixtralConfig(**{**common, "intermediate_size": 64, **dims}, num_local_experts=8,
                                          num_experts_per_tok=2, tie_word_embeddings=False,
                                          rope_theta=10000.0, sliding_window=None)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **{**common, "intermediate_size": 128, "moe_intermediate_size": 32,
               "shared_expert_intermediate_size": 64, **dims},
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
            mlp_only_layers=[], tie_word_embeddings=False, rope_theta=1_000_000.0, use_sliding_window=False,
        )
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


def _init_weights(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "norm" in name and param.dim() == 1:
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            elif name.endswith("bias"):
                value = 0.1 * torch.randn(param.shape, generator=generator)
            elif "embed_tokens" in name or "lm_head" in name:
                # Logits then spread over a unit or two: greedy picks are clear, yet
                # sampling still has more than one plausible token. Tied models get
                # less, as a token's own embedding would otherwise win its own logit
                # and greedy output would repeat the input.
                std = 0.15 if tied else 0.3
                value = std * torch.randn(param.shape, generator=generator)
            elif any(key in name for key in _RESIDUAL_WRITERS):
                # Layers must outweigh the embedding in the residual stream for
                # the same reason.
                value = 2.0 * torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1])
            else:
                # Variance-preserving, so activations neither vanish nor blow up
                # and router logits differ by order one.
                value = torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1])
            param.copy_(value.to(param.dtype))


def build(family: str, out_dir: str | Path, seed: int = 0, **dims) -> Path:
    """Write a tiny ``family`` checkpoint (config, safetensors weights, tokenizer and
    generation config) into ``out_dir``; ``dims`` override its sizes (hidden_size,
    head_dim, intermediate_size, ...: e.g. :data:`MIXTRAL_HD64`). The same seed and
    sizes give byte-identical files."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    transformers = _require_transformers()
    import torch

    out = Path(out_dir)
    ids = build_tokenizer(out)
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    config = _config(family, vocab_size, ids, dims)
    config.architectures = [_ARCHITECTURES[family]]
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = getattr(transformers, _ARCHITECTURES[family])(config).to(torch.float32)
    _init_weights(model, seed)
    model.eval()
    model.save_pretrained(out)
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    _write_json(out / "generation_config.json", generation)
    return out


_RESIDUAL_WRITERS = ("o_proj", "down_proj")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
