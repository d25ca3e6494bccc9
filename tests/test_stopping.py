"""Stop conditions checked once per step on a bounded tail of the text (roe/stopping.py).

The story: ``generate`` and the server's worker each re-decoded a row's whole continuation at
every step to look for stop strings, so a row of n tokens decoded n^2 / 2 tokens, and
``generate`` re-stacked every new token for it. ``StopState`` decodes a bounded window; these
tests hold it to the old definition (the whole decode contains a stop string) at the same step,
on the cases a window gets wrong: a stop string across tokens, a character whose bytes arrive in
several tokens (U+FFFD until complete), SentencePiece's leading space and byte fallback.
"""

import random

import pytest
import torch

import roe
from roe import stopping
from roe.stopping import StopConditions
from tests.conftest import tiny_olmoe, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def sentencepiece_tokenizer():
    """A Llama-style tokenizer: ``▁`` for spaces, ``<0xNN>`` byte-fallback pieces, one leading space stripped."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "▁the", "▁caf", "é", "▁na", "ïve", "▁.", ".", "▁to", "▁be", ",", "▁€", "a", "b"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte_level": tiny_tokenizer, "sentencepiece": sentencepiece_tokenizer}


class Spy:
    """A tokenizer that records how many tokens each decode call is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def decode(self, ids, **kwargs) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, rows, **kwargs) -> list[str]:
        return [self.decode(row, **kwargs) for row in rows]


def whole_decode_hit(tokenizer, tokens: list[int], strings: tuple[str, ...]) -> int | None:
    """The old definition: the first step whose whole decoded continuation contains a stop string."""
    for n in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        if any(s in text for s in strings):
            return n
    return None


def incremental_hit(tokenizer, tokens: list[int], strings: tuple[str, ...]) -> int | None:
    state = StopConditions(max_new_tokens=len(tokens) + 1, strings=strings, tokenizer=tokenizer).start()
    return next((n for n, token in enumerate(tokens, 1) if state.update(token) == "stop"), None)


def ids(tokenizer, pieces: list[str]) -> list[int]:
    return tokenizer.convert_tokens_to_ids(pieces)


def random_stream(tokenizer, rng: random.Random, n: int) -> list[int]:
    """Words with multi-byte characters, runs of bytes that start or continue a character (and
    may never complete one), random tokens and skipped special tokens."""
    partial = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd"]
    tokens = []
    while len(tokens) < n:
        draw = rng.random()
        if draw < 0.3:
            tokens += tokenizer.encode(rng.choice(["the", " to", " é", "€", "😀", " .", "ζ"]), add_special_tokens=False)
        elif draw < 0.6:
            tokens += [rng.choice(partial) for _ in range(rng.randrange(1, 12))]
        elif draw < 0.95:
            tokens.append(rng.randrange(len(tokenizer)))
        else:
            tokens.append(tokenizer.all_special_ids[0])
    return tokens[:n]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_the_first_hit_is_the_whole_decodes(name):
    """On random streams, stop strings taken from the stream's own final text (so most are hit,
    often across tokens and characters, some made of U+FFFD) and strings never found."""
    tokenizer, rng = TOKENIZERS[name](), random.Random(0)
    hits = 0
    for _ in range(150):
        tokens = random_stream(tokenizer, rng, rng.randrange(1, 120))
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        starts = [rng.randrange(len(text)) if text else 0 for _ in range(rng.randrange(1, 3))]
        strings = tuple(text[a:a + rng.randrange(1, 6)] or "x" for a in starts)
        if rng.random() < 0.2:
            strings = ("never in the text",)
        expected = whole_decode_hit(tokenizer, tokens, strings)
        assert incremental_hit(tokenizer, tokens, strings) == expected, (tokens, strings)
        hits += expected is not None
    assert 100 < hits < 150


