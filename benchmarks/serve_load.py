"""Load test of `roe serve` on loopback: N client threads, M completions each, bounded in time.

Starts `python -m roe serve` as a subprocess on 127.0.0.1 (a free port), waits for /health,
warms up with one request, then runs the clients (each request: a short prompt, greedy, fixed
seed, --max-tokens new tokens, RoE settings from the command line). Reports throughput
(requests/s and completion tokens/s), p50/p99 latency, errors by status, and the server's RSS
before and after the load. The last line is one JSON document. Nothing leaves the machine.

    python benchmarks/serve_load.py --model PATH --clients 4 --requests 5 --max-time 50
"""

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["To be, or not to be", "In the beginning was", "The quick brown fox", "It was the best of times",
           "Call me Ishmael", "Once upon a time"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "roe", "serve", "--port", str(port), "--threads", str(args.threads),
           "-K", str(args.roster_size), "--tau", str(args.tau), "--max-batch", str(args.max_batch),
           "--max-queue", str(args.max_queue)]
    return launch(cmd + (["--model", args.model] if args.model else []), port)


def launch(cmd: list[str], port: int, timeout: float = 300) -> subprocess.Popen:
    """Start ``roe serve`` and wait until its /health answers 200 (ready: warmed up, kernel built)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")


def client(url: str, model: str, args, index: int, stop_at: float, out: list) -> None:
    with httpx.Client(timeout=args.max_time) as http:
        for r in range(args.requests):
            if time.monotonic() > stop_at:
                return
            body = {"model": model, "prompt": PROMPTS[(index + r) % len(PROMPTS)], "max_tokens": args.max_tokens,
                    "seed": 0}
            t0 = time.perf_counter()
            try:
                response = http.post(f"{url}/v1/completions", json=body)
                status = response.status_code
                tokens = response.json()["usage"]["completion_tokens"] if status == 200 else 0
            except httpx.HTTPError as err:
                status, tokens = type(err).__name__, 0
            out.append({"latency_s": time.perf_counter() - t0, "status": status, "tokens": tokens})


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-time", type=float, default=50.0, help="seconds; clients stop sending after this")
    parser.add_argument("-K", "--roster-size", type=int, default=4)
    parser.add_argument("--tau", type=float, default=0.3)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "warm up", "max_tokens": 2},
                   timeout=args.max_time)
        rss_before = rss_mb(proc.pid)
        results: list[dict] = []
        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(url, model, args, i, start + args.max_time, results))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        rss_after = rss_mb(proc.pid)
        batches = httpx.get(f"{url}/health").json()["batches"]
    finally:
        proc.terminate()
        proc.wait(30)

    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    latencies = [r["latency_s"] for r in ok]
    report = {
        "requests": len(results), "ok": len(ok), "errors": errors, "wall_s": wall,
        "requests_per_s": len(ok) / wall, "completion_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "batches": batches, "rss_before_mb": rss_before, "rss_after_mb": rss_after,
        "conditions": {"model": args.model or "embedded default", "clients": args.clients,
                       "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                       "roster_size": args.roster_size, "tau": args.tau, "max_batch": args.max_batch,
                       "threads": args.threads, "machine": platform.machine(), "python": platform.python_version()},
    }
    print(f"{len(ok)}/{len(results)} ok in {wall:.1f} s: {report['requests_per_s']:.2f} req/s, "
          f"{report['completion_tokens_per_s']:.1f} tok/s, p50 {report['latency_p50_s']:.3f} s, "
          f"p99 {report['latency_p99_s']:.3f} s, errors {errors}, RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
