"""roe serve as a stranger meets it: named schedules only, an API key, JSON only, the Host header,
bounded bodies, prompts and cost, input that once gave 500s, abandoned requests, readiness, and
the serving examples of the README and docs/ run verbatim.

Each test here failed on the server before issue 17 (a path opened as the server's user, no key,
OverflowError / ValueError / UnicodeEncodeError 500s, 429 for a request that can never fit,
/health 200 while warming or with a dead worker, ``model="roe"`` a 404).
"""

import json
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from openai import OpenAI
from test_serve import offline_text, running

import roe
from roe.schedule import Schedule
from roe.serve import ServeConfig, create_app

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def moe_layers(model) -> int:
    with roe.roster(model, roe.RoEConfig(roster_size=1, tau=0.0, skip_first=0, skip_last=0)) as r:
        return len(r.slots)


@pytest.fixture(scope="module")
def offline(saved_model):
    """A second copy of the model: the server's worker owns the first."""
    return roe.load(saved_model)


@pytest.fixture(scope="module")
def secured(saved_model, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = roe.load(saved_model)
    layers = moe_layers(model)
    folder = tmp_path_factory.mktemp("schedules")
    schedule = Schedule(tau=tuple(0.2 + 0.1 * i for i in range(layers)), provenance={"kind": "test"})
    schedule.save(folder / "cal.json")
    cfg = ServeConfig(model_id="tiny", roster_size=3, tau=0.5, max_tokens_limit=32, max_queue=8, max_batch=4,
                      threads=1, api_key=KEY, schedules={"cal": str(folder / "cal.json")}, max_body_bytes=1 << 18,
                      max_prompt_chars=300, max_request_cost=3 * 32 * 4)
    app = create_app(model, tokenizer, cfg)
    with running(app) as (_, url):
        yield SimpleNamespace(url=url, app=app, folder=folder, schedule=schedule, layers=layers,
                              client=OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0))
    torch.set_num_threads(threads)


