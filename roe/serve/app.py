"""The HTTP app: ``Service`` (the model's facts, the worker, a request's lifecycle), routes and ``run``.

A request is read with its size capped (413), refused unless JSON (415), parsed and tokenised
off the event loop (roe/serve/protocol.py: 400 for anything malformed or over budget), then
handed to the worker as one ``Job`` per choice. A client that goes away cancels its jobs,
streaming or not. ``/health`` is 503 until the model is warmed up (the decode kernel built, one
RoE step run) and whenever the worker thread is dead. Host and API key: roe/serve/guard.py.
"""

import asyncio
import copy
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import roe
from roe import adapters
from roe.config import RoEConfig
from roe.roster import schedule_for
from roe.schedule import Schedule
from roe.serve.guard import Guard
from roe.serve.protocol import (
    ApiError,
    ModelFacts,
    Parsed,
    ServeConfig,
    decode_body,
    openapi_body,
    parse_request,
    request_schemas,
)
from roe.serve.text import ChoiceText
from roe.serve.worker import Job, Worker

log = logging.getLogger("roe.serve")


def require_serve_extra():
    """(fastapi, uvicorn), or an ImportError naming the extra to install."""
    try:
        import fastapi
        import uvicorn
    except ImportError as err:
        raise ImportError(f"roe serve needs FastAPI and uvicorn ({err}); install them with: "
                          "pip install 'roe[serve]'") from None
    return fastapi, uvicorn


def _resolve(model, slots: list, one: RoEConfig) -> Schedule:
    """``one``'s schedule for the model, and its experts_per_token checked: ValueError if either does not fit.

    NOTE: the dial is checked on copies of the server's resolved router slots (``adapters.dial``
    rewrites a slot's rule): no forward runs, so parsing never touches the model the worker owns.
    """
    schedule = schedule_for(model, one, slots)
    adapters.dial(model, [copy.copy(slot) for slot in slots], one.experts_per_token)
    return schedule


