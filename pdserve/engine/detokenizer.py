"""Incremental detokenization with stop strings, one request at a time.

Lifecycle: created with the prompt -> add_token() per sampled token -> either a stop string
matches (update.stopped_by is set; the detokenizer is closed) or the engine ends the request
for another reason (EOS, stop token id, max_tokens) and calls finish() to flush held-back text.

Two kinds of text are held back and never emitted early:
- bytes of a character not complete yet: the window decodes to text ending in U+FFFD;
- the longest suffix of the text that is the beginning of some stop string.

Invariants:
- emitted text never contains the start of a stop string: if one started inside it, that
  suffix would have been held back (it was a prefix of the stop string) until it matched.
- the decoded window ids[prefix_offset:] is the previous chunk plus the unread tokens, at
  most 2 * MAX_WINDOW_TOKENS ids (one token each, in the common case), and held-back text is
  shorter than the longest stop string plus one token's text: each add_token costs
  O(window + stop strings), never O(text so far).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pdserve.engine.sampling_params import SamplingParams

# Prompt tokens decoded before the first output token, so that tokenizers which drop the
# leading space of a decode (SentencePiece) still produce the right first delta.
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes, so after this many undecodable tokens the U+FFFD
# is genuine (invalid bytes from the model) and is emitted rather than held forever.
MAX_WINDOW_TOKENS = 8
_REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class DetokenizerUpdate:
    text_delta: str  # safe to send to the client now
    stopped_by: str | None = None  # the stop string that ended the request, never emitted


class StoppedError(RuntimeError):
    """add_token() after a stop string matched: the request is over."""


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stop = params.stop
        self._max_stop_chars = max((len(s) for s in params.stop), default=0)
        # ids = tail of the prompt + every output token; only ids[prefix_offset:] is decoded.
        self._ids = [int(t) for t in prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0  # start of the decoded window
        self._read_offset = len(self._ids)  # ids before this are already turned into text
        self._held = ""  # decoded but not emitted: could be the start of a stop string
        self._chunks: list[str] = []
        self._stopped_by: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far (deltas joined)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def stopped_by(self) -> str | None:
        return self._stopped_by

    def add_token(self, token_id: int) -> DetokenizerUpdate:
        if self._stopped_by is not None or self._finished:
            raise StoppedError("add_token() after the request stopped or finished")
        self._ids.append(token_id)
        return self._consume(self._decode_new(force=False))

    def finish(self) -> str:
        """Flush held-back text at the end of the request; "" if a stop string ended it."""
        if self._stopped_by is not None or self._finished:
            return ""
        update = self._consume(self._decode_new(force=True), final=True)
        self._finished = True
        return update.text_delta

    def _decode_new(self, force: bool) -> str:
        """Text of ids[read_offset:] once it is complete (or forced); "" while it is not."""
        if self._read_offset == len(self._ids):
            return ""
        decode, skip = self._tokenizer.decode, self._skip_special
        prefix_text = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip
        )
        new_text = decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        unread = len(self._ids) - self._read_offset
        incomplete = new_text.endswith(_REPLACEMENT) and unread < MAX_WINDOW_TOKENS
        if len(new_text) <= len(prefix_text) or (incomplete and not force):
            # Nothing new yet (a skipped special token, or half a character).
            if unread >= MAX_WINDOW_TOKENS or force:
                self._advance()
            return ""
        self._advance()
        return new_text[len(prefix_text) :]

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def _consume(self, new_text: str, final: bool = False) -> DetokenizerUpdate:
        """Run stop-string matching over held + new text and decide what is emitted."""
        pending = self._held + new_text
        match = _first_stop(pending, self._stop)
        if match is not None:
            start, stop = match
            self._stopped_by = stop
            return self._emit(pending[:start], held="", stopped_by=stop)
        keep = 0 if final else _stop_prefix_len(pending, self._stop, self._max_stop_chars)
        return self._emit(pending[: len(pending) - keep], held=pending[len(pending) - keep :])

    def _emit(self, delta: str, held: str, stopped_by: str | None = None) -> DetokenizerUpdate:
        self._held = held
        if delta:
            self._chunks.append(delta)
        return DetokenizerUpdate(delta, stopped_by)


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop) of the stop string that is complete earliest in `text`.

    Earliest *end* wins (that is where a character-by-character stream would stop), then
    earliest start, so the result does not depend on how the text was split into tokens.
    """
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        key = (start + len(stop), start, stop)
        if best is None or key < best:
            best = key
    return None if best is None else (best[1], best[2])


def _stop_prefix_len(text: str, stops: Sequence[str], max_stop_chars: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    for n in range(min(len(text), max_stop_chars - 1), 0, -1):
        suffix = text[-n:]
        if any(stop.startswith(suffix) for stop in stops):
            return n
    return 0
