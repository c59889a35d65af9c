"""Incremental, UTF-8-safe detokenization and stop-string matching for one sequence.

A token can end inside a multi-byte character (byte-level BPE); its text is held back until a
later token completes it. Text that could be the start of a stop string is also held back from
streaming, so a client never sees a stop string (or part of one) that is later cut.

Without stop strings nothing needs the text while the sequence runs, so tokens are only collected
and decoded when the text is read (`take_delta`, `flush`): once per output instead of once per token,
and once per sequence for clients that read only the finished output.
"""
from __future__ import annotations

_CONTEXT = 6   # prompt tokens decoded with the output so that leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # The Rust tokenizer directly: a third of the cost of transformers' wrapper, same text
        # whenever the wrapper does no clean-up of its own.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if backend is not None and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False) else None
        self._prefix_text: str | None = None   # decode of tokens[prefix_offset:read_offset]
        self.tokens = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""                # all output text so far (after a stop: cut at the stop)
        self.num_emitted = 0          # chars of `text` already handed out
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str | None:
        """Append a token. Returns the stop string if one now appears in the text, else None."""
        self.tokens.append(token_id)
        return self._advance() if self.stop else None

    def _advance(self) -> str | None:
        """Decode the tokens since the last emitted text; returns a stop string found in it."""
        if self.read_offset == len(self.tokens):
            return None
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        prefix = self._prefix_text
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None          # incomplete character: wait for the next token
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self._prefix_text = None   # re-decoded, not sliced: tokenizers may drop a leading space
        search_from = max(len(self.text) - self.holdback, 0)
        self.text += new
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[:at + len(s)] if self.include_stop else self.text[:at]
                return s
        return None

    def flush(self) -> None:
        """At the end of a sequence: whatever bytes were held back come out as they decode."""
        full = self._decode(self.tokens[self.prefix_offset:])
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.tokens)

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, the tail that may start a stop string stays back."""
        if not self.stop:
            self._advance()
        end = len(self.text) if finished or not self.stop else max(len(self.text) - self.holdback, self.num_emitted)
        delta = self.text[self.num_emitted:end]
        self.num_emitted = end
        return delta
