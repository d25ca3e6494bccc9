"""The serving protocol: OpenAI request bodies validated into ``Parsed`` (every problem an ``ApiError``).

Nothing here touches the model: the worker and the app consume what ``parse_request`` returns.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from roe.config import RoEConfig

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Server settings: RoE defaults for requests that do not set them, security and the limits.

    tau None is the model's default schedule (roe/schedule.py). ``schedules`` maps the names a
    request may send as ``schedule`` to files the operator chose (loaded and checked against the
    model at start-up); ``schedule`` is the default name. ``api_key``: the Bearer token every
    /v1 route requires (None: no key). ``host`` is the bound host; the Host header must name it,
    an IP address, localhost or one of ``allowed_hosts`` ("*": any), against DNS rebinding.
    ``max_request_cost`` bounds roster_size x choices x max_tokens of one request.
    """

    model_id: str = "roe-default"
    aliases: tuple[str, ...] = ("roe",)
    roster_size: int = 8
    tau: float | None = None
    schedule: str | None = None
    schedules: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    skip_first: int = 1
    skip_last: int = 1
    max_batch: int = 8
    max_queue: int = 64
    timeout: float = 60.0
    max_tokens_limit: int = 512
    max_roster_size: int = 64
    max_n: int = 16
    max_request_cost: int = 65536
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 100_000
    api_key: str | None = None
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    threads: int = 0  # torch threads of the worker; 0 leaves torch's default

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_tokens_limit", "max_roster_size", "max_n", "max_request_cost",
                     "max_body_bytes", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.schedule is not None and self.schedule not in self.schedules:
            raise ValueError(f"the default schedule {self.schedule!r} is not among the registered schedules "
                             f"{sorted(self.schedules)}")
        if self.schedule is not None and self.tau is not None:
            raise ValueError("give a default tau or a default schedule, not both")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (None serves without a key)")


class ApiError(Exception):
    """An error answered with an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after
        if status in (429, 503) and retry_after is None:
            self.retry_after = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


def _number(body: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name, code="invalid_type")
    # NOTE: compared before any float(): a 400-digit integer overflows float() but compares exactly.
    if not (lo <= value <= hi and math.isfinite(value)):
        raise ApiError(400, f"{name} must be between {lo} and {hi}", param=name, code="invalid_value")
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


UNKNOWN_SCHEDULE = "unknown schedule name; GET /v1/models lists the schedules this server registered"


def _tau(body: dict, cfg: ServeConfig, moe_layers: int) -> float | tuple[float, ...] | None:
    """A number (uniform), one number per MoE layer, or the server's default (None: the model's)."""
    value = body.get("tau")
    if not isinstance(value, list):
        return _number(body, "tau", cfg.tau, 0.0, 1e6)
    if len(value) != moe_layers:
        raise ApiError(400, f"a tau list needs one value per MoE layer ({moe_layers}), got {len(value)}",
                       param="tau", code="invalid_value")
    return tuple(_number({"tau": t}, "tau", None, 0.0, 1e6) for t in value)


def _roe_configs(body: dict, cfg: ServeConfig, n: int, facts: "ModelFacts") -> tuple[list[RoEConfig], list[tuple]]:
    """One RoEConfig per choice (seed + i) and its batching key; ``schedule`` is a registered name.

    NOTE: an unknown schedule name gets one fixed message: the name never reaches the file
    system, so the answer cannot tell a client anything about the server's files.
    """
    roster_size = _int(body, "roster_size", cfg.roster_size, 1, cfg.max_roster_size)
    tau = _tau(body, cfg, facts.moe_layers)
    name = body.get("schedule")
    if name is not None and (not isinstance(name, str) or name not in facts.schedules):
        raise ApiError(400, UNKNOWN_SCHEDULE, param="schedule", code="unknown_schedule")
    if name is not None and body.get("tau") is not None:
        raise ApiError(400, "give tau or schedule, not both", param="schedule")
    name = name if name is not None or body.get("tau") is not None else cfg.schedule
    seed = _int(body, "seed", cfg.seed, 0, (1 << 62))
    skips = {key: _int(body, key, getattr(cfg, key), 0, facts.moe_layers) for key in ("skip_first", "skip_last")}
    k = _int(body, "experts_per_token", None, 1, facts.experts)
    try:
        cfgs = [RoEConfig(roster_size=roster_size, tau=facts.schedules[name] if name else tau, seed=seed + i,
                          experts_per_token=k, **skips)
                for i in range(n)]
        facts.resolve(cfgs[0])  # the schedule and the dial do not depend on the seed
    except (ValueError, TypeError) as err:
        raise ApiError(400, f"invalid RoE settings: {err}", param="tau" if body.get("tau") is not None else None,
                       code="invalid_value") from None
    tau_key = ("schedule", name) if name else ("tau", tau)
    keys = [(roster_size, tau_key, skips["skip_first"], skips["skip_last"], c.seed) for c in cfgs]
    return cfgs, keys


def _completion_inputs(body: dict, vocab: int) -> list[str | list[int]]:
    """The prompts as sent: strings, or lists of token ids in [0, vocab)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string, a list of strings or a list of token ids",
                       param="prompt")
    for p in prompt:
        if not (isinstance(p, str) or isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p)):
            raise ApiError(400, f"prompt entries must be non-empty strings or lists of token ids in [0, {vocab})",
                           param="prompt")
    return prompt


