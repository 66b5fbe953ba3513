"""From generated token ids to the text a client sees: incremental decoding and stop strings."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class IncrementalDecoder:
    """Turns token ids into text pieces, one id at a time, never splitting a multi-byte character.

    tokenizers' `DecodeStream` does the work on the fast tokenizer's backend: it holds back ids while they
    decode to an incomplete UTF-8 sequence (byte-level BPE, or SentencePiece byte-fallback tokens), and
    decodes each step with the piece before it, so tokenizers that drop a leading space at the start of a
    decode (SentencePiece) still give the same text as decoding every id at once.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"Incremental decoding needs a fast tokenizer, not {type(tokenizer).__name__}")
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)
        # What the stream holds, for `flush`: the ids of the last piece (its context) and the ids since.
        self._piece_ids: list[int] = []
        self._held_ids: list[int] = []

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes; empty while a character is still incomplete."""
        self._held_ids.append(token_id)
        piece = self._stream.step(self._backend, token_id)
        if piece is None:
            return ""
        self._piece_ids, self._held_ids = self._held_ids, []
        return piece

    def flush(self) -> str:
        """The text still held back at the end of generation (an incomplete character decodes as U+FFFD).

        DecodeStream has no end: the held ids are decoded as it decodes a step, after the last piece."""
        if not self._held_ids:
            return ""
        context = self._backend.decode(self._piece_ids, skip_special_tokens=True)
        text = self._backend.decode(self._piece_ids + self._held_ids, skip_special_tokens=True)
        self._piece_ids, self._held_ids = self._piece_ids + self._held_ids, []
        return text[len(context) :]


class StopStringFilter:
    """Passes text through until a stop string appears; the stop string and anything after it never pass.

    Text that could be the start of a stop string is held back until the next piece decides it.
    """

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of `held + text` that is safe to emit; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        pending = self._held + text
        matches = [index for index in (pending.find(s) for s in self._stop) if index >= 0]
        if matches:
            self.stopped = True
            self._held = ""
            return pending[: min(matches)]
        keep = self._partial_match_length(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """The held-back text, released because generation ended without completing a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class CompletionText:
    """The text of one completion: decoded token by token and cut at the first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._filter = StopStringFilter(stop)

    @property
    def stopped(self) -> bool:
        """True once a stop string appeared; no text follows."""
        return self._filter.stopped

    def push(self, token_id: int) -> str:
        """The text to emit after `token_id`."""
        return self._filter.push(self._decoder.push(token_id))

    def finish(self) -> str:
        """The text still held back, emitted because generation ended."""
        text = self._filter.push(self._decoder.flush())
        return text if self.stopped else text + self._filter.flush()
