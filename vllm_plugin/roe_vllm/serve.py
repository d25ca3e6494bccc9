"""roe-vllm serve: vLLM's OpenAI-compatible server with RoE, speaking ``roe serve``'s request fields.

``roe serve`` takes RoE settings as top-level request fields (``roster_size``, ``tau``, ``seed``,
``skip_first``, ``skip_last``, ``schedule``); vLLM takes per-request extension settings in
``vllm_xargs``, which become ``SamplingParams.extra_args``, where the plugin reads them. The ASGI
middleware ``RoEFields`` moves the fields from the JSON body into ``vllm_xargs`` and answers 400 in
vLLM's OpenAI error format for values that can never be valid, so one client script works against
both servers. ``main`` is the console script: it turns its RoE options into vLLM's
``--additional-config`` and the plugin's engine arguments, and runs ``vllm serve``'s own code
with them, so every other vLLM server or engine argument passes through unchanged.

This module knows nothing of routers, members or caches: the plugin does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

FIELDS = ("roster_size", "tau", "seed", "skip_first", "skip_last", "schedule")
ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_ROSTER_SIZE = 64  # per-request cost bound, as roe serve's default --max-roster-size
MAX_SEED = 1 << 63  # roe's noise keying takes seeds in [0, 2**63); vLLM's own seed is an int64


class FieldError(ValueError):
    """A RoE request field that can never be valid; answered with 400 and the field's name."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------- request fields


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"{name} must be an integer")
    if value < low or (high is not None and value > high):
        raise FieldError(name, f"{name} must be >= {low}" + (f" and <= {high}" if high is not None else ""))
    return value


