"""roe serve: an OpenAI-compatible HTTP server (completions, chat completions, streaming) over RoE.

One worker thread owns the model. A request is validated on the event loop, becomes one ``Job``
per choice, and waits in a bounded queue (429 when full). The worker takes the oldest job plus
every queued job with the same RoE and sampling settings (up to ``max_batch``), runs them as one
left-padded ``Roster.generate`` batch, and sends each step's token back to the waiting request,
which turns tokens into text (eos, stop strings, its own ``max_tokens``). The engine gives a
prompt the same tokens in a batch as alone, so a response never depends on its batch-mates.

RoE settings are extra request fields (``roster_size``, ``tau``, ``schedule``, ``seed``,
``skip_first``, ``skip_last``) with the server's defaults. ``n`` > 1 gives choice i the seed
``seed + i``. ``logprobs`` (completions: a count; chat: ``logprobs``/``top_logprobs``) report
the log-probability of each generated token under the RoE aggregate the engine chose it from
(the members' averaged distribution, before temperature and top-p), and the most likely
alternatives. This module knows nothing of routers or caches. FastAPI and uvicorn are imported
lazily: ``pip install 'roe[serve]'``.
"""

import asyncio
import functools
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import roe
from roe.config import RoEConfig

log = logging.getLogger("roe.serve")
ROLES = ("system", "developer", "user", "assistant", "tool")


def require_serve_extra():
    """(fastapi, uvicorn), or an ImportError naming the extra to install."""
    try:
        import fastapi
        import uvicorn
    except ImportError as err:
        raise ImportError(f"roe serve needs FastAPI and uvicorn ({err}); install them with: "
                          "pip install 'roe[serve]'") from None
    return fastapi, uvicorn


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Server settings: RoE defaults for requests that do not set them, and the server's limits."""

    model_id: str = "roe-default"
    roster_size: int = 8
    tau: float = 0.1
    schedule: str | None = None
    seed: int = 0
    skip_first: int = 1
    skip_last: int = 1
    max_batch: int = 8
    max_queue: int = 64
    timeout: float = 60.0
    max_tokens_limit: int = 512
    max_roster_size: int = 64
    max_n: int = 16
    threads: int = 0  # torch threads of the worker; 0 leaves torch's default

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_tokens_limit", "max_roster_size", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")


