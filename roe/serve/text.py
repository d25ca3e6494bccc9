"""Tokens to text: a choice's text up to eos and stop strings, and a token's bytes for logprobs."""

import functools
from dataclasses import dataclass, field


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (exact for byte-level BPE, whose tokens may hold part of a character)."""
    table = _byte_of_char()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode()


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def token_text(raw: bytes) -> str:
    """A token's text, or OpenAI's ``bytes:\\xNN`` form when it is not whole UTF-8 on its own."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class ChoiceText:
    """The text of one choice: its tokens up to eos, cut before a stop string, at most max_tokens."""

    tokenizer: object
    eos: frozenset
    stop: tuple[str, ...]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    infos: list = field(default_factory=list)  # per token: (logprob, [(id, logprob), ...]) or None
    finish: str | None = None
    sent: int = 0
    infos_sent: int = 0

    def add(self, token: int, info=None) -> None:
        if self.finish:
            return
        if token in self.eos:
            self.finish = "stop"
            return
        self.tokens.append(token)
        self.infos.append(info)
        if self.stop and any(s in self._decoded() for s in self.stop):
            self.finish = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish = "length"

    def end(self) -> None:
        self.finish = self.finish or "length"

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def text(self) -> str:
        text = self._decoded()
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def covered(self, chars: int) -> int:
        """How many leading tokens the first ``chars`` characters of the text hold entirely."""
        k = len(self.tokens)
        while k and len(self.tokenizer.decode(self.tokens[:k], skip_special_tokens=True)) > chars:
            k -= 1
        return k

    def logprobs(self, chat: bool, upto: int | None = None) -> dict | None:
        """OpenAI logprobs of the tokens not yet reported whose text is within ``upto`` characters
        (default: the whole final text); None when the request did not ask for logprobs."""
        if not self.infos or self.infos[0] is None:
            return None
        end = self.covered(len(self.text()) if upto is None else upto)
        first, self.infos_sent = self.infos_sent, max(self.infos_sent, end)
        entries = [(i, *self.infos[i]) for i in range(first, end)]
        if chat:
            def item(token_id, logprob):
                raw = token_bytes(self.tokenizer, token_id)
                return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}

            return {"content": [{**item(self.tokens[i], lp), "top_logprobs": [item(t, v) for t, v in top]}
                                for i, lp, top in entries], "refusal": None}
        text = lambda t: token_text(token_bytes(self.tokenizer, t))  # noqa: E731
        return {"tokens": [text(self.tokens[i]) for i, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{text(t): v for t, v in top} for _, _, top in entries],
                "text_offset": [len(self.tokenizer.decode(self.tokens[:i], skip_special_tokens=True))
                                for i, _, _ in entries]}

    def delta(self) -> str:
        """New text safe to stream: holds back a possible stop-string prefix and a partial character."""
        text = self.text()
        safe = len(text)
        if not self.finish:
            safe -= max((len(s) - 1 for s in self.stop), default=0)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent : safe], safe
        return piece
