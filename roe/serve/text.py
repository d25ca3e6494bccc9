"""Tokens to text: a choice's text, decoded incrementally up to where the worker ended it; a token's bytes."""

import functools
from dataclasses import dataclass, field

from roe.stopping import Detokenizer


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
    """The text of one choice, streamed as its tokens arrive; the worker says where it ends.

    The worker's events (roe/serve/worker.py) give each token: ``add`` while the row goes on,
    ``end`` with the last one and the row's finish: "eos" (the eos token is not part of the
    text), "stop" (the text is cut where the first stop string starts: the worker found it,
    so it is not searched again here) or "length". The text is decoded once, incrementally
    (roe/stopping.py's ``Detokenizer``): a token costs a bounded decode, however long the text.
    ``ends[k]`` is the length of the text of the first k tokens, for logprobs' text offsets.
    """

    tokenizer: object
    stop: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    infos: list = field(default_factory=list)  # per token: (logprob, [(id, logprob), ...]) or None
    finish: str | None = None
    sent: int = 0
    infos_sent: int = 0
    cut: int | None = None  # finish "stop": where the first stop string starts in the text
    ends: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        self.decoded = Detokenizer(self.tokenizer)
        self.hold = max((len(s) - 1 for s in self.stop), default=0)  # a stop string may still start there

    def add(self, token: int, info=None) -> None:
        """A token of a row that goes on."""
        if not self.finish:
            self._append(token, info)

    def end(self, token: int, info, finish: str, cut: int | None) -> None:
        """The row's last token and why it ended ("eos", "stop" with ``cut``, "length")."""
        if self.finish:
            return
        if finish != "eos":
            self._append(token, info)
        self.finish, self.cut = ("stop" if finish == "eos" else finish), cut

    def _append(self, token: int, info) -> None:
        self.tokens.append(token)
        self.infos.append(info)
        self.decoded.push(token)
        self.ends.append(len(self.decoded))

    def _length(self) -> int:
        return len(self.decoded) if self.cut is None else min(self.cut, len(self.decoded))

    def text(self) -> str:
        return self.decoded.text()[: self.cut]

    def covered(self, chars: int) -> int:
        """How many leading tokens the first ``chars`` characters of the text hold entirely."""
        k = len(self.tokens)
        while k and self.ends[k] > chars:
            k -= 1
        return k

    def logprobs(self, chat: bool, upto: int | None = None) -> dict | None:
        """OpenAI logprobs of the tokens not yet reported whose text is within ``upto`` characters
        (default: the whole final text); None when the request did not ask for logprobs."""
        if not self.infos or self.infos[0] is None:
            return None
        end = self.covered(self._length() if upto is None else upto)
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
                "text_offset": [self.ends[i] for i, _, _ in entries]}

    def delta(self) -> str:
        """New text safe to stream: all of it once finished; before, none of the trailing U+FFFD (a
        partial character, which may still change) nor the ``hold`` characters before them.

        NOTE: the hold is counted before the partial character, not from the end: a stop string
        ending in a character whose bytes are still arriving starts up to ``hold`` characters
        before it (streaming the "é" of "café" and then cutting at the stop string "é€" would
        send text the answer does not have)."""
        unsent = self.decoded.since(self.sent)
        safe = self._length() - self.sent if self.finish else len(unsent.rstrip("\ufffd")) - self.hold
        if safe <= 0:
            return ""
        self.sent += safe
        return unsent[:safe]