class ApiError(Exception):
    """An error answered with an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class Sampling:
    """What a batch must share besides the RoE settings."""

    do_sample: bool
    temperature: float
    top_p: float
    stop: tuple[str, ...]


@dataclass
class Parsed:
    prompts: list[list[int]]
    cfgs: list[RoEConfig]  # one per choice index i (seed + i)
    keys: list[tuple]
    sampling: Sampling
    max_tokens: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None = None  # None: no logprobs; n: the chosen token's log-prob and the n most likely


def _int(body: dict, name: str, default: int, lo: int, hi: int | None = None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name, code="invalid_type")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ApiError(400, f"{name} must be {bound}, got {value}", param=name, code="invalid_value")
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name, code="invalid_type")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", param=name, code="invalid_value")
    return float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings", param="stop")
    return tuple(stops)


def _sampling(body: dict) -> Sampling:
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be > 0", param="top_p", code="invalid_value")
    do_sample = temperature > 0
    return Sampling(do_sample, temperature if do_sample else 1.0, top_p if do_sample else 1.0, _stop(body))


def _roe_configs(body: dict, cfg: ServeConfig, n: int, moe_layers: int) -> tuple[list[RoEConfig], list[tuple]]:
    roster_size = _int(body, "roster_size", cfg.roster_size, 1, cfg.max_roster_size)
    tau = _number(body, "tau", cfg.tau, 0.0, 1e6)
    schedule = body.get("schedule", cfg.schedule)
    if schedule is not None and not isinstance(schedule, str):
        raise ApiError(400, f"schedule must be the path of a schedule JSON file, got {schedule!r}", param="schedule")
    seed = _int(body, "seed", cfg.seed, 0, (1 << 62))
    skips = {name: _int(body, name, getattr(cfg, name), 0, moe_layers) for name in ("skip_first", "skip_last")}
    cfgs = []
    for i in range(n):
        try:
            one = RoEConfig(roster_size=roster_size, tau=schedule or tau, seed=seed + i, **skips)
            one.schedule(moe_layers)
        except (ValueError, TypeError, OSError, KeyError) as err:
            raise ApiError(400, f"invalid RoE settings: {err}", param="schedule" if schedule else None) from None
        cfgs.append(one)
    tau_key = ("schedule", schedule) if schedule else ("tau", tau)
    keys = [(roster_size, tau_key, skips["skip_first"], skips["skip_last"], c.seed) for c in cfgs]
    return cfgs, keys


def _completion_prompts(body: dict, tokenizer, vocab: int) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string, a list of strings or a list of token ids",
                       param="prompt")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            ids = tokenizer(p).input_ids if p else []
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
            ids = list(p)
        else:
            raise ApiError(400, f"prompt entries must be strings or lists of token ids in [0, {vocab})", param="prompt")
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt", code="empty_prompt")
        prompts.append(ids)
    return prompts


def _message_text(message) -> str:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(400, f"each message needs a role among {list(ROLES)} and a content", param="messages")
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, "message content must be a string or a list of text parts", param="messages")


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokenizer's chat template, or ``role: content`` lines followed by ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text).input_ids


def _chat_prompts(body: dict, tokenizer) -> list[list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    texts = [_message_text(m) for m in messages]  # validates each message first
    plain = [{"role": m["role"], "content": text} for m, text in zip(messages, texts)]
    if not any(m["content"] for m in plain):
        raise ApiError(400, "every message is empty", param="messages", code="empty_prompt")
    return [chat_prompt_ids(tokenizer, plain)]


MAX_TOP_LOGPROBS = 20


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to return per token, or None when logprobs are not requested.

    Completions: ``logprobs`` is the count (0-20). Chat: ``logprobs`` is a boolean and
    ``top_logprobs`` the count (0-20, only with ``logprobs: true``).
    """
    if not chat:
        value = body.get("logprobs")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {value!r}",
                           param="logprobs")
        return value
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise ApiError(400, f"logprobs must be a boolean, got {wanted!r}", param="logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}",
                       param="top_logprobs")
    if top and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def parse_request(body, *, chat: bool, cfg: ServeConfig, tokenizer, vocab: int, context: int | None,
                  moe_layers: int) -> Parsed:
    """Validate an OpenAI request body; every problem is an ``ApiError`` (4xx)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != cfg.model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {cfg.model_id!r}",
                       param="model", code="model_not_found")
    top_logprobs = _logprobs(body, chat)
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
        raise ApiError(400, "echo, suffix and best_of are not supported by roe serve", code="unsupported")
    default_tokens = 16 if not chat else min(cfg.max_tokens_limit, 256)
    tokens_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, tokens_field, default_tokens, 1, cfg.max_tokens_limit)
    n = _int(body, "n", 1, 1, cfg.max_n)
    sampling = _sampling(body)
    cfgs, keys = _roe_configs(body, cfg, n, moe_layers)
    prompts = _chat_prompts(body, tokenizer) if chat else _completion_prompts(body, tokenizer, vocab)
    for ids in prompts:
        if context is not None and len(ids) + max_tokens > context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                           f"context of {context} tokens", param="prompt", code="context_length_exceeded")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return Parsed(prompts, cfgs, [(*k, sampling) for k in keys], sampling, max_tokens, stream, include_usage,
                  top_logprobs)


# ---------------------------------------------------------------- the worker


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


# ---------------------------------------------------------------- tokens -> text


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


# ---------------------------------------------------------------- the app


class Service:
    """What the HTTP handlers need: the model's facts, the worker, and the request lifecycle."""

    def __init__(self, model, tokenizer, cfg: ServeConfig) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        with roe.roster(model, RoEConfig(roster_size=1, tau=0.0, skip_first=0, skip_last=0)) as r:
            self.moe_layers = len(r.slots)
        RoEConfig(roster_size=cfg.roster_size, tau=cfg.schedule or cfg.tau, seed=cfg.seed, skip_first=cfg.skip_first,
                  skip_last=cfg.skip_last).schedule(self.moe_layers)
        text_config = model.config.get_text_config()
        self.context = getattr(text_config, "max_position_embeddings", None)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = getattr(gen, "pad_token_id", None)
        pad = pad if pad is not None else tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.worker = Worker(model, tokenizer, cfg, self.pad_id)
        self.created = int(time.time())

    def submit(self, parsed: Parsed) -> tuple[list[Job], list[ChoiceText], asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        n = len(parsed.cfgs)

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        jobs = [Job(parsed.keys[i % n], parsed.cfgs[i % n], parsed.sampling, ids, parsed.max_tokens, p * n + i, emit,
                    parsed.top_logprobs)
                for p, ids in enumerate(parsed.prompts) for i in range(n)]
        choices = [ChoiceText(self.tokenizer, self.eos, parsed.sampling.stop, parsed.max_tokens) for _ in jobs]
        self.worker.submit(jobs)
        return jobs, choices, events

    async def updates(self, choices: list[ChoiceText], events: asyncio.Queue):
        """(index, new text, finish reason once) as tokens arrive, until every choice is finished."""
        deadline = asyncio.get_running_loop().time() + self.cfg.timeout
        while not all(c.finish for c in choices):
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                kind, index, value = await asyncio.wait_for(events.get(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                raise ApiError(504, f"the request did not finish within {self.cfg.timeout} s", type="timeout_error",
                               code="timeout") from None
            if kind == "error":
                raise ApiError(500, value, type="server_error", code="generation_failed")
            choice, was_finished = choices[index], choices[index].finish
            if was_finished:
                continue
            if kind == "token":
                choice.add(*value)
            else:
                choice.end()
            piece = choice.delta()
            if piece or choice.finish:
                yield index, piece, choice.finish


def _usage(parsed: Parsed, choices: list[ChoiceText]) -> dict:
    prompt = sum(len(p) for p in parsed.prompts)
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(chat: bool, index: int, text: str | None, finish: str | None, *, delta: bool = False,
            logprobs: dict | None = None) -> dict:
    if not chat:
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    if delta:
        return {"index": index, "delta": {} if text is None else {"content": text}, "finish_reason": finish,
                "logprobs": logprobs}
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
            "logprobs": logprobs}


def create_app(model, tokenizer, cfg: ServeConfig | None = None):
    """The FastAPI app serving ``model`` (the worker starts and drains with the app's lifespan)."""
    fastapi, _ = require_serve_extra()
    from contextlib import asynccontextmanager

    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    service = Service(model, tokenizer, cfg or ServeConfig())

    @asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        yield
        await asyncio.to_thread(service.worker.close)

    app = fastapi.FastAPI(title="roe", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.get("/health")
    async def health():
        worker = service.worker
        return {"status": "ok" if worker.thread.is_alive() else "worker_dead", "queued": len(worker.queue),
                "submitted": worker.submitted, "batches": worker.batches}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.cfg.model_id, "object": "model",
                                            "created": service.created, "owned_by": "roe"}]}

    async def complete(request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        parsed = parse_request(body, chat=chat, cfg=service.cfg, tokenizer=tokenizer, vocab=service.vocab,
                               context=service.context, moe_layers=service.moe_layers)
        jobs, choices, events = service.submit(parsed)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": service.cfg.model_id}
        if parsed.stream:
            return StreamingResponse(_stream(head, chat, parsed, jobs, choices, events), media_type="text/event-stream")
        try:
            async for _ in service.updates(choices, events):
                pass
        finally:
            for job in jobs:
                job.cancelled = True
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "choices": [_choice(chat, i, c.text(), c.finish, logprobs=c.logprobs(chat))
                            for i, c in enumerate(choices)],
                "usage": _usage(parsed, choices)}

    async def _stream(head, chat, parsed, jobs, choices, events):
        kind = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(choice_list, **extra) -> str:
            return f"data: {json.dumps({**kind, 'choices': choice_list, **extra})}\n\n"

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(len(choices))])
            async for index, piece, finish in service.updates(choices, events):
                if piece:
                    logprobs = choices[index].logprobs(chat, upto=choices[index].sent)
                    yield chunk([_choice(chat, index, piece, None, delta=True, logprobs=logprobs)])
                if finish:
                    yield chunk([_choice(chat, index, None if chat else "", finish, delta=True)])
            if parsed.include_usage:
                yield chunk([], usage=_usage(parsed, choices))
        except ApiError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            for job in jobs:
                job.cancelled = True
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await complete(request, chat=True)

    return app


def run(*, model: str | None, host: str, port: int, cfg: ServeConfig, log_level: str = "info") -> None:
    """Load the model and serve it until interrupted (in-flight requests finish on shutdown)."""
    _, uvicorn = require_serve_extra()
    lm, tokenizer = roe.load(model)
    app = create_app(lm, tokenizer, cfg)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(cfg.timeout) + 5)
