"""A short request sent while a costly one runs: how long does the short one wait? (issue 17 item 6)

Starts `python -m roe serve` on 127.0.0.1 (a free port, the embedded model unless --model),
waits for /health, warms up, then sends the costly completion (roster_size 64, n 16,
max_tokens 512 by default; --max-request-cost is raised so the server accepts it) and, --delay
seconds later, a short one (max_tokens 12, the server's default RoE settings). Reports both
latencies, status codes and token counts, and the server's /health counters. With the worker
running each batch to completion, the short one waited for the costly one (or its timeout);
scheduled by decode step, it joins the running forwards at once. The last line is one JSON
document. Nothing leaves the machine.

    python benchmarks/serve_short_behind_long.py --threads 2
"""

import argparse
import json
import platform
import subprocess
import sys
import threading
import time

import httpx
from serve_load import free_port, launch


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "roe", "serve", "--port", str(port), "--threads", str(args.threads),
           "--timeout", str(args.timeout), "--max-request-cost", str(args.long_roster * args.long_n * args.long_tokens)]
    return launch(cmd + (["--model", args.model] if args.model else []), port)


def timed_post(url: str, body: dict, out: dict, timeout: float) -> None:
    start = time.perf_counter()
    try:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)
        out["status"] = response.status_code
        usage = response.json().get("usage") if response.status_code == 200 else None
        out["completion_tokens"] = usage["completion_tokens"] if usage else 0
    except httpx.HTTPError as err:
        out["status"] = type(err).__name__
    out["latency_s"] = time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--long-roster", type=int, default=64)
    parser.add_argument("--long-n", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=512)
    parser.add_argument("--short-tokens", type=int, default=12)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds between the costly and the short request")
    parser.add_argument("--timeout", type=float, default=60.0, help="the server's --timeout (its default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        httpx.post(f"{url}/v1/completions", json={"prompt": "warm up", "max_tokens": 2}, timeout=120)
        long_out, short_out = {}, {}
        long_body = {"prompt": "It was the best of times", "roster_size": args.long_roster, "n": args.long_n,
                     "max_tokens": args.long_tokens, "temperature": 1.0, "seed": 0}
        costly = threading.Thread(target=timed_post, args=(url, long_body, long_out, args.timeout + 600))
        costly.start()
        time.sleep(args.delay)
        timed_post(url, {"prompt": "To be, or not to be", "max_tokens": args.short_tokens}, short_out,
                   args.timeout + 600)
        print(f"short request: {short_out}", flush=True)
        costly.join()
        health = httpx.get(f"{url}/health").json()
    finally:
        proc.terminate()
        proc.wait(60)
    report = {"short": short_out, "long": long_out, "health": health,
              "conditions": {"model": args.model or "embedded default", "long_roster_size": args.long_roster,
                             "long_n": args.long_n, "long_max_tokens": args.long_tokens,
                             "short_max_tokens": args.short_tokens, "delay_s": args.delay,
                             "server_timeout_s": args.timeout, "threads": args.threads,
                             "machine": platform.machine(), "python": platform.python_version()}}
    print(f"short request: {short_out['latency_s']:.1f} s ({short_out['status']}); "
          f"costly request: {long_out['latency_s']:.1f} s ({long_out['status']})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
