"""Incremental detokenization and stop-string matching, without a server."""

from __future__ import annotations

import random

import pytest

from cleave.router.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "The river ran quietly past the old mill.",
    "naïve café, déjà vu — 日本語のテキスト, emoji 🎉🚀 and ∑ maths",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from cleave.models.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tiny_models["llama"])


def stream_text(tokenizer, token_ids, chunk_sizes=None):
    detok = IncrementalDetokenizer(tokenizer)
    deltas, i = [], 0
    sizes = iter(chunk_sizes or [])
    while i < len(token_ids):
        n = next(sizes, 1)
        deltas.append(detok.add(token_ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream_text(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)


@pytest.mark.parametrize("text", TEXTS[1:2])
def test_no_replacement_char_mid_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The tiny byte-level vocabulary splits non-ASCII characters over several tokens.
    assert len(ids) > len(text.encode()) // 2
    for delta in stream_text(tokenizer, ids):
        assert REPLACEMENT_CHAR not in delta


def test_random_tokens_in_random_chunks_join_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        chunks = [rng.randrange(1, 4) for _ in range(len(ids))]
        assert "".join(stream_text(tokenizer, ids, chunks)) == tokenizer.decode(ids)


def feed_all(stops, pieces):
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.matched is not None:
            return out, matcher.matched
    out.append(matcher.flush())
    return out, None


@pytest.mark.parametrize(
    "stops, pieces, emitted, matched",
    [
        ([], ["ab", "cd"], ["ab", "cd", ""], None),
        (["END"], ["hello E", "N", "D tail"], ["hello ", "", ""], "END"),
        (["END"], ["hello E", "N", "o"], ["hello ", "", "ENo", ""], None),
        (["END"], ["no match, E"], ["no match, ", "E"], None),
        (["x", "abc"], ["zab", "cx"], ["z", ""], "abc"),
        (["x", "abc"], ["zab", "x"], ["z", "ab"], "x"),
        (["abc", "b"], ["ab"], ["a"], "b"),
        (["\n\n"], ["line\n", "\nnext"], ["line", ""], "\n\n"),
        (["aab"], ["aaab"], ["a"], "aab"),
        (["日本"], ["テキスト日", "本語"], ["テキスト", ""], "日本"),
    ],
)
def test_stop_string_matcher(stops, pieces, emitted, matched):
    out, found = feed_all(stops, pieces)
    assert out == emitted
    assert found == matched


def test_held_back_text_is_released_at_the_end():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("wait ST") == "wait "
    assert matcher.flush() == "ST"
    assert matcher.matched is None