def _completion_prompts(inputs: list[str | list[int]], tokenizer) -> list[list[int]]:
    prompts = [(tokenizer(p).input_ids if p else []) if isinstance(p, str) else list(p) for p in inputs]
    if not all(prompts):
        raise ApiError(400, "prompt is empty", param="prompt", code="empty_prompt")
    return prompts


def _message_text(message) -> str:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(400, f"each message needs a role among {list(ROLES)} and a content", param="messages")
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(
            p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, "message content must be a string or a list of text parts", param="messages")


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokenizer's chat template, or ``role: content`` lines followed by ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text).input_ids


def _chat_messages(body: dict) -> list[dict]:
    """The messages as ``{"role", "content"}`` with text content, validated."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    texts = [_message_text(m) for m in messages]  # validates each message first
    plain = [{"role": m["role"], "content": text} for m, text in zip(messages, texts)]
    if not any(m["content"] for m in plain):
        raise ApiError(400, "every message is empty", param="messages", code="empty_prompt")
    return plain


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
    if wanted is not None and not isinstance(wanted, bool):  # NOTE: not `in (True, False)`: 0 == False
        raise ApiError(400, f"logprobs must be a boolean, got {wanted!r}", param="logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}",
                       param="top_logprobs")
    if top and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


@dataclass(frozen=True)
class ModelFacts:
    """What parsing needs to know of the served model, found once at start-up."""

    tokenizer: object
    vocab: int
    context: int | None
    moe_layers: int
    experts: int  # the fewest experts of any MoE layer: the largest experts_per_token
    schedules: dict  # registered name -> Schedule, checked against the model
    resolve: Callable[[RoEConfig], object]  # a config's Schedule for this model (ValueError if it or its
    # experts_per_token does not fit)


def decode_body(raw: bytes) -> dict:
    """The JSON object of a request body; 400 for anything else, including strings that are not
    Unicode (a lone surrogate ``"\\ud800"`` would fail later in the tokenizer and in the answer)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a 5000-digit integer, deep nesting
        raise ApiError(400, f"the request body is not valid JSON: {str(err)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    pending = [body]
    while pending:
        item = pending.pop()
        values = [*item.keys(), *item.values()] if isinstance(item, dict) else item if isinstance(item, list) else ()
        for value in values:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(400, "the request holds a string that is not valid Unicode (a lone surrogate)",
                                   code="invalid_unicode") from None
            elif isinstance(value, (dict, list)):
                pending.append(value)
    return body


def parse_request(body: dict, *, chat: bool, cfg: ServeConfig, facts: ModelFacts) -> Parsed:
    """Validate an OpenAI request body; every problem is an ``ApiError`` (4xx).

    Cheap checks and the cost bounds come before tokenising: the prompt's characters, the budget
    roster_size x choices x max_tokens, and choices no more than the queue holds (400: such a
    request can never fit, unlike a full queue's 429).
    """
    model = body.get("model")
    if model is not None and model not in (cfg.model_id, *cfg.aliases):
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {cfg.model_id!r}",
                       param="model", code="model_not_found")
    top_logprobs = _logprobs(body, chat)
    best_of = body.get("best_of")
    if body.get("echo") or body.get("suffix") or best_of is not None and (isinstance(best_of, bool) or best_of != 1):
        raise ApiError(400, "echo, suffix and best_of are not supported by roe serve", code="unsupported")
    default_tokens = 16 if not chat else min(cfg.max_tokens_limit, 256)
    max_tokens = _int(body, "max_tokens", default_tokens, 1, cfg.max_tokens_limit)
    if chat:  # the newer name wins when both are sent; both must be valid
        max_tokens = _int(body, "max_completion_tokens", max_tokens, 1, cfg.max_tokens_limit)
    n = _int(body, "n", 1, 1, cfg.max_n)
    sampling = _sampling(body)
    cfgs, keys = _roe_configs(body, cfg, n, facts)
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or not (usage is None or isinstance(usage, bool)):
        raise ApiError(400, "stream_options must be an object with a boolean include_usage", param="stream_options")
    include_usage = bool(usage)
    inputs = _chat_messages(body) if chat else _completion_inputs(body, facts.vocab)
    _check_cost(cfg, inputs, chat, n * (1 if chat else len(inputs)), cfgs[0].roster_size, max_tokens)
    if chat:
        prompts = [chat_prompt_ids(facts.tokenizer, inputs)]
    else:
        prompts = _completion_prompts(inputs, facts.tokenizer)
    for ids in prompts:
        if facts.context is not None and len(ids) + max_tokens > facts.context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                           f"context of {facts.context} tokens", param="prompt", code="context_length_exceeded")
    return Parsed(prompts, cfgs, [(*k, sampling) for k in keys], sampling, max_tokens, stream, include_usage,
                  top_logprobs)


