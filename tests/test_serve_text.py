"""A choice's text in the server (roe/serve/text.py ``ChoiceText``), streamed incrementally.

The story: the worker checked stop strings on a bounded tail of the text, but the request's
``ChoiceText`` still decoded the whole text at every token, again for each streamed delta and
once per token for logprobs' offsets, and searched the stop strings a second time: per choice,
the event loop's work grew with the square of the length. Now the worker's last event says why
the row ended and where the stop string starts, and the text is decoded once, incrementally.
These tests hold it to the old whole-decode definition event for event (the same deltas, text,
finish and offsets), streamed and not, and count its decoding work.
"""

import asyncio
import random
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from roe import stopping
from roe.serve.app import Service
from roe.serve.protocol import Sampling, ServeConfig
from roe.serve.text import ChoiceText
from roe.serve.worker import Job, Worker
from roe.stopping import StopConditions
from tests.conftest import tiny_olmoe, tiny_tokenizer
from tests.test_stopping import TOKENIZERS, Spy, random_stream

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class WholeDecodeChoice:
    """The old ``ChoiceText`` (its streaming fixed), the definition: every question answered from
    the whole decode at every token."""

    tokenizer: object
    eos: frozenset
    stop: tuple[str, ...]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    sent: int = 0

    def add(self, token: int) -> None:
        if token in self.eos:
            self.finish = "stop"
            return
        self.tokens.append(token)
        if self.stop and any(s in self.decode(len(self.tokens)) for s in self.stop):
            self.finish = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish = "length"

    def decode(self, k: int) -> str:
        return self.tokenizer.decode(self.tokens[:k], skip_special_tokens=True)

    def text(self) -> str:
        text = self.decode(len(self.tokens))
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def covered(self, chars: int) -> int:
        k = len(self.tokens)
        while k and len(self.decode(k)) > chars:
            k -= 1
        return k

    def delta(self) -> str:
        """(The old one held the stop strings' length back from the very end, then dropped trailing
        U+FFFD, and so streamed the "é" of "café" before the stop string "é€" was complete.)"""
        text = self.text()
        safe = len(text)
        if not self.finish:
            safe = len(text.rstrip("\ufffd")) - max((len(s) - 1 for s in self.stop), default=0)
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent : safe], safe
        return piece


def worker_events(tokenizer, tokens: list[int], *, stop=(), eos=frozenset(), max_tokens=10_000):
    """The events ``Worker._step`` sends a job generating ``tokens`` (its ``StopState`` decides the end)."""
    state = StopConditions(max_new_tokens=max_tokens, eos=eos, strings=stop, tokenizer=tokenizer).start()
    for token in tokens:
        info = (-1.0, [(token, -1.0)])
        if finish := state.update(token):
            yield "end", (token, info, finish, state.cut)
            return
        yield "token", (token, info)


def feed(choice: ChoiceText, kind: str, value: tuple) -> None:
    choice.add(*value) if kind == "token" else choice.end(*value)


def random_case(tokenizer, rng: random.Random):
    """A random stream and its request: stop strings from its own text (across tokens, often
    with U+FFFD or multi-byte characters), sometimes an eos token, sometimes a smaller max_tokens."""
    tokens = random_stream(tokenizer, rng, rng.randrange(1, 200))
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = tuple(text[a : a + rng.randrange(1, 6)] or "x" for a in
                 [rng.randrange(len(text)) if text else 0 for _ in range(rng.randrange(0, 3))])
    eos = frozenset([tokens[rng.randrange(len(tokens))]]) if rng.random() < 0.2 else frozenset()
    max_tokens = rng.randrange(1, len(tokens) + 1) if rng.random() < 0.2 else len(tokens)
    return tokens, stop, eos, max_tokens


