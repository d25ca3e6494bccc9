"""The serving protocol: OpenAI request bodies validated into ``Parsed`` (every problem an ``ApiError``).

Nothing here touches the model: the worker and the app consume what ``parse_request`` returns.
"""

import math
from dataclasses import dataclass

from roe.config import RoEConfig

ROLES = ("system", "developer", "user", "assistant", "tool")


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