def _check_cost(cfg: ServeConfig, inputs: list, chat: bool, choices: int, roster_size: int, max_tokens: int) -> None:
    chars = sum(len(m["content"]) for m in inputs) if chat else sum(len(p) for p in inputs if isinstance(p, str))
    if chars > cfg.max_prompt_chars:
        raise ApiError(400, f"the prompt has {chars} characters; this server takes at most {cfg.max_prompt_chars}",
                       param="messages" if chat else "prompt", code="prompt_too_long")
    if choices > cfg.max_queue:
        raise ApiError(400, f"the request asks for {choices} choices; the queue holds {cfg.max_queue}",
                       param="n", code="too_many_choices")
    cost = roster_size * choices * max_tokens
    if cost > cfg.max_request_cost:
        raise ApiError(400, f"roster_size x choices x max_tokens = {roster_size} x {choices} x {max_tokens} = {cost} "
                       f"exceeds this server's per-request budget of {cfg.max_request_cost}", code="over_budget")


# ---------------------------------------------------------------- request-body schemas (OpenAPI)


def request_schemas(cfg: ServeConfig, facts: ModelFacts) -> tuple[dict, dict]:
    """JSON schemas of the completions and chat bodies, with this server's limits and RoE fields.

    What a schema cannot say (the per-request budget, prompt + max_tokens within the context,
    the tokenised prompt being non-empty) is still checked by ``parse_request`` (400).
    """
    integer = lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi}  # noqa: E731
    tau = {"type": "number", "minimum": 0, "maximum": 1e6}
    text = {"type": "string", "minLength": 1, "maxLength": cfg.max_prompt_chars}
    roe_fields = {
        "roster_size": {**integer(1, cfg.max_roster_size), "description": "K, the members averaged at each token"},
        "tau": {"oneOf": [tau, {"type": "array", "items": tau, "minItems": facts.moe_layers,
                                "maxItems": facts.moe_layers}],
                "description": "a uniform temperature on the middle MoE layers, or one per MoE layer"},
        "seed": integer(0, 1 << 62),
        "skip_first": integer(0, facts.moe_layers),
        "skip_last": integer(0, facts.moe_layers),
        "experts_per_token": {**integer(1, facts.experts),
                              "description": "k, the experts every member selects (default: the model's)"},
    }
    if facts.schedules:
        roe_fields["schedule"] = {"enum": sorted(facts.schedules),
                                  "description": "the name of a schedule the operator registered (never a path)"}
    common = {
        "model": {"enum": [cfg.model_id, *cfg.aliases]},
        "max_tokens": integer(1, cfg.max_tokens_limit),
        "n": integer(1, cfg.max_n),
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "stop": {"oneOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": ["boolean", "null"]}}},
        **roe_fields,
    }
    not_both = {"not": {"required": ["tau", "schedule"]}}
    ids = {"type": "array", "minItems": 1, "items": integer(0, facts.vocab - 1)}
    completion = {"type": "object", "required": ["prompt"], **not_both, "properties": {
        **common,
        "prompt": {"oneOf": [text, {"type": "array", "minItems": 1, "maxItems": cfg.max_queue, "items": text}, ids,
                             {"type": "array", "minItems": 1, "maxItems": cfg.max_queue, "items": ids}]},
        "logprobs": integer(0, MAX_TOP_LOGPROBS),
        "best_of": {"enum": [1]},
    }}
    any_text = {"type": "string", "maxLength": cfg.max_prompt_chars}  # a message may be empty
    content = {"oneOf": [any_text, {"type": "null"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"enum": ["text"]}, "text": any_text}}}]}
    chat = {"type": "object", "required": ["messages"], **not_both, "properties": {
        **common,
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"enum": list(ROLES)}, "content": content}}},
        "max_completion_tokens": integer(1, cfg.max_tokens_limit),
        "logprobs": {"type": "boolean"},
        "top_logprobs": integer(0, MAX_TOP_LOGPROBS),
    }}
    for body in (completion, chat):  # NOTE: OpenAI clients send null for an unset field; it means the default
        body["properties"] = {name: prop if name in body["required"] else {"anyOf": [prop, {"type": "null"}]}
                              for name, prop in body["properties"].items()}
    return completion, chat


ERRORS = {400: "malformed, or can never fit (bad field, over a limit or the budget)", 401: "missing or wrong API key",
          404: "another model", 413: "body over --max-body-bytes", 415: "body not application/json",
          429: "queue full (Retry-After)", 503: "warming up or worker dead (Retry-After)", 504: "over --timeout"}


def openapi_body(schema: dict) -> dict:
    """``openapi_extra`` for a route whose JSON body the handler parses itself, with its error answers."""
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {str(status): {"description": why, "content": {"application/json": {"schema": error}}}
                          for status, why in ERRORS.items()}}
