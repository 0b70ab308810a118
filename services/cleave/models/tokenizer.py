"""A Hugging Face tokenizer folder, loaded without ``transformers``.

The serving path must not import ``transformers`` (it is a test-only dependency), yet
its token ids and prompts must match what ``transformers`` produces for the same
folder, or outputs stop being comparable with a reference run. This module therefore
mirrors the handful of rules ``transformers`` (5.x) applies on top of
``tokenizer.json``: its post-processor alone decides which special tokens ``encode``
adds (``add_bos_token`` in ``tokenizer_config.json`` is ignored when ``tokenizer.json``
exists), special tokens named only in ``tokenizer_config.json`` are added to the
vocabulary, and chat templates render in a sandboxed Jinja environment.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import tokenizers
from tokenizers import AddedToken

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Older names for a message's reasoning; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_content(value: Any) -> str | None:
    # Older configs serialise special tokens as AddedToken dicts instead of strings.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    """Encodes, decodes and renders chat prompts for one model folder."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer`` with the settings of ``tokenizer_config.json``
        and ``generation_config.json``; most callers want :meth:`from_pretrained`."""
        self._backend = backend
        self._config = dict(config or {})
        self._generation_config = dict(generation_config or {})
        self._chat_template = chat_template
        self._special_tokens = {
            key: _token_content(self._config.get(key))
            for key in _SPECIAL_TOKEN_KEYS
            if _token_content(self._config.get(key)) is not None
        }
        self._add_missing_special_tokens()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json``, ``tokenizer_config.json`` and, when present,
        ``generation_config.json`` and ``chat_template.jinja`` from a model folder."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")
        generation_config = _read_json(folder / "generation_config.json")
        return cls(backend, config, generation_config, _find_chat_template(folder, config))

    # -- setup ---------------------------------------------------------------------

    def _add_missing_special_tokens(self) -> None:
        # transformers registers every special token the config names as an added
        # token, even one already in the base vocabulary (it then matches whole in
        # text); doing the same keeps ids aligned with it.
        vocab = {token.content for token in self._backend.get_added_tokens_decoder().values()}
        missing: list[AddedToken] = []
        decoder = self._config.get("added_tokens_decoder") or {}
        for _, spec in sorted(decoder.items(), key=lambda item: int(item[0])):
            content = _token_content(spec)
            if content is not None and content not in vocab:
                missing.append(
                    AddedToken(
                        content,
                        single_word=spec.get("single_word", False),
                        lstrip=spec.get("lstrip", False),
                        rstrip=spec.get("rstrip", False),
                        normalized=spec.get("normalized", False),
                        special=spec.get("special", True),
                    )
                )
        for content in self._special_tokens.values():
            if content not in vocab and all(token.content != content for token in missing):
                missing.append(AddedToken(content, special=True, normalized=False))
        if missing:
            self._backend.add_tokens(missing)

    # -- properties ----------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token string, or ``None``."""
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The tokenizer's own end-of-sequence token string, or ``None``."""
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        """The padding token string, or ``None``."""
        return self._special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        """The unknown token string, or ``None``."""
        return self._special_tokens.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of :attr:`bos_token`, or ``None``."""
        return None if self.bos_token is None else self._backend.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Id of :attr:`pad_token`, or ``None``."""
        return None if self.pad_token is None else self._backend.token_to_id(self.pad_token)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the tokenizer's eos and generation_config's."""
        ids = set(_as_id_list(self._generation_config.get("eos_token_id")))
        if self.eos_token is not None:
            token_id = self._backend.token_to_id(self.eos_token)
            if token_id is not None:
                ids.add(token_id)
        return frozenset(ids)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or ``None`` when the folder has none."""
        return self._chat_template

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of every token marked special (skipped by ``decode``)."""
        return frozenset(
            token_id
            for token_id, token in self._backend.get_added_tokens_decoder().items()
            if token.special
        )

    # -- encoding ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``; equal to ``transformers``' ``encode`` for the folder."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; special tokens are dropped unless asked for."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._config.get("clean_up_tokenization_spaces") and not isinstance(
            self._backend.model, tokenizers.models.BPE
        ):
            # transformers skips this cleanup for BPE models because it corrupts them.
            text = _clean_up_tokenization(text)
        return text

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        """Vocabulary strings for one id or a list of ids."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Ids for one vocabulary string or a list of them."""
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(t) for t in tokens]

    # -- chat ----------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template into a prompt string,
        as ``transformers``' ``apply_chat_template(..., tokenize=False)`` does."""
        if self._chat_template is None:
            raise ValueError(
                "this model folder has no chat template (no 'chat_template' in "
                "tokenizer_config.json and no chat_template.jinja); send plain "
                "completion prompts instead"
            )
        template = _compile(self._chat_template)
        context = dict(self._special_tokens)
        context.update(kwargs)
        return template.render(
            messages=_alias_reasoning(_plain(messages)),
            tools=_plain(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_plain(context),
        )


def _find_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    # Recent transformers writes the template to its own file and that file wins.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


def _clean_up_tokenization(text: str) -> str:
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    # Templates disagree on the field name for reasoning; offer it under all of them.
    aliased = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _plain(value: Any) -> Any:
    # Only JSON-like data reaches the sandbox: rich objects expose methods the
    # sandbox cannot judge (transformers applies the same rule).
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes, which would corrupt prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _Namespace(jinja2.utils.Namespace):
        # Underscore attributes would give templates a path to interpreter internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes on a namespace: {name!r}"
                )

    class _GenerationTag(jinja2.ext.Extension):
        # Templates mark assistant spans with {% generation %}; rendering ignores it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

        def _passthrough(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = lambda *args, **kw: dict(*args, **kw)
    return env.from_string(source)