def post(server, body, *, path="/v1/completions", headers=None, **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = {**AUTH, "content-type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=head, **kwargs)


def assert_openai_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error


def assert_alive(server):
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---------------------------------------------------------------- item 1: schedules are names


def test_a_registered_schedule_name_is_used(secured, offline):
    got = post(secured, {"model": "tiny", "prompt": "To be", "max_tokens": 6, "schedule": "cal"})
    assert got.status_code == 200, got.text
    ids = offline[1]("To be").input_ids
    want = offline_text(offline, ids, max_tokens=6, tau=list(secured.schedule.tau))
    assert got.json()["choices"][0]["text"] == want
    assert httpx.get(f"{secured.url}/v1/models", headers=AUTH).json()["schedules"] == ["cal"]


def test_schedule_paths_reveal_nothing(secured):
    """A real schedule file, a non-JSON file, a missing one and an unknown name get one identical answer."""
    real = secured.folder / "cal.json"
    not_json = secured.folder / "notes.txt"
    not_json.write_text("not json")
    answers = [post(secured, {"prompt": "hi", "schedule": name})
               for name in (str(real), str(not_json), "/nonexistent/x.json", "/etc/shadow", "../cal", "nope")]
    for answer in answers:
        assert_openai_error(answer, 400, "unknown_schedule")
    assert len({a.content for a in answers}) == 1
    assert str(secured.folder) not in answers[0].text


def test_a_schedule_for_another_model_is_refused_at_start_up(saved_model, tmp_path):
    model, tokenizer = roe.load(saved_model)
    Schedule(tau=(0.1,) * (moe_layers(model) + 1)).save(tmp_path / "wrong_length.json")
    Schedule(tau=(0.1,) * moe_layers(model), provenance={"model": "other", "fingerprint": {"model_type": "mixtral"}}
             ).save(tmp_path / "other_model.json")
    for name in ("wrong_length", "other_model"):
        with pytest.raises(ValueError, match=f"schedule '{name}'"):
            create_app(model, tokenizer, ServeConfig(schedules={name: str(tmp_path / f"{name}.json")}))


def test_a_tau_list_per_layer(secured, offline):
    tau = [0.3] * secured.layers
    got = post(secured, {"prompt": "To be", "max_tokens": 5, "tau": tau})
    assert got.status_code == 200, got.text
    ids = offline[1]("To be").input_ids
    assert got.json()["choices"][0]["text"] == offline_text(offline, ids, max_tokens=5, tau=tau)
    assert_openai_error(post(secured, {"prompt": "To be", "tau": [0.3] * (secured.layers + 1)}), 400)
    assert_openai_error(post(secured, {"prompt": "To be", "tau": [0.3, "x"] * secured.layers}), 400)


# ---------------------------------------------------------------- item 2: key, JSON only, Host


def test_every_v1_route_needs_the_key(secured):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/nowhere"), ("GET", "/openapi.json"), ("GET", "/docs")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, f"{secured.url}{path}", headers=headers, json={"prompt": "hi"})
            assert_openai_error(response, 401, "invalid_api_key")
    assert httpx.get(f"{secured.url}/health").status_code == 200  # health needs no key
    assert secured.client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_only_json_bodies(secured, content_type):
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    response = httpx.post(f"{secured.url}/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                          headers=headers)
    assert_openai_error(response, 415, "unsupported_media_type")


def test_the_host_header_must_name_this_server(secured, saved_model):
    port = secured.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "attacker.localhost.evil"):
        assert_openai_error(post(secured, {"prompt": "hi", "max_tokens": 2}, headers={"host": host}), 400,
                            "invalid_host")
        assert_openai_error(httpx.get(f"{secured.url}/health", headers={"host": host}), 400, "invalid_host")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}"):
        assert post(secured, {"prompt": "hi", "max_tokens": 2}, headers={"host": host}).status_code == 200
    model, tokenizer = roe.load(saved_model)
    app = create_app(model, tokenizer, ServeConfig(model_id="tiny", allowed_hosts=("api.example",), threads=1))
    with running(app) as (_, url):
        assert httpx.get(f"{url}/health", headers={"host": "api.example:443"}).status_code == 200
        assert httpx.get(f"{url}/health", headers={"host": "evil.example"}).status_code == 400


# ---------------------------------------------------------------- item 3: bounded cost


def test_large_bodies_are_413(secured):
    big = json.dumps({"prompt": "x" * 300_000}).encode()
    assert_openai_error(post(secured, big), 413, "body_too_large")

    def chunks():  # no Content-Length: the cap holds while reading
        for _ in range(300):
            yield b" " * 1000
        yield b'{"prompt": "hi"}'

    response = httpx.post(f"{secured.url}/v1/completions", content=chunks(),
                          headers={**AUTH, "content-type": "application/json"})
    assert_openai_error(response, 413, "body_too_large")
    assert_alive(secured)


def test_prompt_characters_are_bounded_and_tokenised_off_the_event_loop(secured):
    assert_openai_error(post(secured, {"prompt": "a" * 301}), 400, "prompt_too_long")
    assert_openai_error(post(secured, {"prompt": ["a" * 200, "b" * 200]}), 400, "prompt_too_long")
    assert_openai_error(post(secured, {"messages": [{"role": "user", "content": "a" * 301}]},
                             path="/v1/chat/completions"), 400, "prompt_too_long")
    tokenizer = secured.app.state.service.facts.tokenizer
    seen, call = [], type(tokenizer).__call__

    def spy(self, *args, **kwargs):
        seen.append(threading.current_thread().name)
        return call(self, *args, **kwargs)

    type(tokenizer).__call__ = spy
    try:
        assert post(secured, {"prompt": "To be", "max_tokens": 2}).status_code == 200
    finally:
        type(tokenizer).__call__ = call
    assert seen and all(name.startswith("roe-serve-parse") for name in seen), seen


def test_a_request_that_can_never_fit_is_400(secured):
    over = post(secured, {"prompt": "hi", "roster_size": 3, "n": 5, "max_tokens": 32})  # 480 > 384
    assert_openai_error(over, 400, "over_budget")
    assert_openai_error(post(secured, {"prompt": ["a"] * 9, "roster_size": 1, "max_tokens": 1}), 400,
                        "too_many_choices")
    assert_alive(secured)


# ---------------------------------------------------------------- item 4: no input gives a 500

HUGE = "1" * 400
NASTY = [
    b'{"prompt": "hi", "temperature": %s}' % HUGE.encode(),
    b'{"prompt": "hi", "top_p": %s}' % HUGE.encode(),
    b'{"prompt": "hi", "tau": %s}' % HUGE.encode(),
    b'{"prompt": "hi", "tau": [%s]}' % HUGE.encode(),
    b'{"prompt": "hi", "seed": %s}' % HUGE.encode(),
    b'{"prompt": "hi", "max_tokens": %s}' % (b"9" * 5000),
    b'{"prompt": "hi", "temperature": 1e999}',
    b'{"prompt": "hi", "temperature": NaN}',
    b'{"prompt": "\\ud800"}',
    b'{"prompt": ["ok", "\\udfff"]}',
    b'{"prompt": "hi", "stop": ["\\ud800"]}',
    b'{"prompt": "hi", "model": "\\ud800"}',
    b'{"prompt": "hi", "schedule": "\\ud800"}',
    b'{"prompt": "hi", "user": "\\ud800"}',
    b'{"prompt": "hi", "\\ud800": 1}',
    b'{"prompt": "hi"' + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'\xff\xfe{"prompt": "hi"}',
    b'{"prompt": "hi", "stream_options": [null, null]}',
    b'{"prompt": "hi", "stream_options": []}',
    b'{"prompt": "hi", "stream": {}}',
    b'{"prompt": "hi", "best_of": true}',
    b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": 0}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
]


@pytest.mark.parametrize("content", NASTY, ids=[repr(c[:40]) for c in NASTY])
def test_nasty_input_is_400_not_500(secured, content):
    path = "/v1/chat/completions" if b'"messages"' in content else "/v1/completions"
    assert_openai_error(post(secured, content, path=path), 400)
    assert_alive(secured)


def test_lone_surrogates_in_chat_messages_are_400(secured):
    for message in ({"role": "user", "content": "\ud800"}, {"role": "user", "content": [{"type": "text",
                                                                                        "text": "a\udc00"}]}):
        response = post(secured, json.dumps({"messages": [message]}).encode(), path="/v1/chat/completions")
        assert_openai_error(response, 400, "invalid_unicode")


# ---------------------------------------------------------------- item 5: abandoned requests stop


def raw_request(url: str, body: dict) -> socket.socket:
    """Send a completion request on a raw socket and return it, unanswered."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (host.encode(), KEY.encode(), len(payload), payload))
    return sock


def test_a_disconnected_client_stops_its_work(saved_model):
    """Steps are counted at the input embedding (one call per decode step); after the client
    hangs up the count stops within a few steps, far short of what the request asked for."""
    model, tokenizer = roe.load(saved_model)
    model.generation_config.eos_token_id = None  # nothing ends the request early but the hang-up
    steps = []
    model.get_input_embeddings().register_forward_hook(lambda *_: steps.append(time.monotonic()))
    cfg = ServeConfig(model_id="tiny", tau=0.5, threads=1, api_key=KEY, max_tokens_limit=240)
    app = create_app(model, tokenizer, cfg)
    with running(app) as (_, url):
        before = len(steps)
        sock = raw_request(url, {"prompt": "To be", "max_tokens": 240, "roster_size": 64, "n": 4})
        deadline = time.monotonic() + 30
        while len(steps) < before + 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()
        hung_up = len(steps)
        time.sleep(1.0)
        settled, worker_steps = len(steps), app.state.service.worker.steps
        time.sleep(1.0)
        assert len(steps) == settled, "the worker still computes for a client that left"
        assert app.state.service.worker.steps == worker_steps
        assert settled - hung_up < 60 and settled - before < 200, (before, hung_up, settled)
        assert httpx.get(f"{url}/health").status_code == 200


# ---------------------------------------------------------------- item 7: readiness


def test_health_is_503_until_warmed_up_and_when_the_worker_dies(saved_model, monkeypatch):
    import roe.serve.app as serve_app

    release, warm = threading.Event(), serve_app.warm_up
    monkeypatch.setattr(serve_app, "warm_up", lambda *a: (release.wait(30), warm(*a)))
    model, tokenizer = roe.load(saved_model)
    app = create_app(model, tokenizer, ServeConfig(model_id="tiny", tau=0.5, threads=1))
    with running(app, wait_ready=False) as (_, url):
        starting = httpx.get(f"{url}/health")
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
        early = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert_openai_error(early, 503, "not_ready")
        assert early.headers["retry-after"]
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        worker = app.state.service.worker
        alive, dead = worker.thread, threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        worker.thread = dead
        try:
            gone = httpx.get(f"{url}/health")
            assert gone.status_code == 503 and gone.json()["status"] == "worker_dead"
            assert_openai_error(httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}), 503, "not_ready")
        finally:
            worker.thread = alive


def test_the_decode_kernel_is_prepared_before_ready(saved_model, monkeypatch):
    import roe.kernels

    prepared, prepare = [], roe.kernels.prepare
    monkeypatch.setattr(roe.kernels, "prepare", lambda: prepared.append(time.monotonic()) or prepare())
    model, tokenizer = roe.load(saved_model)
    app = create_app(model, tokenizer, ServeConfig(model_id="tiny", tau=0.5, threads=1))
    with running(app, wait_ready=False) as (_, url):
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert len(prepared) == 1


def test_warm_up_failure_keeps_health_503(saved_model, monkeypatch):
    import roe.serve.app as serve_app

    def broken(*_):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(serve_app, "warm_up", broken)
    model, tokenizer = roe.load(saved_model)
    app = create_app(model, tokenizer, ServeConfig(model_id="tiny", tau=0.5, threads=1))
    with running(app, wait_ready=False) as (_, url):
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["status"] == "starting":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        failed = httpx.get(f"{url}/health")
        assert failed.status_code == 503 and "no kernel" in failed.json()["detail"]


# ---------------------------------------------------------------- item 9: the README and docs, verbatim


def serving_blocks(page: Path) -> list[str]:
    """Every python code block of PAGE that talks to a server through the OpenAI client."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    return [b for b in blocks if "OpenAI(" in b and "base_url=" in b]


def test_the_readme_serving_examples_run_verbatim(saved_model):
    assert serving_blocks(ROOT / "README.md"), "the README shows no OpenAI client example"
    blocks = [b for page in PAGES for b in serving_blocks(page)]
    model, tokenizer = roe.load(saved_model)
    app = create_app(model, tokenizer, ServeConfig(threads=1, max_tokens_limit=64))
    with running(app) as (_, url):
        for block in blocks:
            assert "http://127.0.0.1:8000" in block
            scope = {}
            exec(block.replace("http://127.0.0.1:8000", url), scope)  # noqa: S102
            outputs = [v for v in scope.values() if hasattr(v, "choices")]
            assert outputs and all(o.choices and o.model == "roe-default" for o in outputs)
        listed = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert "roe" in listed


# ---------------------------------------------------------------- the command line


def test_roe_serve_registers_named_schedules_and_reads_the_vllm_key(tmp_path, monkeypatch):
    import roe.serve
    from roe.cli import main

    (tmp_path / "dir").mkdir()
    for name in ("calibrated", "flat"):
        (tmp_path / "dir" / f"{name}.json").write_text("{}")
    seen = {}
    monkeypatch.setattr(roe.serve, "run", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    main(["serve", "--schedule", "a=x.json", "--schedule", "b=y.json", "--schedule-dir", str(tmp_path / "dir"),
          "--default-schedule", "flat", "--allowed-hosts", "api.example, other.example"])
    cfg = seen["cfg"]
    assert cfg.schedules == {"a": "x.json", "b": "y.json", "calibrated": str(tmp_path / "dir" / "calibrated.json"),
                             "flat": str(tmp_path / "dir" / "flat.json")}
    assert cfg.schedule == "flat" and cfg.tau is None
    assert cfg.api_key == "from-env" and cfg.allowed_hosts == ("api.example", "other.example")
    main(["serve", "--api-key", "from-flag"])
    assert seen["cfg"].api_key == "from-flag" and seen["cfg"].schedules == {}
    for bad in (["--schedule", "x.json"], ["--schedule", "a=x.json", "--schedule", "a=y.json"],
                ["--schedule", "../a=x.json"], ["--default-schedule", "missing"], ["--schedule-dir", "/nonexistent"]):
        with pytest.raises(SystemExit):
            main(["serve", *bad])


# ---------------------------------------------------------------- fuzzing the OpenAPI document


def test_fuzzing_the_request_schemas_finds_no_5xx(secured):
    """Schemathesis draws bodies from the server's own request schemas (valid ones and ones that
    break them) and no answer is a 5xx. A short run; the full one is in the README's note."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{secured.url}/openapi.json", headers=AUTH)
    assert {"/v1/completions", "/v1/chat/completions"} <= set(schema.raw_schema["paths"])
    answered = []
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = schema[path]["POST"]
        body = operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
        assert {"roster_size", "tau", "seed", "schedule"} <= set(body["properties"])
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def no_server_error(case):
                response = case.call(base_url=secured.url, headers=AUTH, timeout=60)
                answered.append(response.status_code)
                assert response.status_code < 500, (case.body, response.text)

            no_server_error()
    assert 200 in answered and any(400 <= code < 500 for code in answered)
    assert_alive(secured)
