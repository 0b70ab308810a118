"""The offline model zoo: GGUF conversion, MoE from dense, tiny checkpoints, registry, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cleave.models.tokenizer import Tokenizer
from cleave.modelzoo import cli, gguf_convert, moe_from_dense, registry, tiny

transformers = pytest.importorskip("transformers")

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@torch.inference_mode()
def _greedy(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


# -- SmolLM2 from GGUF ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return gguf_convert.find_smollm2_gguf()


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_config_matches_gguf_metadata_and_transformers_reading(smollm2_dir, gguf_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours = json.loads((smollm2_dir / "config.json").read_text())
    ref = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert ours[key] == ref[key], key
    assert ours["rope_theta"] == pytest.approx(ref["rope_theta"])
    assert ours["rms_norm_eps"] == pytest.approx(ref["rms_norm_eps"], rel=1e-6)
    assert ours["architectures"] == ["LlamaForCausalLM"]
    # SmolLM2-135M: 30 layers of 576 wide, 9 query and 3 KV heads, embeddings tied.
    assert (ours["num_hidden_layers"], ours["hidden_size"], ours["num_attention_heads"],
            ours["num_key_value_heads"], ours["tie_word_embeddings"]) == (30, 576, 9, 3, True)


def test_weights_equal_transformers_gguf_dequantization(smollm2_dir, gguf_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(smollm2_dir)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    ref = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(smollm2_dir / "model.safetensors")
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], tensor.to(torch.float32)), name


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, head_dim in ((9, 64), (3, 64), (4, 16)):
        hf = rng.standard_normal((n_head * head_dim, 32)).astype(np.float32)
        # convert_hf_to_gguf.py's permute, which llama.cpp applies to Q and K.
        gguf = hf.reshape(n_head, 2, head_dim // 2, 32).swapaxes(1, 2).reshape(hf.shape)
        assert not np.array_equal(gguf, hf)
        assert np.array_equal(gguf_convert._unpermute(gguf, n_head), hf)


def test_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert gguf_convert._bytes_to_unicode() == bytes_to_unicode()


def test_tokenizer_equals_transformers_gguf_tokenizer(smollm2_dir, gguf_path):
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = Tokenizer.from_pretrained(smollm2_dir)
    texts = [
        "The capital of France is", " leading space", "double  space\n\n\ttab", "1234567890 3.14 1,000",
        "emoji 😀🎉 東京 Ünïcödé", "def f(x):\n    return x ** 2\n", "<|im_start|>user\nhi<|im_end|>\n",
        "<repo_name>cleave<file_sep>README.md", "it's DON'T we'll", "     ", "", "a" * 200,
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ref.bos_token_id) == (1, 1)
    assert ours.eos_token_ids == frozenset({2}) and ref.eos_token_id == 2
    for chat in (FRANCE, [{"role": "system", "content": "Be brief."}] + FRANCE):
        assert ours.apply_chat_template(chat) == ref.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )


def test_transformers_generates_coherent_text_from_converted_folder(smollm2_dir, hf_smollm2):
    tokenizer = Tokenizer.from_pretrained(smollm2_dir)
    assert "Paris" in _greedy(hf_smollm2, tokenizer, "The capital of France is", 8)
    answer = _greedy(hf_smollm2, tokenizer, tokenizer.apply_chat_template(FRANCE), 12)
    assert "Paris" in answer
    assert answer.isascii() and len(answer.split()) >= 3


# -- MoE from dense -------------------------------------------------------------------


def test_mixtral_config_from_dense():
    dense = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
             "rope_theta": 5.0, "tie_word_embeddings": True, "eos_token_id": 2}
    config = moe_from_dense.mixtral_config(dense, num_experts=4, top_k=2)
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["intermediate_size"] == 16 and config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == 5.0
    with pytest.raises(ValueError, match="top_k"):
        moe_from_dense.mixtral_config(dense, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="llama"):
        moe_from_dense.mixtral_config({"model_type": "qwen2"}, 4, 2)


def test_moe_from_tiny_dense_tracks_the_dense_model(tiny_models, tmp_path):
    dense_dir = tiny_models["llama"]
    moe_dir = moe_from_dense.convert(dense_dir, tmp_path / "moe", num_experts=3, top_k=2, progress=None)
    again = moe_from_dense.convert(dense_dir, tmp_path / "again", num_experts=3, top_k=2, progress=None)
    assert (moe_dir / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    dense_weights, moe_weights = load_file(dense_dir / "model.safetensors"), load_file(moe_dir / "model.safetensors")
    experts = [moe_weights[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(3)]
    base = dense_weights["model.layers.0.mlp.gate_proj.weight"]
    for expert in experts:
        ratio = expert / base
        assert 1e-4 < (ratio - 1).abs().max() < 0.1  # perturbed by about eps = 1e-2
    assert not torch.equal(experts[0], experts[1])
    assert torch.equal(moe_weights["model.embed_tokens.weight"], dense_weights["model.embed_tokens.weight"])
    assert moe_weights["model.layers.1.block_sparse_moe.gate.weight"].shape == (3, 64)

    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([Tokenizer.from_pretrained(dense_dir).encode("The river ran past the old mill")])
    with torch.inference_mode():
        a, b = dense(ids).logits, moe(ids).logits
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_smollm2_moe_is_coherent(smollm2_moe_dir, smollm2_dir):
    config = json.loads((smollm2_moe_dir / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    with safe_open(str(smollm2_moe_dir / "model.safetensors"), "pt") as moe:
        names = set(moe.keys())
    assert "model.layers.29.block_sparse_moe.experts.3.w2.weight" in names
    assert not any(".mlp." in name for name in names)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_moe_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_pretrained(smollm2_moe_dir)
    assert "Paris" in _greedy(model, tokenizer, tokenizer.apply_chat_template(FRANCE), 8)


# -- tiny checkpoints -----------------------------------------------------------------


def test_tiny_configs(tiny_models):
    configs = {f: json.loads((path / "config.json").read_text()) for f, path in tiny_models.items()}
    for config in configs.values():
        assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 4, 2)
        assert config["max_position_embeddings"] == 2048 and 512 <= config["vocab_size"] <= 1000
    assert configs["llama"]["tie_word_embeddings"] is True
    assert configs["qwen2"]["tie_word_embeddings"] is False
    assert configs["qwen2"]["rope_parameters"]["rope_theta"] == 1e6
    assert (configs["mixtral"]["num_local_experts"], configs["mixtral"]["num_experts_per_tok"]) == (8, 2)
    moe = configs["qwen2_moe"]
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["norm_topk_prob"]) == (8, 2, False)
    assert (moe["decoder_sparse_step"], moe["mlp_only_layers"]) == (1, [])
    with safe_open(str(tiny_models["qwen2_moe"] / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    with safe_open(str(tiny_models["qwen2"] / "model.safetensors"), "pt") as weights:
        assert "model.layers.0.self_attn.q_proj.bias" in set(weights.keys())


def test_tiny_build_is_deterministic(tiny_models, tmp_path):
    for family, built in tiny_models.items():
        again = tiny.build(family, tmp_path / family, seed=0)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (again / name).read_bytes() == (built / name).read_bytes(), (family, name)
    other = tiny.build("llama", tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_models["llama"] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("family", [*tiny.FAMILIES, "mixtral_hd64"])
def test_tiny_greedy_output_is_varied_with_clear_margins(tiny_models, family, request):
    path = tiny_models.get(family) or request.getfixturevalue("tiny_mixtral_hd64_dir")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_pretrained(path)
    prompts = ["Hello world", "The capital of France is", "def fibonacci(n):", "Once upon a time",
               "SELECT name FROM", "The river ran quietly", "1 2 3 4", "Pip wanted to paint"]
    distinct, gaps, outputs = [], [], set()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                 eos_token_id=None, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
            tokens = out.sequences[0, ids.shape[1]:].tolist()
            distinct.append(len(set(tokens)))
            outputs.add(tuple(tokens))
            for step in out.logits:
                top2 = torch.topk(step[0], 2).values
                gaps.append(float(top2[0] - top2[1]))
    gaps = torch.tensor(gaps)
    assert len(outputs) == len(prompts)
    assert sum(distinct) / len(distinct) >= 5, distinct
    assert (gaps < 1e-4).float().mean() < 0.01
    assert gaps.median() > 0.1


def test_tiny_unknown_family_and_missing_transformers(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="qwen2_moe"):
        tiny.build("gpt5", tmp_path / "x")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RuntimeError, match="test extras"):
        tiny.build("llama", tmp_path / "y")


# -- registry and CLI ------------------------------------------------------------------


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A registry entry whose build is instant and counted, in a private cache."""
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path / "home"))
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setitem(registry.MODELS, "fake", registry.ModelSpec("fake", "a test double", build))
    return calls


