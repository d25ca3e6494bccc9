"""Copy the README's generated tables from the JSON results in benchmarks/results (never retyped).

    python benchmarks/update_readme.py

Each table sits between `<!-- begin NAME -->` and `<!-- end NAME -->` markers in README.md;
NAME is the stem of its JSON file: models (roe models --json), eval_test / eval_unseen
(roe eval --json), bench (roe bench --json).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from roe.support import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def eval_table(doc: dict) -> str:
    c = doc["conditions"]
    lines = [f"{c['windows']} windows x {c['window_tokens']} tokens = {c['tokens']:,} predicted tokens of "
             f"`{Path(c['text']).name}`; schedule: {Path(str(c['schedule'])).name}; seed {c['seed']}; "
             f"torch {c['torch']}, transformers {c['transformers']}.", "",
             "| K | NLL | perplexity | bits/byte | change vs K=1 | SE (paired) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['K']} | {r['nll']:.4f} | {r['ppl']:.3f} | {r['bpb']:.4f} | {r['delta_nll']:+.5f} | "
              f"{r['delta_se']:.5f} |" for r in doc["rows"]]
    return "\n".join(lines)


def bench_table(doc: dict) -> str:
    c = doc["conditions"]
    lines = [f"{c['cpu']}, {c['cores']} cores, {c['threads']} threads, {c['dtype']}, torch {c['torch']}, "
             f"transformers {c['transformers']}; {c['params'] / 1e6:.1f} M-parameter model; prompt "
             f"{c['prompt_tokens']} tokens, up to {c['new_tokens']} new tokens (time box {c['time_box_s']} s); "
             f"schedule {Path(str(c['schedule'])).name}.", "",
             "| method | K | decode step (ms) | x K=1 | TTFT (ms) | tokens/s | peak RSS (MB) | x K=1 | KV bytes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['K']} | {r['decode_step_ms']:.1f} | {r['step_ratio']:.2f} | {r['ttft_ms']:.0f} | "
              f"{r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_ratio']:.3f} | {r['kv_bytes']:,} |"
              for r in doc["rows"]]
    return "\n".join(lines)


RENDER = {"models": lambda d: markdown_table(d["rows"]), "eval": eval_table, "bench": bench_table}


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    for path in sorted(RESULTS.glob("*.json")):
        kind = next((k for k in RENDER if path.stem.startswith(k)), None)
        pattern = re.compile(rf"(<!-- begin {path.stem} -->\n).*?(<!-- end {path.stem} -->)", re.S)
        if kind is None or not pattern.search(readme):
            continue
        doc = json.loads(path.read_text().strip().splitlines()[-1])
        readme = pattern.sub(lambda m, d=doc, k=kind: m.group(1) + RENDER[k](d) + "\n" + m.group(2), readme)
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