def _tau_value(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise FieldError("tau", "tau must be a finite number >= 0, or a non-empty list of them (one per MoE layer)")
    return float(value)


def _tau(value) -> float | list[float]:
    if isinstance(value, list):
        if not value:
            raise FieldError("tau", "tau must be a finite number >= 0, or a non-empty list of them (one per MoE layer)")
        return [_tau_value(v) for v in value]
    return _tau_value(value)


def _schedule(value, registered: set[str]) -> str:
    # NOTE: the answer is the same for every unregistered value (a path, an existing file, a typo),
    # and neither echoes it nor lists the operator's names: a client learns nothing about the server's files.
    if not isinstance(value, str) or value not in registered:
        raise FieldError("schedule", "schedule must be the name of a schedule registered when the server "
                                     "started (roe-vllm serve --schedule NAME=PATH)")
    return value


def roe_xargs(body: dict, schedules: set[str]) -> dict:
    """The RoE fields of a request body, checked, as ``vllm_xargs`` entries (flat keys, as the plugin reads them).

    Only what needs no model is checked here; what does (``skip_first + skip_last`` against the
    MoE layer count, a tau list's length) the plugin checks at admission. ``experts_per_token``
    (the MoE-PHDS dial of ``roe serve``) is refused: the plugin does not implement it.
    """
    if body.get("experts_per_token") is not None:
        raise FieldError("experts_per_token", "experts_per_token is not supported by roe-vllm yet")
    checks: dict[str, Callable] = {
        "roster_size": lambda v: _integer("roster_size", v, 1, MAX_ROSTER_SIZE),
        "tau": _tau,
        "seed": lambda v: _integer("seed", v, 0, MAX_SEED - 1),
        "skip_first": lambda v: _integer("skip_first", v, 0),
        "skip_last": lambda v: _integer("skip_last", v, 0),
        "schedule": lambda v: _schedule(v, schedules),
    }
    return {name: checks[name](body[name]) for name in FIELDS if body.get(name) is not None}


def moved(body: dict, schedules: set[str]) -> dict | None:
    """The body with its RoE fields moved into ``vllm_xargs``, or None when it has none.

    ``seed`` stays at the top level too: there it is vLLM's (OpenAI's) sampling seed, so a
    sampled RoE request is reproducible as in ``roe serve``, where one seed keys both.
    """
    xargs = roe_xargs(body, schedules)
    if not xargs and "experts_per_token" not in body:
        return None
    given = body.get("vllm_xargs") or {}
    if not isinstance(given, dict):
        raise FieldError("vllm_xargs", "vllm_xargs must be an object")
    clash = sorted(set(given) & set(xargs))
    if clash:
        raise FieldError(clash[0], f"{clash[0]} is given both as a field and in vllm_xargs")
    dropped = {*FIELDS, "experts_per_token"} - {"seed"}
    out = {k: v for k, v in body.items() if k not in dropped}
    out["vllm_xargs"] = {**given, **xargs}
    return out


# ---------------------------------------------------------------- the ASGI middleware


def _registered_schedules(scope) -> set[str]:
    """The schedule names the operator registered (``--additional-config '{"roe": {"schedules": ...}}'``)."""
    state = getattr(scope.get("app"), "state", None)
    vllm_config = getattr(state, "vllm_config", None)
    extra = getattr(vllm_config, "additional_config", None)
    roe = extra.get("roe") if isinstance(extra, dict) else None
    return set((roe or {}).get("schedules") or {})


def _authenticator(app):
    """vLLM's --api-key middleware below this one, if any (it verifies bearer tokens)."""
    while app is not None:
        if callable(getattr(app, "verify_token", None)):
            return app
        app = getattr(app, "app", None)
    return None


async def _body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """``receive`` that gives ``body`` once, then the client's own messages (so a disconnect still aborts)."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


def _with_length(scope, length: int) -> dict:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": headers + [(b"content-length", str(length).encode())]}


async def _bad_request(err: FieldError, scope, receive, send) -> None:
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    error = create_error_response(str(err), param=err.param)
    await JSONResponse(content=error.model_dump(), status_code=400)(scope, receive, send)


class RoEFields:
    """ASGI middleware: ``roe serve``'s RoE request fields -> ``vllm_xargs`` (400 for invalid values).

    Install with ``vllm serve --middleware roe_vllm.serve.RoEFields`` (``roe-vllm serve`` does).
    Only JSON POSTs to the completion and chat completion routes are read; every other request
    and every body without RoE fields passes through byte for byte. vLLM adds ``--middleware``
    outside its own ones, so this runs before ``--api-key``'s check: a request it would refuse is
    handed on untouched when that check fails, and is answered 401 there, not 400 here.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in ROUTES:
            return await self.app(scope, receive, send)
        raw = await _body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        try:
            new = moved(body, _registered_schedules(scope)) if isinstance(body, dict) else None
        except FieldError as err:
            auth = _authenticator(self.app)
            if auth is None or auth.verify_token(_headers(scope)):
                return await _bad_request(err, scope, receive, send)
            new = None
        if new is None:
            return await self.app(scope, _replay(raw, receive), send)
        raw = json.dumps(new).encode()
        return await self.app(_with_length(scope, len(raw)), _replay(raw, receive), send)


def _headers(scope):
    from starlette.datastructures import Headers

    return Headers(scope=scope)


# ---------------------------------------------------------------- the console script


def _named_schedule(text: str) -> tuple[str, dict]:
    """``NAME=PATH`` -> (NAME, the schedule JSON), checked by roe's own loader at start-up."""
    from roe.schedule import Schedule

    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--schedule takes NAME=PATH, got {text!r}")
    try:
        Schedule.load(path)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    with open(path) as f:
        return name, json.load(f)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="roe-vllm", description="vLLM's OpenAI-compatible server with Roster-of-Experts decoding.",
        epilog="Every other argument is vLLM's (vllm serve --help) and is passed through, e.g. --api-key, "
               "--max-model-len, --tensor-parallel-size, --dtype.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run vLLM's OpenAI-compatible server with RoE",
                       description="Run vLLM's OpenAI-compatible server (the code of `vllm serve`) with the RoE "
                                   "plugin. Requests take roe serve's fields roster_size, tau, seed, skip_first, "
                                   "skip_last and schedule (a name registered here); -K, --tau, --seed, "
                                   "--skip-first and --skip-last are the defaults of requests that omit them.")
    s.add_argument("--model", default=None, help="checkpoint directory (default: roe's embedded default model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("-K", "--roster-size", type=int, default=None, help="default roster size of requests")
    s.add_argument("--tau", type=float, default=None, help="default uniform tau of requests")
    s.add_argument("--seed", type=int, default=None, help="default RoE seed of requests")
    s.add_argument("--skip-first", type=int, default=None, help="default number of clean first MoE layers")
    s.add_argument("--skip-last", type=int, default=None, help="default number of clean last MoE layers")
    s.add_argument("--schedule", type=_named_schedule, action="append", default=[], metavar="NAME=PATH",
                   help="register a roe schedule JSON under NAME; requests choose it with \"schedule\": NAME "
                        "(repeatable)")
    return p
