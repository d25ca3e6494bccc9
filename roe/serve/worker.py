"""The worker: the one thread that owns the model, scheduling by decode step, not by request.

A request becomes one ``Job`` per choice, queued (429 beyond ``max_queue``). Before every decode
step the worker admits the queued jobs it has room for, drops the rows of cancelled jobs, then
runs ONE step of one live group and sends each of its jobs its token through ``emit``. A group
is a ``Decoding`` (roe/engine.py) of jobs with the same roster settings (roster size, schedule,
skips): their rows share each forward even when their seeds, sampling settings, prompt lengths
and start times differ, since a row's tokens do not depend on its batch-mates. Jobs whose roster
settings differ cannot share a forward, so the groups take turns: the group that has used the
least worker time runs next, and a new group starts level with the least. A short request thus
starts at the next step and gets its share of the worker from then on, instead of waiting for
the running requests to finish (or for many steps of a costly group). A row leaves its group
when it ends (eos, its ``max_tokens``, a stop string: checked here, once per step, on a bounded
tail of its text; its job's last event says which, and where the stop string starts) and,
before the next step, when its job is cancelled (the client went away). A step that fails
answers an error to its group's jobs only.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

import roe
from roe.config import RoEConfig
from roe.engine import Decoding, Row, model_eos
from roe.serve.protocol import ApiError, Sampling, ServeConfig
from roe.stopping import StopConditions

log = logging.getLogger("roe.serve")


@dataclass(eq=False)
class Job:
    """One choice of one request: a prompt, its RoE and sampling settings, and where its tokens go."""

    key: tuple
    cfg: RoEConfig
    sampling: Sampling
    prompt_ids: list[int]
    max_tokens: int
    index: int
    # thread-safe: ("token", index, (id, logprobs or None)) for a token of a row that goes on;
    # ("end", index, (id, logprobs or None, finish, cut)) for its last token and why it ended:
    # "eos" (the token is the eos), "stop" (``cut``: where the first stop string starts in the
    # decoded text), "length"; ("error" or "invalid", index, message)
    emit: Callable[[tuple], None]
    top_logprobs: int | None = None
    cancelled: bool = False
    steps: int = 0  # decode steps computed for this job (it stops growing once the job is cancelled)


class Group:
    """Jobs decoded together: one ``Decoding`` on a roster of their shared settings.

    NOTE: the roster is built for the group and never opened with ``with``: a roster used outside
    its block installs its router wrappers for each call (each prefill, each step) and removes
    them after, so the groups' rosters are never installed on the model together, and a roster
    that dials ``experts_per_token`` cannot touch another group's forwards. Building one is cheap:
    the model's analysis (routers and their self-tests, fan-out point, kernels; roe/analysis.py)
    is done once per model, not per group.
    """

    def __init__(self, model, settings: RoEConfig, busy: float) -> None:
        self.settings, self.decoding = settings, Decoding(roe.roster(model, settings))
        self.jobs: dict[int, tuple[Row, Job]] = {}  # id(row) -> (row, job)
        self.busy, self.steps = busy, 0  # worker seconds spent on this group (from its start level), steps run

    def admit(self, jobs: list[Job], eos: frozenset[int], tokenizer) -> None:
        """Prefill ``jobs`` into the group; each row ends at eos, a stop string of its job, or its ``max_tokens``."""
        rows = [Row(torch.tensor(job.prompt_ids), seed=job.cfg.seed,
                    stop=StopConditions(max_new_tokens=job.max_tokens, eos=eos, strings=job.sampling.stop,
                                        tokenizer=tokenizer),
                    do_sample=job.sampling.do_sample, temperature=job.sampling.temperature, top_p=job.sampling.top_p)
                for job in jobs]
        self.decoding.admit(rows)
        self.jobs.update({id(row): (row, job) for row, job in zip(rows, jobs, strict=True)})

    def drop_cancelled(self) -> None:
        gone = [row for row, job in self.jobs.values() if job.cancelled]
        self.decoding.drop(gone)
        for row in gone:
            del self.jobs[id(row)]


class Worker:
    """The thread that owns the model: admits queued jobs into groups and steps the groups in turn."""

    # NOTE: live groups at most; a job that needs another waits in the queue. Groups share the
    # worker's time, so this bounds how thin each share gets.
    max_groups = 8

    def __init__(self, model, tokenizer, cfg: ServeConfig, pad_id: int) -> None:
        self.model, self.tokenizer, self.cfg, self.pad_id = model, tokenizer, cfg, pad_id
        self.eos = model_eos(model)
        self.queue: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.batches = self.submitted = self.steps = 0
        self.groups: list[Group] = []
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

    def _run(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        with torch.no_grad():
            while (taken := self._take()) is not None:
                self._admit(taken)
                for group in list(self.groups):
                    group.drop_cancelled()
                    if not group.decoding.rows:
                        self._retire(group)
                if self.groups:
                    self._step(min(self.groups, key=lambda g: (g.busy, g.steps)))

    def _take(self) -> list[tuple[Group | None, RoEConfig, Job]] | None:
        """The queued jobs there is room for, in order, each with its group (None: a new one for its
        settings); waits while there is nothing to do; None once closed and drained."""
        with self.cond:
            while True:
                self.queue = deque(job for job in self.queue if not job.cancelled)
                if self.queue or self.groups:
                    break
                if self.closing:
                    return None
                self.cond.wait()
            room = {id(g): self.cfg.max_batch - len(g.decoding.rows) for g in self.groups}
            new: dict[RoEConfig, int] = {}  # settings -> rows taken into the new group for it
            taken = []
            while self.queue:
                job = self.queue[0]
                settings = replace(job.cfg, seed=0)  # rows carry their own seeds
                group = next((g for g in self.groups if g.settings == settings and room[id(g)] > 0), None)
                if group is not None:
                    room[id(group)] -= 1
                elif 0 < new.get(settings, 0) < self.cfg.max_batch:
                    new[settings] += 1
                elif len(self.groups) + len(new) < self.max_groups and settings not in new:
                    new[settings] = 1
                else:
                    break  # FIFO: a job that must wait holds back the ones behind it
                taken.append((group, settings, self.queue.popleft()))
            return taken

    def _admit(self, taken: list[tuple[Group | None, RoEConfig, Job]]) -> None:
        """Prefill the taken jobs into their groups (a new group for each new settings)."""
        by_group: dict[tuple, tuple[Group | None, RoEConfig, list[Job]]] = {}
        for group, settings, job in taken:
            key = ("running", id(group)) if group is not None else ("new", settings)
            by_group.setdefault(key, (group, settings, []))[2].append(job)
        for group, settings, jobs in by_group.values():
            try:
                if group is None:
                    level = min((g.busy for g in self.groups), default=0.0)
                    group = Group(self.model, settings, level)
                    self.groups.append(group)
                    self.batches += 1
                group.admit(jobs, self.eos, self.tokenizer)
            except ValueError as err:  # settings this model cannot run (found only by building the roster)
                self._fail(jobs, err, kind="invalid")
                if group is not None and not group.jobs:
                    self._retire(group)
            except Exception as err:  # a failed prefill answers its jobs, not the server
                log.exception("admission failed")
                self._fail(jobs, err)
                if group is not None and not group.jobs:
                    self._retire(group)

    def _step(self, group: Group) -> None:
        """One decode step of ``group``: each job gets its token; finished rows leave."""
        start = time.perf_counter()
        try:
            step = group.decoding.step()
        except Exception as err:  # a failed step answers its group's jobs, not the server
            log.exception("decode step failed")
            self._fail([job for _, job in group.jobs.values()], err)
            self._retire(group)
            return
        group.busy += time.perf_counter() - start
        group.steps += 1
        self.steps += 1
        for row, token, logprobs_V in zip(step.rows, step.tokens_R.tolist(), step.logprobs_RV, strict=True):
            _, job = group.jobs[id(row)]
            job.steps += 1
            value = (token, _logprob_info(job, token, logprobs_V))
            # NOTE: the finish travels with the last token: the request never streams that token's
            # text before it knows where a stop string cuts it.
            if row.finish:
                del group.jobs[id(row)]
                job.emit(("end", job.index, (*value, row.finish, row.progress.cut)))
            else:
                job.emit(("token", job.index, value))
        if not group.decoding.rows:
            self._retire(group)

    def _fail(self, jobs: list[Job], err: Exception, kind: str = "error") -> None:
        """Answer ``jobs`` with ``err``: kind "error" is the server's failure, "invalid" the request's."""
        message = (f"generation failed: {type(err).__name__}: {err}" if kind == "error"
                   else f"invalid RoE settings: {err}")
        for job in jobs:
            job.emit((kind, job.index, message))

    def _retire(self, group: Group) -> None:
        self.groups.remove(group)


def _logprob_info(job: Job, token: int, logprobs_V: torch.Tensor):
    """(the token's log-prob, [(id, log-prob) of the most likely]) when the job asked for logprobs."""
    if job.top_logprobs is None:
        return None
    top = logprobs_V.topk(job.top_logprobs) if job.top_logprobs else None
    return logprobs_V[token].item(), list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