@pytest.mark.parametrize("name", TOKENIZERS)
def test_every_event_streams_what_the_whole_decode_streams(name):
    """On random streams of up to 200 tokens (byte-level and SentencePiece), after every event:
    the delta the whole-decode definition streams; at the end the same text, finish reason,
    logprobs' covered tokens and text offsets, and (byte-level, whose decoded text only grows)
    the streamed pieces join to the text."""
    tokenizer, rng = TOKENIZERS[name](), random.Random(0)
    finishes = set()
    for _ in range(60):
        tokens, stop, eos, max_tokens = random_case(tokenizer, rng)
        old, new, streamed = WholeDecodeChoice(tokenizer, eos, stop, max_tokens), ChoiceText(tokenizer, stop), ""
        for kind, value in worker_events(tokenizer, tokens, stop=stop, eos=eos, max_tokens=max_tokens):
            old.add(value[0])
            feed(new, kind, value)
            piece = new.delta()
            assert piece == old.delta(), (tokens, stop)
            streamed += piece
        assert (new.text(), new.finish, new.tokens) == (old.text(), old.finish, old.tokens), (tokens, stop)
        assert new.ends == [len(old.decode(k)) for k in range(len(old.tokens) + 1)]
        assert [new.covered(c) for c in range(len(new.text()) + 2)] == [old.covered(c) for c in
                                                                        range(len(old.text()) + 2)]
        if name == "byte_level":
            assert streamed == new.text(), (tokens, stop)
        finishes.add((new.finish, new.cut is not None))
    assert finishes == {("stop", True), ("stop", False), ("length", False)}


def multibyte_stream(tokenizer, n: int) -> list[int]:
    """About ``n`` tokens of byte-level text: words with 2-, 3- and 4-byte characters (split into
    byte tokens by the tiny vocabulary) always after a space, then an ending where "é€" and
    "😀ζ" occur once, each across two tokens."""
    words = ["naïve", " café", " €", " 😀", " ζῷον", " to", " be,", " or", " not", "."]
    rng, tokens = random.Random(2), []
    while len(tokens) < n:
        tokens += tokenizer.encode(rng.choice(words), add_special_tokens=False)
    return tokens + tokenizer.encode(" café€ 😀ζῷον to be", add_special_tokens=False)


def streamed_and_whole(tokenizer, events, stop) -> tuple[str, ChoiceText]:
    """The app's consumer (``Service.updates``) on ``events``: the streamed text, and the choice
    (whose ``text()`` is the non-streamed answer)."""
    choice = ChoiceText(tokenizer, stop)

    async def run() -> str:
        queue = asyncio.Queue()
        for kind, value in events:
            queue.put_nowait((kind, 0, value))
        service = SimpleNamespace(cfg=SimpleNamespace(timeout=60.0))  # all that ``updates`` reads
        return "".join([piece async for _, piece, _ in Service.updates(service, [choice], queue)])

    return asyncio.run(run()), choice


def whole_decode_answer(tokenizer, tokens: list[int], stop: tuple[str, ...]) -> tuple[str, int]:
    """The old definition: the first n whose whole decode holds a stop string, cut at the first one."""
    for n in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        if cuts := [text.find(s) for s in stop if s in text]:
            return text[: min(cuts)], n
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


@pytest.mark.parametrize("stop", [(), ("é€", "è"), ("😀ζ",)])
def test_streamed_equals_non_streamed_on_long_multibyte_output(stop):
    """About 1200 tokens of multi-byte text through the app's consumer: the streamed pieces join
    to the non-streamed text, which is the whole decode cut at a stop string that spans two
    tokens and holds a multi-byte character (a 4-byte one, over four byte tokens, in "😀ζ")."""
    tokenizer = tiny_tokenizer()
    tokens = multibyte_stream(tokenizer, 1200)
    events = list(worker_events(tokenizer, tokens, stop=stop, max_tokens=len(tokens)))
    streamed, choice = streamed_and_whole(tokenizer, events, stop)
    want, n = whole_decode_answer(tokenizer, tokens, stop)
    assert streamed == choice.text() == want and len(choice.tokens) == n
    assert choice.finish == ("stop" if stop else "length") and "\ufffd" not in streamed
    assert len(want) > 1000 and any(ord(ch) > 0xFFFF for ch in want)
    if stop:
        assert n < len(tokens) and want.endswith(" caf" if "é€" in stop else " café€ ")
        assert not any(s in tokenizer.decode(tokens[n - 1 : n]) for s in stop)  # no single token holds it


