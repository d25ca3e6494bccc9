"""When a row stops: an eos id, a stop string, or ``max_new_tokens``, checked once per step.

``StopConditions`` is what a request asks for; ``StopState`` is one row's progress towards it. A
row stops at its new token if the token is one of ``eos`` (the token is emitted), else if the text
of its generated tokens contains one of ``strings``, else if it is the ``max_new_tokens``-th.

The text is ``tokenizer.decode(generated, skip_special_tokens=True)``. Decoding all of it at every
step costs O(n) per step, O(n^2) per row. ``StopState`` reads it through a ``Detokenizer``, which
decodes a bounded tail instead, as vLLM's incremental detokenizer does (after
text-generation-inference); the server streams a choice's text through one too::

    generated tokens:  ... committed ... | prefix ... read | read ... n
    window (decoded):                    |   last piece    |  pending

- The text of the tokens before ``read`` is committed: appending tokens no longer changes it. The
  new text at step n is ``decode(window)[len(decode(window[:read])):]``; decoding from one piece
  earlier than ``read`` keeps what depends on the left context (SentencePiece's leading space,
  the clean-up of a space before punctuation) as the whole decode has it.
- A token that holds part of a multi-byte character decodes to U+FFFD until the character's last
  byte arrives, so pending text that ends in U+FFFD is not committed: the character is searched
  for as it finally reads, at the step the whole decode shows it.
- A stop string absent at step n-1 and present at step n ends in the new text (the committed
  text was searched, piece by piece, when it was new), so only the new text and the ``longest-1``
  committed characters before it are searched.

The tests hold ``StopState`` to the whole decode, step for step (tests/test_stopping.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

# NOTE: U+FFFD can also be final (a byte that starts no character, a lone continuation byte): a run
# of such tokens would never commit. Beyond MAX_PENDING pending tokens, the text up to HOLD tokens
# back is committed when decoding it alone gives the leading characters of the whole window. A
# UTF-8 character has at most 4 bytes and a byte-level token at least one: a character that spans
# that point is complete in the window, so it fails the check, and it spans at most HOLD - 1
# points. Hence a piece and the pending tokens hold at most MAX_PENDING + HOLD tokens each, and a
# decode at most WINDOW (byte-level tokenizers; a tokenizer whose text never settles grows its
# window and stays exact).
MAX_PENDING = 8
HOLD = 4
WINDOW = 2 * (MAX_PENDING + HOLD)


@dataclass(frozen=True, kw_only=True)
class StopConditions:
    """What ends a row: ``eos`` ids (the model's end of sequence and any stop token ids; the token
    is emitted), ``strings`` found in the decoded continuation (needs ``tokenizer``), and at most
    ``max_new_tokens`` tokens. One object serves every row of a request; ``start`` gives a row's state."""

    max_new_tokens: int
    eos: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()
    tokenizer: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"a row needs max_new_tokens >= 1, got {self.max_new_tokens!r}")
        object.__setattr__(self, "eos", frozenset(int(t) for t in self.eos))
        object.__setattr__(self, "strings", tuple(self.strings))
        if not all(isinstance(s, str) for s in self.strings):
            raise TypeError(f"stop strings must be strings, got {self.strings!r}")
        if self.strings and self.tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= to decode the generated text")

    def start(self) -> StopState:
        return StopState(self)


class StopState:
    """One row's progress: tokens counted, and (with stop strings) its text, searched where a new hit could be."""

    def __init__(self, conditions: StopConditions) -> None:
        self.conditions, self.generated = conditions, 0
        self.text = Detokenizer(conditions.tokenizer) if conditions.strings else None
        self.keep = max([0, *(len(s) - 1 for s in conditions.strings)])
        self.cut: int | None = None  # once "stop": where the first stop string starts in the text

    def update(self, token: int) -> str | None:
        """Count ``token``, just generated: "eos", "stop" (a stop string) or "length" if the row ends at it."""
        stop = self.conditions
        self.generated += 1
        if token in stop.eos:
            return "eos"
        if stop.strings and self._hit(token):
            return "stop"
        return "length" if self.generated >= stop.max_new_tokens else None

    def _hit(self, token: int) -> bool:
        """Append ``token``; does the text now contain a stop string? (``cut``: where the first starts.)

        A hit absent before ends in the new text, so it starts at most ``keep`` committed
        characters before it; after a rewrite (``Detokenizer.whole``) the whole text is searched."""
        start = max(0, self.text.committed - self.keep)
        self.text.push(token)
        start = 0 if self.text.whole else start
        window = self.text.since(start)
        found = [at for s in self.conditions.strings if (at := window.find(s)) >= 0]
        if found:
            self.cut = start + min(found)
        return bool(found)


