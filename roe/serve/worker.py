"""The worker: the one thread that owns the model, fed by a bounded queue of jobs run in batches.

A request becomes one ``Job`` per choice. The worker takes the oldest job plus every queued job
with the same RoE and sampling settings (up to ``max_batch``) and runs them as one left-padded
``Roster.generate`` batch, sending each step's token back through the job's ``emit``.
"""

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

import roe
from roe.config import RoEConfig
from roe.serve.protocol import ApiError, Sampling, ServeConfig

log = logging.getLogger("roe.serve")


@dataclass(eq=False)
class Job:
    """One choice of one request: a prompt and the settings its batch must share."""

    key: tuple
    cfg: RoEConfig
    sampling: Sampling
    prompt_ids: list[int]
    max_tokens: int
    index: int
    # thread-safe: ("token", index, (id, logprobs or None)) / ("end", index, None) / ("error", index, message)
    emit: Callable[[tuple], None]
    top_logprobs: int | None = None
    cancelled: bool = False


class _Abandoned(Exception):
    """Every job of the running batch has been answered or given up; stop decoding."""


def run_batch(model, tokenizer, jobs: list[Job], pad_id: int) -> None:
    """One left-padded ``Roster.generate`` over jobs with the same key, tokens sent as they come."""
    width = max(len(job.prompt_ids) for job in jobs)
    ids_BS = torch.full((len(jobs), width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(jobs), width), dtype=torch.long)
    for b, job in enumerate(jobs):
        ids_BS[b, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
        mask_BS[b, width - len(job.prompt_ids):] = 1

    def on_step(chosen_B: torch.Tensor, logprobs_BV: torch.Tensor) -> None:
        if all(job.cancelled for job in jobs):
            raise _Abandoned
        for b, (job, token) in enumerate(zip(jobs, chosen_B.tolist())):
            info = None
            if job.top_logprobs is not None:
                top = logprobs_BV[b].topk(job.top_logprobs) if job.top_logprobs else None
                info = (logprobs_BV[b, token].item(),
                        list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [])
            job.emit(("token", job.index, (token, info)))

    s = jobs[0].sampling
    with roe.roster(model, jobs[0].cfg) as r:
        try:
            r.generate(ids_BS, mask_BS, max_new_tokens=max(job.max_tokens for job in jobs), do_sample=s.do_sample,
                       temperature=s.temperature, top_p=s.top_p, stop_strings=list(s.stop) or None,
                       tokenizer=tokenizer, pad_token_id=pad_id, on_step=on_step)
        except _Abandoned:
            pass
    for job in jobs:
        job.emit(("end", job.index, None))


class Worker:
    """The thread that owns the model, fed by a bounded queue of jobs grouped into batches."""

    def __init__(self, model, tokenizer, cfg: ServeConfig, pad_id: int) -> None:
        self.model, self.tokenizer, self.cfg, self.pad_id = model, tokenizer, cfg, pad_id
        self.queue: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.batches = self.submitted = 0
        self.thread = threading.Thread(target=self._run, name="roe-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self.cond:
            if self.closing:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self.queue) + len(jobs) > self.cfg.max_queue:
                raise ApiError(429, f"the request queue is full ({self.cfg.max_queue}); retry later",
                               type="rate_limit_error", code="queue_full")
            self.queue.extend(jobs)
            self.submitted += len(jobs)
            self.cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued and running job, then stop."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def next_batch(self) -> list[Job] | None:
        """The oldest live job and the queued jobs sharing its key (up to max_batch); None when closed."""
        with self.cond:
            while True:
                while self.queue and self.queue[0].cancelled:
                    self.queue.popleft()
                if self.queue:
                    break
                if self.closing:
                    return None
                self.cond.wait()
            first = self.queue.popleft()
            batch = [first] + [job for job in self.queue if job.key == first.key and not job.cancelled]
            batch = batch[: self.cfg.max_batch]
            taken = set(map(id, batch))
            self.queue = deque(job for job in self.queue if id(job) not in taken)
            return batch

    def _run(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        while (batch := self.next_batch()) is not None:
            try:
                run_batch(self.model, self.tokenizer, batch, self.pad_id)
            except Exception as err:  # a failed batch must not kill the worker
                log.exception("batch failed")
                for job in batch:
                    job.emit(("error", job.index, f"generation failed: {type(err).__name__}: {err}"))
            self.batches += 1