def test_a_choice_decodes_a_bounded_window_per_token():
    """1000 tokens with logprobs, streamed as the app streams them (an event, then ``delta``, then
    ``logprobs`` up to what was sent) and not (the events, then ``text`` and ``logprobs``): no
    token costs more than a few windows of decoding (the old ``ChoiceText`` decoded all n tokens
    at least twice at token n), and the finished answer costs no decode at all (the old one
    decoded every prefix for the text offsets)."""
    spy = Spy(tiny_tokenizer())
    tokens = random_stream(spy.tokenizer, random.Random(3), 1000)
    stop = ("never in the text",)
    streamed, whole, per_token = ChoiceText(spy, stop), ChoiceText(spy, stop), []
    for kind, value in worker_events(spy.tokenizer, tokens, stop=stop, max_tokens=len(tokens)):
        before = len(spy.lengths)
        feed(streamed, kind, value)
        if streamed.delta():
            streamed.logprobs(chat=True, upto=streamed.sent)
        feed(whole, kind, value)
        per_token.append(sum(spy.lengths[before:]))
    assert len(per_token) == 1000 and streamed.finish == whole.finish == "length"
    assert max(per_token) <= 2 * 3 * stopping.WINDOW < 1000
    before = len(spy.lengths)
    assert whole.text() == streamed.text() == spy.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(whole.logprobs(chat=False)["text_offset"]) == 1000 == streamed.infos_sent
    assert len(spy.lengths) == before


class Collect:
    """A job's ``emit`` (from the worker thread): its events, and whether the last has come."""

    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, event: tuple) -> None:
        self.events.append(event)
        if event[0] != "token":
            self.done.set()


def test_the_workers_end_event_cuts_the_text_where_the_whole_decode_does():
    """A real worker, 200 tokens of a tiny random model (many byte tokens: partial and multi-byte
    characters), then a stop string taken from that output across two tokens: the job's last
    event is "end" with finish "stop" and the cut, and the choice's streamed and whole text are
    the whole decode cut there."""
    import roe

    tokenizer = tiny_tokenizer()
    model = tiny_olmoe(vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = None
    worker = Worker(model, tokenizer, ServeConfig(max_batch=4, threads=1), pad_id=0)
    worker.start()

    def run(stop: tuple[str, ...]) -> list[tuple]:
        cfg = roe.RoEConfig(roster_size=3, tau=1.5, skip_first=0, skip_last=0, seed=4)
        job = Job((), cfg, Sampling(False, 1.0, 1.0, stop), [5, 6, 7], 200, 0, Collect(), None)
        worker.submit([job])
        assert job.emit.done.wait(300)
        return [(kind, value) for kind, _, value in job.emit.events]

    try:
        free = run(())
        tokens = [value[0] for _, value in free]
        assert free[-1][0] == "end" and free[-1][1][2:] == ("length", None) and len(tokens) == 200
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        pieces = [tokenizer.decode([t]) for t in tokens]
        k = next(k for k in range(100, 199) if pieces[k].strip() and pieces[k + 1].strip()
                 and "\ufffd" not in pieces[k] + pieces[k + 1])
        stop = (pieces[k][-2:] + pieces[k + 1][:1],)  # the end of token k and the start of token k + 1
        stopped = run(stop)
    finally:
        worker.close(timeout=120)
    want, n = whole_decode_answer(tokenizer, tokens, stop)
    assert any(ord(ch) > 0x7F for ch in want) and n <= k + 2 and len(want) < len(text)
    assert [value[0] for _, value in stopped] == tokens[:n] and not any(s in pieces[n - 1] for s in stop)
    assert stopped[-1][0] == "end" and stopped[-1][1][2:] == ("stop", len(want))
    streamed, choice = streamed_and_whole(tokenizer, stopped, stop)
    assert streamed == choice.text() == want and choice.finish == "stop"