def test_a_stop_string_across_tokens():
    """"e, o" is the end of " be", "," and the start of " or": found at " or", not before (no
    token's own text holds it)."""
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.encode("To be, or not", add_special_tokens=False)
    assert [tokenizer.decode([t]) for t in tokens[:4]] == ["To", " be", ",", " or"]
    assert incremental_hit(tokenizer, tokens, ("e, o",)) == 4 == whole_decode_hit(tokenizer, tokens, ("e, o",))
    assert incremental_hit(tokenizer, tokens, ("To be, or not",)) == len(tokens)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_stop_string_inside_a_multibyte_character(name):
    """"é" is two byte tokens: the text after the first is U+FFFD, so "é" stops at the second
    token, not the first, and a stop string of U+FFFD itself (the whole decode's view) at the first."""
    tokenizer = TOKENIZERS[name]()
    pieces = ["Ã", "©", "!"] if name == "byte_level" else ["<0xC3>", "<0xA9>", "<0x21>"]
    tokens = ids(tokenizer, pieces) + tokenizer.encode(" the", add_special_tokens=False)
    assert tokenizer.decode(tokens[:1]) == "\ufffd" and tokenizer.decode(tokens[:2]) == "é"
    assert incremental_hit(tokenizer, tokens, ("é",)) == 2 == whole_decode_hit(tokenizer, tokens, ("é",))
    assert incremental_hit(tokenizer, tokens, ("é!",)) == 3
    assert incremental_hit(tokenizer, tokens, ("\ufffd",)) == 1 == whole_decode_hit(tokenizer, tokens, ("\ufffd",))


def test_sentencepiece_leading_space_is_kept_between_windows():
    """Decoding a window alone strips its first piece's space; the stop string " the" must still be seen."""
    tokenizer = sentencepiece_tokenizer()
    tokens = ids(tokenizer, ["▁to", "▁be", "▁the", ",", "▁the"])
    assert tokenizer.decode(tokens[2:3]) == "the"
    assert incremental_hit(tokenizer, tokens, ("be the",)) == 3 == whole_decode_hit(tokenizer, tokens, ("be the",))
    assert incremental_hit(tokenizer, tokens, (", the",)) == 5


def test_a_byte_fallback_run_is_read_whole():
    """SentencePiece reads a run of byte pieces as one: when it is not valid UTF-8, every byte of it
    becomes U+FFFD, the space byte read before included, so the window must not start inside it."""
    tokenizer = sentencepiece_tokenizer()
    tokens = ids(tokenizer, ["▁to", ".", "<0x20>", "<0xE2>", "▁be"])
    assert tokenizer.decode(tokens[:3]) == "to. " and tokenizer.decode(tokens[:4]) == "to.\ufffd\ufffd"
    stop = (".\ufffd\ufffd",)
    assert incremental_hit(tokenizer, tokens, stop) == 4 == whole_decode_hit(tokenizer, tokens, stop)


def test_eos_comes_first_then_stop_strings_then_length():
    tokenizer = tiny_tokenizer()
    to = tokenizer.convert_tokens_to_ids("To")
    state = StopConditions(max_new_tokens=2, eos={to}, strings=("To",), tokenizer=tokenizer).start()
    assert state.update(to) == "eos"
    state = StopConditions(max_new_tokens=1, strings=("To",), tokenizer=tokenizer).start()
    assert state.update(to) == "stop" and state.generated == 1
    state = StopConditions(max_new_tokens=2, strings=("zz",), tokenizer=tokenizer).start()
    assert [state.update(to), state.update(to)] == [None, "length"]
    with pytest.raises(ValueError, match="tokenizer"):
        StopConditions(max_new_tokens=2, strings=("x",))
    with pytest.raises(ValueError, match="max_new_tokens"):
        StopConditions(max_new_tokens=0)


def test_a_long_stream_decodes_a_bounded_window():
    """1000 byte-level tokens, a third of them partial characters: no decode holds more than
    WINDOW tokens, and a step makes at most 3 decode calls."""
    spy = Spy(tiny_tokenizer())
    tokens = random_stream(spy.tokenizer, random.Random(1), 1000)
    state = StopConditions(max_new_tokens=2000, strings=("never in the text",), tokenizer=spy).start()
    assert not any(state.update(token) for token in tokens)
    assert max(spy.lengths) <= stopping.WINDOW and len(spy.lengths) <= 3 * len(tokens)