class Service:
    """What the HTTP handlers need: the model's facts, the worker, readiness and the request lifecycle."""

    def __init__(self, model, tokenizer, cfg: ServeConfig) -> None:
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        with roe.roster(model, RoEConfig(roster_size=1, tau=0.0, skip_first=0, skip_last=0)) as r:
            slots = r.slots
        schedules = load_schedules(model, cfg.schedules)
        default = RoEConfig(roster_size=cfg.roster_size, tau=schedules[cfg.schedule] if cfg.schedule else cfg.tau,
                            seed=cfg.seed, skip_first=cfg.skip_first, skip_last=cfg.skip_last)
        schedule_for(model, default, slots)  # the server's own defaults must fit the model
        text_config = model.config.get_text_config()
        self.facts = ModelFacts(tokenizer=tokenizer, vocab=model.get_output_embeddings().weight.shape[0],
                                context=getattr(text_config, "max_position_embeddings", None), moe_layers=len(slots),
                                experts=min(slot.experts for slot in slots), schedules=schedules,
                                resolve=lambda one: _resolve(model, slots, one))
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = getattr(gen, "pad_token_id", None)
        pad = pad if pad is not None else tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.worker = Worker(model, tokenizer, cfg, self.pad_id)
        # NOTE: one parsing thread: tokenising is off the event loop, and one tokenizer is never
        # encoding in two threads at once.
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="roe-serve-parse")
        self.ready = threading.Event()
        self.failure: str | None = None
        self.stopping = False
        self.created = int(time.time())

    def start(self) -> None:
        """Warm up in the background (the server answers /health 503 meanwhile), then start the worker."""
        threading.Thread(target=self._warm_up_then_start, name="roe-serve-warmup", daemon=True).start()

    def _warm_up_then_start(self) -> None:
        try:
            warm_up(self.model, self.pad_id)
        except Exception as err:  # the server stays up to say so on /health
            self.failure = f"warm-up failed: {type(err).__name__}: {err}"
            log.exception("warm-up failed")
            return
        if not self.stopping:
            self.worker.start()
            self.ready.set()
            log.info("ready")

    def close(self) -> None:
        self.stopping = True
        self.worker.close()
        self.parser.shutdown(wait=False, cancel_futures=True)

    def health(self) -> tuple[int, dict]:
        """(status code, body): 200 only when warmed up and the worker thread is alive."""
        worker = self.worker
        state = ("failed" if self.failure else "starting" if not self.ready.is_set()
                 else "ok" if worker.thread.is_alive() else "worker_dead")
        body = {"status": state, "queued": len(worker.queue), "submitted": worker.submitted,
                "batches": worker.batches, "steps": worker.steps}
        return (200 if state == "ok" else 503), ({**body, "detail": self.failure} if self.failure else body)

    def check_serving(self) -> None:
        status, body = self.health()
        if status != 200:
            message = {"starting": "the server is warming up; retry shortly"}.get(
                body["status"], "the server cannot serve: its worker is not running")
            raise ApiError(503, message, type="server_error", code="not_ready")

    async def parse(self, raw: bytes, chat: bool) -> Parsed:
        """decode_body + parse_request on the parsing thread (tokenising can take a while)."""
        def work() -> Parsed:
            return parse_request(decode_body(raw), chat=chat, cfg=self.cfg, facts=self.facts)

        return await asyncio.get_running_loop().run_in_executor(self.parser, work)

    def submit(self, parsed: Parsed) -> tuple[list[Job], list[ChoiceText], asyncio.Queue]:
        self.check_serving()
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        n = len(parsed.cfgs)

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        jobs = [Job(parsed.keys[i % n], parsed.cfgs[i % n], parsed.sampling, ids, parsed.max_tokens, p * n + i, emit,
                    parsed.top_logprobs)
                for p, ids in enumerate(parsed.prompts) for i in range(n)]
        choices = [ChoiceText(self.tokenizer, parsed.sampling.stop) for _ in jobs]
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
            if kind == "invalid":
                raise ApiError(400, value, code="invalid_value")
            choice, was_finished = choices[index], choices[index].finish
            if was_finished:
                continue
            if kind == "token":
                choice.add(*value)
            else:  # "end": the last token, with the finish the worker found (no stop string is searched here)
                choice.end(*value)
            piece = choice.delta()
            if piece or choice.finish:
                yield index, piece, choice.finish


SCHEDULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def registered_schedules(entries: list[str], folder: str | None = None) -> dict[str, str]:
    """``--schedule NAME=PATH`` entries and ``--schedule-dir`` files (named by their stem) as {name: path}."""
    found = {}
    pairs = [entry.partition("=")[::2] for entry in entries]
    if folder is not None:
        if not Path(folder).is_dir():
            raise ValueError(f"--schedule-dir {folder}: not a directory")
        pairs += [(path.stem, str(path)) for path in sorted(Path(folder).glob("*.json"))]
    for name, path in pairs:
        if not SCHEDULE_NAME.fullmatch(name) or not path:
            raise ValueError(f"a schedule is registered as NAME=PATH with NAME of letters, digits, '.', '_' or '-' "
                             f"(got {name!r}={path!r})")
        if name in found:
            raise ValueError(f"the schedule name {name!r} is registered twice")
        found[name] = path
    return found


def load_schedules(model, paths: dict[str, str]) -> dict[str, Schedule]:
    """The operator's named schedule files, loaded and checked against the model (ValueError naming the bad one)."""
    schedules = {}
    for name, path in paths.items():
        if not name or not isinstance(name, str):
            raise ValueError(f"a schedule needs a name, got {name!r}")
        try:
            schedules[name] = schedule_for(model, RoEConfig(tau=Schedule.load(path)))
        except (ValueError, OSError) as err:
            raise ValueError(f"schedule {name!r} ({path}): {err}") from None
    return schedules


