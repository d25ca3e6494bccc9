"""The serving worker schedules by decode step (issue 17 items 5 and 6).

The story: the worker once ran each batch to completion, so one costly request held the only
worker and a 12-token request sent a second later waited 59.6 s; a cancelled job kept its batch
computing. Now jobs join running groups between steps, groups share the worker's time, and a
cancelled job leaves before the next step. Every job still gets the tokens it gets alone.
"""

import threading
import time
from dataclasses import replace

import pytest
import torch

import roe
from roe import stopping
from roe.serve.protocol import Sampling, ServeConfig
from roe.serve.worker import Job, Worker
from tests.conftest import tiny_olmoe, tiny_tokenizer
from tests.test_stopping import Spy

GREEDY = Sampling(False, 1.0, 1.0, ())
SAMPLED = Sampling(True, 1.3, 0.9, ())
LONG = 200  # tokens of the long job: prompt + LONG fits the tiny model's 256 positions


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A tiny OLMoE without an eos token, so the long job really runs ``LONG`` steps."""
    lm = tiny_olmoe()
    lm.generation_config.eos_token_id = None
    return lm


class Sink:
    """A job's ``emit``: records events (from the worker thread) and when the job ended."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.done = threading.Event()

    def __call__(self, event: tuple) -> None:
        self.events.append(event)
        if event[0] in ("end", "error", "invalid"):
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [value[0] for kind, _, value in self.events if kind in ("token", "end")]


def job(prompt: list[int], max_tokens: int, *, roster_size: int = 4, seed: int = 0, sampling: Sampling = GREEDY,
        top_logprobs: int | None = None, experts_per_token: int | None = None) -> Job:
    cfg = roe.RoEConfig(roster_size=roster_size, tau=1.5, skip_first=0, skip_last=0, seed=seed,
                        experts_per_token=experts_per_token)
    return Job((), cfg, sampling, prompt, max_tokens, 0, Sink(), top_logprobs)


def solo(model, one: Job) -> list[int]:
    """The tokens ``one`` gets from ``Roster.generate`` alone."""
    with roe.roster(model, one.cfg) as r:
        out = r.generate(torch.tensor([one.prompt_ids]), max_new_tokens=one.max_tokens,
                         do_sample=one.sampling.do_sample, temperature=one.sampling.temperature,
                         top_p=one.sampling.top_p)
    return out[0, len(one.prompt_ids):].tolist()


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def worker(model):
    w = Worker(model, tiny_tokenizer(), ServeConfig(max_batch=4, threads=1), pad_id=0)
    w.start()
    yield w
    w.close(timeout=120)
    assert not w.thread.is_alive()


def test_a_short_job_does_not_wait_for_a_long_one(model, worker):
    """Short jobs sent while a long one runs finish after a few steps of it, not after it: one
    with other roster settings (its own group; it also dials experts_per_token, which must not
    reach the long job's forwards), one with the long one's settings and another seed (it joins
    the running forward). Each gets its solo tokens, and so does the long one."""
    long = job([5, 6, 7, 8], LONG)
    worker.submit([long])
    wait_for(lambda: len(long.emit.tokens) >= 3)
    short = [job([9, 10], 6, roster_size=2, seed=1, experts_per_token=1),
             job(list(range(20, 31)), 6, seed=2, sampling=SAMPLED)]
    for one in short:
        before = len(long.emit.tokens)
        worker.submit([one])
        assert one.emit.done.wait(120)
        assert not long.emit.done.is_set()
        assert len(long.emit.tokens) - before <= 3 * one.max_tokens, (len(long.emit.tokens), before)
    assert long.emit.done.wait(300)
    worker.close(timeout=120)
    for one in [long, *short]:
        assert one.emit.events[-1][0] == "end" and one.steps == one.max_tokens
        assert one.emit.tokens == solo(model, one)


def test_a_cancelled_job_stops_computing_at_once(worker):
    """Of two jobs sharing a group, the cancelled one gets no step after the next one; the other
    keeps going. A job cancelled while queued never runs."""
    kept, dropped = job([5, 6, 7], LONG), job([8, 9], LONG, seed=3)
    worker.submit([kept, dropped])
    wait_for(lambda: len(dropped.emit.tokens) >= 3)
    dropped.cancelled = True
    at_cancel = len(dropped.emit.tokens)
    wait_for(lambda: len(kept.emit.tokens) >= at_cancel + 20)
    assert len(dropped.emit.tokens) <= at_cancel + 1 and dropped.steps == len(dropped.emit.tokens)
    never = job([4, 4], 5, roster_size=3)
    never.cancelled = True
    worker.submit([never])
    kept.cancelled = True
    wait_for(lambda: not worker.groups)
    assert never.steps == 0 and not never.emit.events