def test_cache_dir_follows_cleave_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))
    assert registry.cache_dir() == tmp_path / "models"
    monkeypatch.delenv("CLEAVE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert registry.cache_dir() == tmp_path / "user" / ".cache" / "cleave" / "models"


def test_resolve_builds_once_atomically(fake_model, tmp_path):
    first = registry.resolve("fake")
    assert first == registry.cache_dir() / "fake" and (first / "config.json").is_file()
    assert registry.resolve("fake") == first and len(fake_model) == 1
    # The build ran in a staging folder next to the target, which is gone now.
    assert fake_model[0] != first and not fake_model[0].exists()
    assert sorted(p.name for p in registry.cache_dir().iterdir()) == ["fake"]
    registry.resolve("fake", force=True)
    assert len(fake_model) == 2


def test_failed_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))

    def broken(out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(registry.MODELS, "broken", registry.ModelSpec("broken", "fails", broken))
    with pytest.raises(RuntimeError, match="disk full"):
        registry.resolve("broken")
    assert list(registry.cache_dir().iterdir()) == []


def test_resolve_paths_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path / "home"))
    assert registry.resolve(tmp_path) == tmp_path
    assert registry.resolve(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError) as info:
        registry.resolve("no-such-model")
    for name in ("smollm2-135m-instruct", "smollm2-moe", "tiny-llama", "tiny-qwen2", "tiny-mixtral",
                 "tiny-mixtral-hd64", "tiny-qwen2-moe"):
        assert name in str(info.value)
        assert name in registry.list_models()


