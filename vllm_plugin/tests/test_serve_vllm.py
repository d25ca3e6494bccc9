"""roe-vllm serve end to end: roe serve's request fields reach the plugin and give roe's tokens.

One ``roe-vllm serve`` subprocess per module (embedded default model, a registered schedule,
``--api-key``); roe's own tokens come from its transformers engine in the main venv (``.venv``,
transformers 5.23), run as a subprocess while the server starts. A request with RoE fields must
give exactly the tokens ``roe.roster(...).generate`` gives for the same settings and seed; a
request without them the untouched model's; every invalid value a 400 in vLLM's OpenAI error
format (never a 5xx), an unregistered schedule the same 400 whatever it names (a path that
exists included), and a request without the key a 401 even when its RoE fields are invalid.
The middleware's body rewriting is also checked alone, against a stub ASGI app (no server).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from roe_vllm.serve import RoEFields, parser, vllm_argv

ROOT = Path(__file__).resolve().parents[2]
ROE_PYTHON = ROOT / ".venv" / "bin" / "python"  # roe's own venv (transformers 5.23)
SCHEDULE = ROOT / "roe" / "assets" / "default" / "schedule.json"
KEY = "test-key"
PROMPT = "To be, or not to be, that is"
STEPS = 32
LOGPROB_TOL = 1e-4  # fp32 in both engines, different kernels and summation orders
START_TIMEOUT_S = 300

# (name, RoE request fields, the same settings as roe.RoEConfig keywords; tau "SCHEDULE" = the file)
CASES = [
    ("uniform", {"roster_size": 4, "tau": 0.3, "seed": 3}, {"roster_size": 4, "tau": 0.3, "seed": 3}),
    ("schedule", {"roster_size": 8, "schedule": "calib", "seed": 1}, {"roster_size": 8, "tau": "SCHEDULE", "seed": 1}),
    ("list", {"roster_size": 4, "tau": [0.0, 0.5, 0.2, 0.4, 0.1, 0.3], "seed": 0},
     {"roster_size": 4, "tau": [0.0, 0.5, 0.2, 0.4, 0.1, 0.3], "seed": 0}),
    ("skips", {"roster_size": 2, "tau": 2.0, "skip_first": 0, "skip_last": 2, "seed": 7},
     {"roster_size": 2, "tau": 2.0, "skip_first": 0, "skip_last": 2, "seed": 7}),
    ("model_default", {"roster_size": 4, "seed": 2}, {"roster_size": 4, "seed": 2}),  # no tau: the shipped schedule
    ("dial_k1", {"roster_size": 1, "experts_per_token": 2}, {"roster_size": 1, "experts_per_token": 2}),
    ("dial", {"roster_size": 4, "tau": 0.3, "seed": 3, "experts_per_token": 6},
     {"roster_size": 4, "tau": 0.3, "seed": 3, "experts_per_token": 6}),
    ("plain", {}, {"roster_size": 1}),
]

ROE_SIDE = r"""
import json, sys
import torch
import roe

cases, prompt, steps, schedule = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
model, tokenizer = roe.load()
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = {"prompt_ids": ids[0].tolist()}
for name, cfg in cases.items():
    cfg = {**cfg, "tau": schedule} if cfg.get("tau") == "SCHEDULE" else cfg
    chosen = []  # log-prob of each chosen token under the RoE average
    with roe.roster(model, roe.RoEConfig(**cfg)) as r:
        tokens = r.generate(ids, max_new_tokens=steps, eos_token_id=-1,  # no eos stop, as ignore_eos
                            on_step=lambda t_B, lp_BV: chosen.append(lp_BV[0, t_B[0]].item()))
    out[name] = {"tokens": tokens[0, ids.shape[1]:].tolist(), "logprobs": chosen}
