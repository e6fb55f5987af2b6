"""Request output: committing emitted tokens and turning them into exact streamed text.

Three rules, applied in this order to every token a step emits for a request:
  EOS          ends the request (unless `ignore_eos`); the EOS token counts, its text is empty
  max_tokens   ends the request at exactly that many output tokens
  stop strings the text ends right before the first occurrence of any stop string; the
               tokens after the one that completes the text up to it are dropped, so the
               token count matches the text

Text is detokenized incrementally (only a short window of recent tokens is decoded each
step, never the whole output), and held back while it could still be the start of a stop
string or the first bytes of an unfinished UTF-8 character, so a stream never shows text
that the final answer does not contain.
"""
from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """Incremental detokenizer with exact stop-string handling, for one request."""

    __slots__ = ("_tokenizer", "_stops", "_max_stop", "_prefix_offset", "_read_offset",
                 "text", "sent_len", "stopped_at")

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stops = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        # Decode window over output ids: text of ids[prefix:read] is already in `text`.
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""                 # detokenized output so far (cut at a stop)
        self.sent_len = 0              # characters handed out
        self.stopped_at: int | None = None   # tokens kept when a stop string matched

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, output_ids: list[int], final: bool) -> bool:
        """Take the output ids (all of them, new ones at the end); True if a stop string
        ended the text. With `final`, an unfinished trailing character is flushed."""
        prefix = self._decode(output_ids[self._prefix_offset:self._read_offset])
        window = self._decode(output_ids[self._prefix_offset:])
        start = len(self.text)
        if len(window) > len(prefix) and (final or not window.endswith(REPLACEMENT_CHAR)):
            self.text += window[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(output_ids)
        if not self._stops:
            return False
        # A new match can only start within the last max_stop - 1 characters before `start`.
        search_from = max(0, start - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if not hits:
            return False
        cut = min(hits)
        self.text = self.text[:cut]
        self.stopped_at = self._tokens_reaching(output_ids, cut)
        return True

    def _tokens_reaching(self, output_ids: list[int], cut: int) -> int:
        """The fewest leading tokens whose text reaches `cut` characters: the tokens kept
        when a stop string starts there. Binary search with full decodes, once per request."""
        lo, hi = 0, len(output_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(output_ids[:mid]).rstrip(REPLACEMENT_CHAR)) >= cut:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def take(self, finished: bool) -> str:
        """The new text that is safe to show; everything left when `finished`."""
        visible = len(self.text)
        if not finished:
            visible -= self._holdback()
        if visible <= self.sent_len:
            return ""
        out = self.text[self.sent_len:visible]
        self.sent_len = visible
        return out

    def _holdback(self) -> int:
        """Characters at the end of `text` that may still become a stop string's start."""
        text = self.text
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def commit_tokens(req, tokens: list[int], eos_token_id: int | None, tokenizer) -> int:
    """Append a step's emitted tokens to `req` under EOS, max_tokens and stop strings.
    Returns how many were kept (the rest, past the end, are dropped)."""
    params = req.params
    if req.text is None:
        req.text = TextStream(tokenizer, params.stop)
    kept = 0
    for tok in tokens:
        req.output_ids.append(tok)
        kept += 1
        if tok == eos_token_id and not params.ignore_eos:
            req.finished, req.finish_reason = True, "stop"
            break
        if len(req.output_ids) >= params.max_tokens:
            req.finished, req.finish_reason = True, "length"
            break
    req.unsynced_draft.extend(tokens[:kept])
    if req.text.add(req.output_ids, final=req.finished):
        before = len(req.output_ids)
        del req.output_ids[req.text.stopped_at:]
        kept -= before - len(req.output_ids)
        req.finished, req.finish_reason = True, "stop"
    return max(kept, 0)