def test_a_failing_job_answers_an_error_and_the_others_go_on(worker, monkeypatch):
    """A prompt the model cannot embed (prefill fails) and a group whose step raises: their jobs
    get an error, the running job is not disturbed, and the worker keeps serving."""
    import roe.serve.worker as worker_module

    class Failing(worker_module.Decoding):
        def step(self):
            if self.roster.cfg.roster_size == 3:
                raise RuntimeError("boom")
            return super().step()

    monkeypatch.setattr(worker_module, "Decoding", Failing)
    long = job([5, 6, 7], LONG)
    worker.submit([long])
    wait_for(lambda: len(long.emit.tokens) >= 2)
    bad_prompt, bad_step = job([5, 100_000], 4, roster_size=2), job([5, 6], 4, roster_size=3)
    worker.submit([bad_prompt, bad_step])
    assert bad_prompt.emit.done.wait(60) and bad_step.emit.done.wait(60)
    assert not long.emit.done.is_set()
    assert bad_prompt.emit.events[-1][0] == "error" and "boom" in bad_step.emit.events[-1][2]
    after = job([5, 6], 3, roster_size=2)
    worker.submit([after])
    assert after.emit.done.wait(60) and after.emit.events[-1][0] == "end" and worker.thread.is_alive()
    assert long.emit.done.wait(300) and long.emit.events[-1][0] == "end"


def test_logprobs_and_stop_strings_per_job(model, worker):
    """A job's logprobs are those of its own row; a stop string ends only its own job."""
    tokenizer = tiny_tokenizer()
    plain = job([5, 6, 7], 8, top_logprobs=2)
    worker.submit([plain])
    assert plain.emit.done.wait(60)
    text = tokenizer.decode(plain.emit.tokens, skip_special_tokens=True)
    stopped = replace(job([5, 6, 7], 8), sampling=Sampling(False, 1.0, 1.0, (text[-3:],)), emit=Sink())
    other = job([5, 6, 7], 8, seed=9)
    worker.submit([stopped, other])
    assert stopped.emit.done.wait(60) and other.emit.done.wait(60)
    assert stopped.emit.tokens == plain.emit.tokens[:len(stopped.emit.tokens)]
    assert text[-3:] in tokenizer.decode(stopped.emit.tokens) and len(other.emit.tokens) == 8
    infos = [value[1] for kind, _, value in plain.emit.events if kind in ("token", "end")]
    assert all(len(top) == 2 and top[0][1] >= top[1][1] and logprob <= top[0][1] + 1e-6 for logprob, top in infos)


def test_stop_strings_cost_a_bounded_decode_per_step(model):
    """The worker once decoded a job's whole text at every step to look for its stop strings
    (LONG tokens at the last step); a decode now holds a bounded window, and the job gets its
    solo tokens."""
    spy = Spy(tiny_tokenizer())
    w = Worker(model, spy, ServeConfig(max_batch=4, threads=1), pad_id=0)
    w.start()
    long = replace(job([5, 6, 7], LONG), sampling=Sampling(False, 1.0, 1.0, ("never in the text",)))
    w.submit([long])
    try:
        assert long.emit.done.wait(300)
    finally:
        w.close(timeout=120)
    assert long.emit.tokens == solo(model, long)
    assert max(spy.lengths) <= stopping.WINDOW and len(spy.lengths) <= 3 * LONG


def test_settings_the_model_cannot_run_are_the_requests_fault(worker):
    """A roster the model refuses (here more experts per token than it has; the server's parser
    refuses that before, but some refusals need the roster built) answers "invalid" (a 400), not
    the server's "error" (a 500), and the worker goes on."""
    bad, good = job([5, 6], 3, experts_per_token=99), job([5, 6], 3)
    worker.submit([bad, good])
    assert bad.emit.done.wait(120) and good.emit.done.wait(120)
    assert [kind for kind, _, _ in bad.emit.events] == ["invalid"]
    assert "experts_per_token=99" in bad.emit.events[0][2]
    assert len(good.emit.tokens) == 3
