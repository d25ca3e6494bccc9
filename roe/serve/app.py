"""The HTTP app: ``Service`` (the model's facts, the worker, a request's lifecycle), routes and ``run``."""

import asyncio
import json
import time
import uuid

import roe
from roe.config import RoEConfig
from roe.serve.protocol import ApiError, Parsed, ServeConfig, parse_request
from roe.serve.text import ChoiceText
from roe.serve.worker import Job, Worker


def require_serve_extra():
    """(fastapi, uvicorn), or an ImportError naming the extra to install."""
    try:
        import fastapi
        import uvicorn
    except ImportError as err:
        raise ImportError(f"roe serve needs FastAPI and uvicorn ({err}); install them with: "
                          "pip install 'roe[serve]'") from None
    return fastapi, uvicorn


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
