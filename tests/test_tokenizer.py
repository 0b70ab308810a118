"""``cleave.models.tokenizer.Tokenizer`` against ``transformers`` on the same folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
from datetime import datetime

import jinja2
import pytest

from cleave.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The capital of France is",
    "",
    " ",
    "     five spaces, then text",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends\r\n",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "東京は日本の首都です。 Ünïcödé, Ελληνικά, русский, العربية",
    "combining e\u0301 vs precomposed \u00e9, zero\u200bwidth",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "if (a && b) { return x->y; } else { i++; }",
    "1234567890 3.14159 1,000,000 -42 1e-5",
    "it's don't we'll I'M YOU'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "not special: <|im_start and |im_end|>",
    "a" * 300,
    "The quick brown fox jumps over the lazy dog. " * 20,
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colors."},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you? 😀 東京"},
    ],
    [
        {"role": "user", "content": "  leading and trailing whitespace \n\n"},
        {"role": "assistant", "content": "```python\nprint('x')\n```"},
        {"role": "user", "content": ""},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city, e.g. Zürich",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mixtral", "qwen2_moe", "smollm2"])
def folder(request, tiny_models):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_dir")
    return tiny_models[request.param]


@pytest.fixture(scope="module")
def pair(folder):
    return Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


def test_encode_matches_transformers(pair):
    ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
    assert ours.encode_batch(TEXTS) == [ref.encode(text) for text in TEXTS]


def test_special_tokens_in_text_stay_whole(pair):
    ours, _ = pair
    ids = ours.encode("<|im_start|>user")
    assert ids[0] == ours.convert_tokens_to_ids("<|im_start|>")


def test_decode_matches_transformers(pair):
    ours, ref = pair
    for text in TEXTS:
        ids = ref.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    # Special tokens are dropped by default, as a server returning text wants.
    ids = ours.encode("<|im_start|>hi<|im_end|>")
    assert ours.decode(ids) == "hi"
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_byte_level_round_trip(pair):
    ours, _ = pair
    for text in TEXTS:
        # The tiny tokenizers normalise to NFC, so compare against that form.
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) in (
            text,
            unicodedata.normalize("NFC", text),
        )


def test_vocab_and_token_conversion_match(pair):
    ours, ref = pair
    assert ours.vocab_size == len(ref)
    ids = ref.encode(TEXTS[7] + TEXTS[10])
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[0]) == ref.convert_ids_to_tokens(ids[0])
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ref.eos_token_id in ours.eos_token_ids


def test_chat_template_matches_transformers(pair):
    ours, ref = pair
    for chat in CHATS:
        for add_generation_prompt in (True, False):
            expected = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


def test_tiny_tools_render_like_transformers(tiny_models):
    ours = Tokenizer.from_pretrained(tiny_models["qwen2"])
    ref = transformers.AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    for chat in CHATS[:2]:
        prompt = ours.apply_chat_template(chat, tools=TOOLS)
        assert prompt == ref.apply_chat_template(chat, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        # tojson must not escape non-ASCII or HTML characters.
        assert "Zürich" in prompt and '"get_weather"' in prompt


def test_tiny_template_rejects_unknown_role(tiny_models):
    ours = Tokenizer.from_pretrained(tiny_models["llama"])
    with pytest.raises(jinja2.TemplateError, match="unsupported role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_eos_ids_union_tokenizer_and_generation_config(tiny_models):
    ours = Tokenizer.from_pretrained(tiny_models["llama"])
    im_end, endoftext = ours.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert ours.eos_token_ids == frozenset({im_end, endoftext})
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_path.write_text(json.dumps(config))
    return dst


def test_bos_comes_from_tokenizer_json_like_transformers(tiny_models, tmp_path):
    import tokenizers
    from tokenizers import processors

    # transformers 5 ignores add_bos_token when tokenizer.json exists...
    flagged = _edited_copy(tiny_models["llama"], tmp_path / "flag", add_bos_token=True)
    # ...and follows the post-processor in tokenizer.json instead.
    templated = _edited_copy(tiny_models["llama"], tmp_path / "template")
    backend = tokenizers.Tokenizer.from_file(str(templated / "tokenizer.json"))
    bos_id = backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos_id)]
    )
    backend.save(str(templated / "tokenizer.json"))
    for folder, adds_bos in ((flagged, False), (templated, True)):
        ours, ref = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
        for text in TEXTS[:6]:
            assert ours.encode(text) == ref.encode(text)
            assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert (ours.encode("hi")[0] == bos_id) is adds_bos
        assert ours.encode("hi", add_special_tokens=False)[0] != bos_id


def test_special_tokens_named_only_in_config_are_added_like_transformers(tiny_models, tmp_path):
    # "ap" is an ordinary merge in the vocabulary; "<pad>" is not in it at all.
    folder = _edited_copy(tiny_models["llama"], tmp_path / "extra", bos_token="ap", pad_token="<pad>")
    ours, ref = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    original = Tokenizer.from_pretrained(tiny_models["llama"])
    assert ours.vocab_size == len(ref) == original.vocab_size + 1
    assert ours.pad_token_id == ref.pad_token_id == ours.vocab_size - 1
    for text in ("map ap <pad> x", "The capital", "<pad><pad>"):
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


def test_missing_chat_template_raises_clear_error(tiny_models, tmp_path):
    folder = _edited_copy(tiny_models["llama"], tmp_path / "plain", chat_template=None)
    ours = Tokenizer.from_pretrained(folder)
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CHATS[0])


def test_chat_template_file_wins_and_helpers_work(tiny_models, tmp_path):
    folder = _edited_copy(tiny_models["llama"], tmp_path / "jinja")
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] | trim }}\n"
        "{% endfor %}{% if add_generation_prompt %}{{ strftime_now('%Y') }}>{% endif %}"
    )
    ours, ref = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    rendered = ours.apply_chat_template(CHATS[1])
    assert rendered == ref.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|endoftext|>[SYSTEM] You are terse.\n")
    assert rendered.endswith(f"{datetime.now().year}>")


def test_sandbox_blocks_attribute_escape(tiny_models, tmp_path):
    folder = _edited_copy(
        tiny_models["llama"], tmp_path / "evil", chat_template="{{ messages.__class__.__mro__ }}"
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.from_pretrained(folder).apply_chat_template(CHATS[0])


def test_missing_tokenizer_json_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_does_not_import_transformers_or_torch(tiny_models):
    code = (
        "import sys\n"
        "from cleave.models.tokenizer import Tokenizer\n"
        f"t = Tokenizer.from_pretrained({str(tiny_models['qwen2'])!r})\n"
        "t.apply_chat_template([{'role': 'user', 'content': 'hi'}]); t.decode(t.encode('hi'))\n"
        "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