@torch.no_grad()
def warm_up(model, pad_id: int) -> None:
    """Build (once per environment) or load the decode kernel, then run two RoE decode steps (K=2),
    so the first request pays neither."""
    from roe.kernels import prepare

    log.info("warming up: the decode kernel, then one RoE step")
    if not prepare():
        log.warning("the decode kernel is unavailable here: decoding uses F.linear")
    with roe.roster(model, RoEConfig(roster_size=2)) as r:
        r.generate(torch.tensor([[pad_id, pad_id]]), max_new_tokens=2)


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with 413 beyond ``limit`` bytes (by Content-Length first, then while reading)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _require_json(request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"the request body must be application/json, not {media or 'unlabelled'!r}",
                       code="unsupported_media_type")


async def _until_disconnected(request) -> None:
    """Returns when the client has gone (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(body: dict, status: int = 200, headers: dict | None = None):
    """A JSON response with non-ASCII escaped: a string that is not valid UTF-8 can never break the answer."""
    from starlette.responses import Response

    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


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
    """The FastAPI app serving ``model`` (warm-up and the worker start with the app's lifespan; it drains on exit)."""
    fastapi, _ = require_serve_extra()
    from contextlib import asynccontextmanager

    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    service = Service(model, tokenizer, cfg or ServeConfig())

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await asyncio.to_thread(service.close)

    app = fastapi.FastAPI(title="roe", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(Guard, cfg=service.cfg)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return _json(err.body(), err.status, err.headers())

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return _json(ApiError(err.status_code, str(err.detail)).body(), err.status_code)

    @app.get("/health")
    async def health():
        status, body = service.health()
        return _json(body, status)

    @app.get("/v1/models")
    async def models():
        names = [service.cfg.model_id, *(a for a in service.cfg.aliases if a != service.cfg.model_id)]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": service.created,
                                            "owned_by": "roe"} for name in names],
                "schedules": sorted(service.facts.schedules)}

    async def complete(request, chat: bool):
        _require_json(request)
        parsed = await service.parse(await _read_body(request, service.cfg.max_body_bytes), chat)
        jobs, choices, events = service.submit(parsed)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": service.cfg.model_id}
        if parsed.stream:
            return StreamingResponse(_stream(head, chat, parsed, jobs, choices, events), media_type="text/event-stream")
        try:
            await _collect_unless_disconnected(request, service.updates(choices, events))
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

    completion_schema, chat_schema = request_schemas(service.cfg, service.facts)

    @app.post("/v1/completions", openapi_extra=openapi_body(completion_schema))
    async def completions(request: fastapi.Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(chat_schema))
    async def chat_completions(request: fastapi.Request):
        return await complete(request, chat=True)

    return app


async def _collect_unless_disconnected(request, updates) -> None:
    """Consume ``updates`` to the end, unless the client disconnects first (then stop waiting: the
    caller cancels the jobs, and the worker drops them)."""
    async def drain() -> None:
        async for _ in updates:
            pass

    waiting, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, gone):
            task.cancel()
    if waiting.done() and not waiting.cancelled():
        waiting.result()  # raises the request's ApiError, if any
    else:
        raise ApiError(499, "the client closed the request", code="client_closed")


def run(*, model: str | None, host: str, port: int, cfg: ServeConfig, log_level: str = "info") -> None:
    """Load the model and serve it until interrupted (in-flight requests finish on shutdown)."""
    import dataclasses

    _, uvicorn = require_serve_extra()
    handler = logging.StreamHandler()  # warm-up and readiness lines beside uvicorn's own
    handler.setFormatter(logging.Formatter("%(levelname)s:     roe serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(log_level.upper())
    lm, tokenizer = roe.load(model)
    app = create_app(lm, tokenizer, dataclasses.replace(cfg, host=host))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(cfg.timeout) + 5)