from roe.serve.protocol import chat_prompt_ids  # roe serve's chat prompt
chat = torch.tensor([chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])])
chosen = []
with roe.roster(model, roe.RoEConfig(**cases["uniform"])) as r:
    tokens = r.generate(chat, max_new_tokens=steps, eos_token_id=-1,
                        on_step=lambda t_B, lp_BV: chosen.append(lp_BV[0, t_B[0]].item()))
out["chat"] = {"prompt_ids": chat[0].tolist(), "tokens": tokens[0, chat.shape[1]:].tolist(), "logprobs": chosen}
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"roe-vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"roe-vllm serve not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def roe_tokens():
    """roe's own greedy tokens per case (transformers engine, main venv), started before the server."""
    cases = {name: cfg for name, _, cfg in CASES}
    proc = subprocess.Popen([str(ROE_PYTHON), "-c", ROE_SIDE, json.dumps(cases), PROMPT, str(STEPS), str(SCHEDULE)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc
    proc.kill()


def _serve(tmp_path_factory, multiprocessing: str):
    """A ``roe-vllm serve`` subprocess (default model, schedule "calib", --api-key) and a client for it."""
    port, log = _free_port(), tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [str(Path(sys.executable).parent / "roe-vllm"), "serve", "--port", str(port), "--schedule",
           f"calib={SCHEDULE}", "--api-key", KEY, "--max-model-len", "512"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": multiprocessing}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(roe_tokens, tmp_path_factory):
    # the server as users run it: engine core in its own process (conftest.py sets in-process for LLM tests)
    yield from _serve(tmp_path_factory, "1")


@pytest.fixture(scope="module")
def in_process_server(roe_tokens, tmp_path_factory):
    """The engine inside the API server's process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    yield from _serve(tmp_path_factory, "0")


@pytest.fixture(scope="module")
def expected(roe_tokens):
    out, err = roe_tokens.communicate(timeout=600)
    assert roe_tokens.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _complete(client: httpx.Client, **fields) -> httpx.Response:
    body = {"model": _model(client), "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 0, **fields}
    return client.post("/v1/completions", json=body)


def _model(client: httpx.Client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def _tokens(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


# ---------------------------------------------------------------- against roe's engine


def _gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _assert_roe_engines(response: httpx.Response, expected: dict, name: str) -> None:
    assert _tokens(response) == expected[name]["tokens"]
    choice = response.json()["choices"][0]
    assert choice["prompt_token_ids"] == expected["prompt_ids"]
    assert _gap(choice["logprobs"]["token_logprobs"], expected[name]["logprobs"]) <= LOGPROB_TOL


@pytest.mark.parametrize("name,fields", [(n, f) for n, f, _ in CASES])
def test_tokens_equal_roe_engine(server, expected, name, fields):
    _assert_roe_engines(_complete(server, **fields), expected, name)


@pytest.mark.parametrize("name,fields", [(n, f) for n, f, _ in CASES])
def test_in_process_engine_gives_roe_engines_tokens(in_process_server, expected, name, fields):
    """The engine inside the API server's process: its model and logits processor are built from
    different copies of the engine config there, and RoE requests once came back as plain ones."""
    _assert_roe_engines(_complete(in_process_server, **fields), expected, name)


@pytest.mark.parametrize("which", ["server", "in_process_server"])
def test_choice_i_of_n_runs_with_seed_plus_i(request, expected, which):
    """As in roe serve: choice 1 of a request with seed 2 is roe's engine at seed 3 (the "uniform" case)."""
    fields = {**CASES[0][1], "seed": CASES[0][1]["seed"] - 1}
    # top_k=1: argmax tokens with n > 1 (vLLM refuses n > 1 with temperature 0)
    response = _complete(request.getfixturevalue(which), n=2, temperature=1.0, top_k=1, **fields)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[1]["token_ids"] == expected["uniform"]["tokens"]
    assert _gap(choices[1]["logprobs"]["token_logprobs"], expected["uniform"]["logprobs"]) <= LOGPROB_TOL
    assert _gap(choices[0]["logprobs"]["token_logprobs"], expected["uniform"]["logprobs"]) > 100 * LOGPROB_TOL


def test_cases_differ_from_the_untouched_model(expected):
    """Each case's settings move the log-probs far beyond the tolerance, and one the tokens too,
    so the equalities above see whether the settings arrived (greedy tokens alone mostly do not)."""
    plain = expected["plain"]
    for name, _, _ in CASES[:-1]:
        assert _gap(expected[name]["logprobs"], plain["logprobs"]) > 100 * LOGPROB_TOL, name
    assert expected["skips"]["tokens"] != plain["tokens"]


def test_chat_gives_roe_serves_prompt_and_roe_tokens(server, expected):
    body = {"model": "roe", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": STEPS,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True, "logprobs": True, **CASES[0][1]}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert response.json()["prompt_token_ids"] == expected["chat"]["prompt_ids"]
    assert choice["token_ids"] == expected["chat"]["tokens"]
    chosen = [t["logprob"] for t in choice["logprobs"]["content"]]
    assert _gap(chosen, expected["chat"]["logprobs"]) <= LOGPROB_TOL


def test_roster_size_1_is_the_request_without_fields(server):
    plain = _complete(server, logprobs=5).json()["choices"][0]["logprobs"]
    k1 = _complete(server, roster_size=1, tau=0.3, logprobs=5).json()["choices"][0]["logprobs"]
    assert k1 == plain


def test_streaming_gives_the_same_tokens(server, expected):
    fields = CASES[0][1]
    body = {"model": _model(server), "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": True, **fields}
    tokens = []
    with server.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
    assert tokens == expected["uniform"]["tokens"]


# ---------------------------------------------------------------- refusals


INVALID = [
    {"roster_size": 0}, {"roster_size": "4"}, {"roster_size": 2.5}, {"roster_size": True}, {"roster_size": 10**6},
    {"tau": -0.1}, {"tau": "0.3"}, {"tau": []}, {"tau": [0.1, "x"]}, {"tau": {"a": 1}},
    {"seed": -1}, {"seed": 1 << 63}, {"seed": "1"},
    {"skip_first": -1}, {"skip_last": 1.5},
    {"schedule": 3}, {"experts_per_token": 0}, {"experts_per_token": "2"}, {"experts_per_token": 33},
    # checked by the plugin at admission (they need the model's 6 MoE layers)
    {"roster_size": 4, "skip_first": 4, "skip_last": 4}, {"roster_size": 4, "tau": [0.1, 0.2, 0.3]},
    {"roster_size": 4, "tau": 0.2, "schedule": "calib"}, {"roster_size": 4, "tau": 0.2, "prompt_logprobs": 1},
    {"roster_size": 4, "tau": 0.2, "best_of": 2}, {"roster_size": 4, "seed": (1 << 63) - 1, "n": 2},
]


@pytest.mark.parametrize("fields", INVALID, ids=[json.dumps(f) for f in INVALID])
def test_invalid_fields_answer_400(server, fields):
    response = _complete(server, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"] == 400
    assert server.get("/health").status_code == 200


def test_unregistered_schedule_reveals_nothing(server):
    """A name, a typo, an existing file by absolute and relative path: one and the same answer."""
    probes = ["nope", "Calib", str(SCHEDULE), "roe/assets/default/schedule.json", "/etc/passwd", "../" * 8]
    bodies = set()
    for probe in probes:
        response = _complete(server, roster_size=4, schedule=probe)
        assert response.status_code == 400, response.text
        assert probe not in response.text and "calib" not in response.text
        bodies.add(response.text)
    assert len(bodies) == 1


def test_api_key_is_checked_before_the_fields(server):
    headers = {"Authorization": "Bearer wrong"}
    body = {"model": _model(server), "prompt": PROMPT, "max_tokens": 2}
    for fields in ({"roster_size": 4, "tau": 0.3}, {"roster_size": 0}, {"schedule": "/etc/passwd"}):
        response = server.post("/v1/completions", json={**body, **fields}, headers=headers)
        assert response.status_code == 401, response.text


# ---------------------------------------------------------------- the middleware alone


def _through(body: bytes, path: str = "/v1/completions", schedules=("calib",)):
    """(status, response body, what the app below received) for one request through RoEFields."""
    seen = {}

    async def app(scope, receive, send):
        parts, more = [], True
        while more:
            message = await receive()
            parts.append(message["body"])
            more = message.get("more_body", False)
        seen.update(body=b"".join(parts), headers=dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    class State:
        vllm_config = type("C", (), {"additional_config": {"roe": {"schedules": dict.fromkeys(schedules, [0.1])}}})

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"%d" % len(body))],
             "app": type("A", (), {"state": State})}
    chunks = [body[:5], body[5:]]
    sent = []

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    asyncio.run(RoEFields(app)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), seen


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_middleware_moves_fields_into_vllm_xargs(path):
    body = {"prompt": "x", "roster_size": 4, "seed": 5, "schedule": "calib", "vllm_xargs": {"other": 1}}
    status, _, seen = _through(json.dumps(body).encode(), path)
    received = json.loads(seen["body"])
    assert status == 200
    assert received == {"prompt": "x", "seed": 5,
                        "vllm_xargs": {"other": 1, "roster_size": 4, "seed": 5, "tau": [0.1]}}  # calib's taus
    assert seen["headers"][b"content-length"] == str(len(seen["body"])).encode()


@pytest.mark.parametrize("path,body", [("/v1/completions", b'{"prompt": "x", "max_tokens": 3}'),
                                       ("/v1/completions", b"not json"),
                                       ("/v1/embeddings", b'{"input": "x", "roster_size": 0}')])
def test_middleware_passes_other_requests_byte_for_byte(path, body):
    status, _, seen = _through(body, path)
    assert status == 200 and seen["body"] == body


def test_middleware_refuses_a_field_given_twice():
    status, text, seen = _through(json.dumps({"roster_size": 4, "vllm_xargs": {"roster_size": 2}}).encode())
    assert status == 400 and json.loads(text)["error"]["param"] == "roster_size" and not seen


# ---------------------------------------------------------------- the command line


def _vllm_argv(*args: str) -> list[str]:
    ns, rest = parser().parse_known_args(["serve", *args])
    return vllm_argv(ns, rest)


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_command_line_defaults_reach_additional_config():
    argv = _vllm_argv("-K", "4", "--tau", "0.2", "--seed", "9", "--schedule", f"calib={SCHEDULE}",
                      "--additional-config", '{"other": 1}', "--max-model-len", "512", "--api-key", "k")
    extra = json.loads(_value(argv, "--additional-config"))
    assert extra["other"] == 1
    assert {k: extra["roe"][k] for k in ("roster_size", "tau", "seed")} == {"roster_size": 4, "tau": 0.2, "seed": 9}
    assert extra["roe"]["schedules"]["calib"] == json.loads(SCHEDULE.read_text())
    assert argv.count("--additional-config") == 1
    assert argv[-4:] == ["--max-model-len", "512", "--api-key", "k"]
    assert _value(argv, "--host") == "127.0.0.1" and _value(argv, "--middleware") == "roe_vllm.serve.RoEFields"


def test_command_line_without_K_leaves_requests_untouched():
    extra = json.loads(_value(_vllm_argv(), "--additional-config"))
    assert extra["roe"] == {"roster_size": 1}


def test_command_line_keeps_the_users_middleware_and_dtype():
    argv = _vllm_argv("--middleware", "my.Mw", "--dtype", "bfloat16", "--sched", "x")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--middleware"] == ["my.Mw", "roe_vllm.serve.RoEFields"]
    assert argv.count("--dtype") == 1 and _value(argv, "--dtype") == "bfloat16"
    assert argv[-2:] == ["--sched", "x"]  # not taken for an abbreviation of --schedule: vLLM reports it