def test_registry_builds_a_real_tiny_model(monkeypatch, tmp_path, tiny_models):
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))
    path = registry.resolve("tiny-qwen2-moe")
    assert (path / "model.safetensors").read_bytes() == (tiny_models["qwen2_moe"] / "model.safetensors").read_bytes()
    assert Tokenizer.from_pretrained(path).encode("hi")


def test_registry_builds_the_head_dim_64_mixtral(monkeypatch, tmp_path, tiny_mixtral_hd64_dir):
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))
    path = registry.resolve("tiny-mixtral-hd64")
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["head_dim"]) == (256, 4, 64)
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 8
    assert (path / "model.safetensors").read_bytes() == (tiny_mixtral_hd64_dir / "model.safetensors").read_bytes()


def test_cli_list_build_path(fake_model, capsys):
    from cleave.cli import main

    assert main(["model", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "fake" in out and "not built" in out
    assert cli.run_command("model", ["path", "fake", "--no-build"]) == 0
    assert capsys.readouterr().out.strip() == str(registry.cache_dir() / "fake")
    assert not fake_model
    assert cli.run_command("model", ["build", "fake"]) == 0
    assert capsys.readouterr().out.strip() == str(registry.cache_dir() / "fake")
    assert cli.run_command("model", ["path", "fake"]) == 0 and len(fake_model) == 1
    assert cli.run_command("model", ["build", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.run_command("model", [])
