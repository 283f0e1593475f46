"""Token ids to text pieces: incremental decoding that never splits a UTF-8 character, and stop strings."""

from __future__ import annotations


class TextStream:
    """Feeds generated ids, returns new text that is safe to show: whole characters, not part of a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # decode window: ids[prefix:read] is already text
        self.text = ""  # all decoded text (stop string cut off once found)
        self.emitted = 0  # chars of self.text already handed out
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def _decode_new(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def feed(self, token: int) -> str:
        """Add one token; return the text now safe to emit (may be empty). Sets `stopped` on a stop string."""
        self.ids.append(token)
        self.text += self._decode_new()
        if self.stop:
            window = self.text[max(0, self.emitted - self.hold) :]
            hits = [i for i in (window.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: max(0, self.emitted - self.hold) + min(hits)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self.hold if self.stop else len(self.text)
        out = self.text[self.emitted : max(self.emitted, safe)]
        self.emitted += len(out)
        return out

    def flush(self) -> str:
        """All text not yet emitted (at the end of generation), including an incomplete last character."""
        if not self.stopped and self.read < len(self.ids):
            tail = self.tok.decode(self.ids[self.prefix :])[len(self.tok.decode(self.ids[self.prefix : self.read])) :]
            self.text += tail
            self.prefix = self.read = len(self.ids)
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