class Detokenizer:
    """The text of a growing list of tokens, decoded on a bounded window (see the module docstring).

    After each ``push`` the text is ``decode(tokens, skip_special_tokens=True)``: its first
    ``committed`` characters (the pieces committed so far) never change again, the rest
    (``pending``) may. ``since(start)`` joins only the pieces it needs, so reading the end of the
    text costs what that end holds, not the whole text. The stop conditions and the server's
    streaming (roe/serve/text.py) both read a row's text through it.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.glue = tokenizer, _glued(tokenizer)
        self.tokens: list[int] = []  # every token pushed, for the fallback only
        self.prefix = self.read = 0  # tokens[prefix:read] is the last committed piece, tokens[read:] pending
        self.head = ""  # decode(tokens[prefix:read])
        self.pieces: list[str] = []  # the committed text, piece by piece
        self.committed = 0  # characters in ``pieces``
        self.pending = ""
        self.whole = False  # the tokenizer rewrote committed text: decode everything from now on

    def __len__(self) -> int:
        return self.committed + len(self.pending)

    def text(self) -> str:
        return self.since(0)

    def since(self, start: int) -> str:
        """The text from character ``start`` on."""
        parts, at = [self.pending], self.committed
        for piece in reversed(self.pieces):
            if at <= start:
                break
            parts.append(piece)
            at -= len(piece)
        return "".join(reversed(parts))[start - at:]

    def push(self, token: int) -> None:
        """Append ``token``: commit what its window shows final, keep the rest pending."""
        self.tokens.append(token)
        full = "" if self.whole else self._decode(self.prefix, len(self.tokens))
        if self.whole or not full.startswith(self.head):
            # NOTE: a run of byte-fallback tokens that is not valid UTF-8 decodes as one U+FFFD
            # per byte, including bytes already read as whole characters: committed text changed.
            # The window holds the whole run (``_glued``), so this is seen here; the text falls
            # back to the whole decode, exact and O(n) per token, which only broken bytes cost.
            self.whole, self.pieces, self.committed = True, [], 0
            self.pending = self._decode(0, len(self.tokens))
            return
        new = full[len(self.head):]
        if new and not new.endswith("\ufffd"):
            self._commit(len(self.tokens), new)
            self.pending = ""
        elif len(self.tokens) - self.read > MAX_PENDING:
            self._settle(full)
        else:
            self.pending = new

    def _settle(self, full: str) -> None:
        """Commit the pending tokens but the last HOLD if no character spans that point (see MAX_PENDING)."""
        end = len(self.tokens) - HOLD
        upto = self._decode(self.prefix, end)
        if len(upto) >= len(self.head) and full.startswith(upto):
            self._commit(end, upto[len(self.head):])
            self.pending = full[len(upto):]
        else:
            self.pending = full[len(self.head):]

    def _commit(self, end: int, text: str) -> None:
        """``tokens[read:end]`` read ``text`` for good: they become the last piece (the window
        starts at the old ``read``, unless a byte-fallback or skipped token is there)."""
        self.pieces.append(text)
        self.committed += len(text)
        if self.tokens[self.read] not in self.glue:
            self.prefix = self.read
        self.read = end
        self.head = self._decode(self.prefix, self.read)

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.lru_cache(maxsize=8)
def _glued(tokenizer) -> frozenset[int]:
    """Tokens a window must not start at: SentencePiece's byte-fallback pieces (``<0xE2>``) and the
    special tokens that decoding skips. The decoder turns a run of them into text as a whole (a
    character's bytes, or one U+FFFD per byte when the run is not valid UTF-8), so the window holds
    the whole run. None for a tokenizer without byte pieces (byte-level BPE: each character on its own)."""
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return frozenset()
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_ids = {i for i, piece in enumerate(pieces) if isinstance(piece, str) and BYTE_PIECE.fullmatch(piece)}
    return frozenset(byte_ids | set(tokenizer.all_special_ids)) if byte_ids else frozenset()