def byte_level_tokenizer(*merged: bytes):
    """A byte-level BPE of the 256 bytes and the given multi-byte tokens (decoding only)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char = bytes_to_unicode()
    vocab = {"<|endoftext|>": 0, **{char[b]: 1 + b for b in range(256)}}
    vocab.update({"".join(char[b] for b in piece): 257 + i for i, piece in enumerate(merged)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("before", range(60, 65))
def test_bytes_that_never_make_a_character_do_not_grow_the_window(before):
    """Lone continuation bytes (each a final U+FFFD, so the pending text always ends in one) with an
    "é" inside the run, completed by a token that also holds a stray byte (at each offset, so that
    once the window would cut "é" in two): the window stays bounded, "é" stays whole, and it is
    found at its second byte."""
    spy = Spy(byte_level_tokenizer(b"\xa9\x80"))
    stray, c3, a9_stray, bang = 1 + 0x80, 1 + 0xC3, 257, 1 + ord("!")
    tokens = [stray] * before + [c3, a9_stray] + [stray] * 30 + [bang]
    stop = ("\ufffdé",)
    assert incremental_hit(spy, tokens, stop) == before + 2 == whole_decode_hit(spy.tokenizer, tokens, stop)
    spy.lengths.clear()
    stop = ("é" + "\ufffd" * 31 + "!",)
    assert incremental_hit(spy, tokens, stop) == len(tokens) == whole_decode_hit(spy.tokenizer, tokens, stop)
    assert max(spy.lengths) <= stopping.WINDOW


def test_generate_decodes_a_bounded_window_per_step():
    """The per-step cost of stop strings does not grow with the length generated (the old
    check decoded all n tokens at step n: 120 at the last step here)."""
    model, spy = tiny_olmoe(), Spy(tiny_tokenizer())
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([[5, 6, 7]])
    per_step, seen = [], [0]

    def count(_):
        per_step.append(sum(spy.lengths[seen[0]:]))
        seen[0] = len(spy.lengths)

    with roe.roster(model, roe.RoEConfig(roster_size=2, tau=1.0, skip_first=0, skip_last=0)) as r:
        out = r.generate(prompt, max_new_tokens=120, stop_strings=["never in the text"], tokenizer=spy, callback=count)
    assert out.shape[1] == 3 + 120 and len(per_step) == 120
    assert max(per_step) <= 3 * stopping.WINDOW < 120


def test_generate_stops_where_the_whole_decode_first_shows_the_string():
    """Two prompts, a stop string from the first's free continuation: it stops at the step the
    old whole-decode check stopped it, padded after; the second runs on unchanged."""
    model, tokenizer = tiny_olmoe(), tiny_tokenizer()
    model.generation_config.eos_token_id = None
    prompts = torch.tensor([[5, 6, 7], [9, 8, 7]])
    cfg = roe.RoEConfig(roster_size=3, tau=1.0, skip_first=0, skip_last=0)
    with roe.roster(model, cfg) as r:
        free = r.generate(prompts, max_new_tokens=24, pad_token_id=0)
        text = tokenizer.decode(free[0, 3:].tolist(), skip_special_tokens=True)
        stop = (text[10:13],)
        assert stop[0] not in tokenizer.decode(free[1, 3:].tolist(), skip_special_tokens=True)
        stopped = r.generate(prompts, max_new_tokens=24, pad_token_id=0, stop_strings=stop, tokenizer=tokenizer)
    n = whole_decode_hit(tokenizer, free[0, 3:].tolist(), stop)
    assert n is not None and n < 24
    assert stopped[0, 3:3 + n].tolist() == free[0, 3:3 + n].tolist() and not stopped[0, 3 + n:].any()
    assert torch.equal(stopped[1], free[1])
