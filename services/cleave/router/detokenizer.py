"""Turning a stream of token ids into a stream of text that is safe to send.

Two jobs, kept apart so each can be tested alone:

* ``IncrementalDetokenizer`` emits text only once it is complete UTF-8: a token that
  ends mid-way through a multi-byte character is held until the character's last byte
  arrives, so a client never sees U+FFFD that the full decode would not contain.
* ``StopStringMatcher`` holds back any tail of the text that could still grow into a
  stop string, and reports a match with the text cut just before it.
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Decodes output tokens a few at a time, the way vLLM does: the text of the
    window ``ids[prefix_offset:]`` minus the text of ``ids[prefix_offset:read_offset]``.

    Decoding a window rather than one token keeps the spaces that tokenizers drop at
    the start of a decode, so the concatenated deltas equal ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held at the end of the stream, incomplete characters included."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopStringMatcher:
    """Finds the first stop string in streamed text without ever emitting part of one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add text; return what can be emitted now. After a match, ``matched`` is set
        and the returned text ends just before the stop string."""
        if not self.stop:
            return text
        self.pending += text
        first = min(
            ((pos, s) for s in self.stop if (pos := self.pending.find(s)) >= 0),
            default=None,
        )
        if first is not None:
            pos, self.matched = first
            out, self.pending = self.pending[:pos], ""
            return out
        keep = self._longest_partial_suffix()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """Release the held-back tail when the stream ends without a match."""
        out, self.pending = self.pending, ""
        return out

    def _longest_partial_suffix(self) -> int:
        text = self.pending
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
