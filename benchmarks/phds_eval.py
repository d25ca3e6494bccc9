"""The sparsity dial before and after a fine-tune: NLL at every k, paired, and cross-sparsity agreement.

    python benchmarks/phds_eval.py --models runs/phds,runs/oracle-k1 --ks 1,2,3,4,6,8 --max-windows 400 \
        --out benchmarks/results/phds_eval.json

Every model is scored at K = 1 (no roster noise) with the experts-per-token dial at each k of
--ks (``RoEConfig(experts_per_token=k)``; the model's own k is its untouched forward), on the
same windows of the held-out text (``roe.loading.held_out_windows``: the embedded test split by
default, as ``roe eval``). Per (model, k):

- ``nll``: mean NLL per predicted token;
- ``vs_base_same_k``: the paired per-window change against the base model (the embedded one,
  untouched) at the same k, with its SE sd(delta_w) / sqrt(n): what the fine-tune did to that
  level;
- ``vs_base_own_k``: the same against the base model at its own k: what serving this model at k
  costs against the model as shipped;
- ``agreement``: the share of predicted positions whose greedy next token at k equals the one the
  same model predicts at its own k (MoE-PHDS's cross-sparsity agreement);
- ``vs_same_k``: the paired change against every other fine-tuned model at the same k (the PHDS
  model against the oracle fine-tuned at that single k, with the same budget, is the issue's
  control).

``--tasks N`` also scores every (model, k) on the built-in tasks (``roe tasks``: next-line and
last-word, N items each, from the same text) at K = 1: accuracy with its Wilson interval and the
paired McNemar comparison against the base model at the same k (``tasks`` in each row).

The last line of stdout is the JSON document (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def window_scores(model, k: int | None, windows_NW: torch.Tensor, batch_size: int):
    """Per-window mean NLL [N] and greedy next tokens [N, W] of ``model`` dialled to k (None: its own)."""
    import roe

    cfg = roe.RoEConfig(roster_size=1, tau=0.0, experts_per_token=k)
    nll, greedy = [], []
    with torch.no_grad(), roe.roster(model, cfg) as r:
        for batch in windows_NW.split(batch_size):
            logprobs_BSV = r.score(batch[:, :-1])
            targets_BS = batch[:, 1:]
            nll.append(-logprobs_BSV.gather(-1, targets_BS[..., None])[..., 0].double().mean(dim=1))
            greedy.append(logprobs_BSV.argmax(dim=-1))
    return torch.cat(nll), torch.cat(greedy)


def paired(nll_N: torch.Tensor, base_N: torch.Tensor) -> dict:
    delta_N = nll_N - base_N
    return {"delta": float(delta_N.mean()), "se": float(delta_N.std() / math.sqrt(len(delta_N)))}


def task_scores(model, tokenizer, k: int | None, items: dict, batch_size: int) -> dict:
    """Per-item correctness {task: [bool]} of ``model`` dialled to k (None: its own), at K = 1."""
    import roe
    from roe.eval.tasks import correct

    cfg = roe.RoEConfig(roster_size=1, tau=0.0, experts_per_token=k)
    with torch.no_grad():
        return {task: correct(model, tokenizer, task, task_items, cfg, batch_size)
                for task, task_items in items.items()}


def task_rows(right: dict, base_right: dict) -> dict:
    """Accuracy, Wilson interval and McNemar against the base at the same k, per task."""
    from roe.eval.tasks import mcnemar, wilson

    return {task: {"accuracy": sum(r) / len(r), "wilson95": wilson(sum(r), len(r)), "items": len(r),
                   "vs_base_same_k": mcnemar(base_right[task], r)} for task, r in right.items()}


def evaluate(models: dict, ks: list[int], own_k: int, windows_NW: torch.Tensor, batch_size: int,
             tasks: tuple | None = None) -> dict:
    """Rows for every (model, k); ``models`` maps a label to a loaded model, the base first.

    ``tasks``: (tokenizer, {task: items}) to score the built-in tasks too.
    """
    from tqdm import tqdm

    pairs = [(label, k) for label in models for k in ks]
    scores = {(label, k): window_scores(models[label], None if k == own_k else k, windows_NW, batch_size)
              for label, k in tqdm(pairs, desc="nll", unit="(model, k)")}
    base = next(iter(models))
    rows = []
    for label in models:
        own_greedy = scores[(label, own_k)][1]
        for k in ks:
            nll_N, greedy = scores[(label, k)]
            rows.append({"model": label, "k": k, "nll": float(nll_N.mean()),
                         "vs_base_same_k": paired(nll_N, scores[(base, k)][0]),
                         "vs_base_own_k": paired(nll_N, scores[(base, own_k)][0]),
                         "agreement": float((greedy == own_greedy).double().mean()),
                         "vs_same_k": {other: paired(nll_N, scores[(other, k)][0])
                                       for other in models if other not in (base, label)}})
    if tasks is not None:
        tokenizer, items = tasks
        right = {(label, k): task_scores(models[label], tokenizer, None if k == own_k else k, items, batch_size)
                 for label, k in tqdm(pairs, desc="tasks", unit="(model, k)")}
        for row in rows:
            row["tasks"] = task_rows(right[(row["model"], row["k"])], right[(base, row["k"])])
    return {"rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated checkpoint directories (the base is "
                                                     "the embedded model, always scored first)")
    ap.add_argument("--ks", default="1,2,3,4,6,8")
    ap.add_argument("--text", default=None, help="default: the embedded test split")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=0, metavar="N",
                    help="also the built-in tasks, N items each (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from roe.loading import default_split_path, held_out_windows, load

    base, tokenizer = load(None)
    models = {"base": base}
    for path in args.models.split(","):
        if not Path(path, "config.json").is_file():
            raise SystemExit(f"{path}: not a checkpoint directory (no config.json)")
        models[path] = load(path)[0]
    own_k = base.config.num_experts_per_tok
    ks = [int(k) for k in args.ks.split(",")]
    if own_k not in ks:
        raise SystemExit(f"--ks must include the model's own k ({own_k}): agreement is measured against it")
    text = args.text or default_split_path("test")
    windows_NW = held_out_windows(tokenizer, text, args.window, args.max_windows)
    tasks = None
    if args.tasks:
        from roe.eval import tasks as builtin

        docs = builtin.read_documents(text)
        tasks = (tokenizer, {"next-line": builtin.next_line_items(docs, tokenizer, args.tasks),
                             "last-word": builtin.last_word_items(docs, tokenizer, args.tasks)})
    doc = evaluate(models, ks, own_k, windows_NW, args.batch_size, tasks)
    doc["conditions"] = {"text": str(args.text or "embedded test split"), "windows": len(windows_NW),
                         "window": args.window, "own_k": own_k, "models": list(models), "task_items": args.tasks,
                         "command": "python benchmarks/phds_eval.py " + " ".join(argv or __import__("sys").argv[1:])}
    for r in doc["rows"]:
        print(f"{r['model']:>16} k={r['k']}: NLL {r['nll']:.4f}  vs base same k {r['vs_base_same_k']['delta']:+.4f} "
              f"+- {r['vs_base_same_k']['se']:.4f}  vs base own k {r['vs_base_own_k']['delta']:+.4f} "
              f"+- {r['vs_base_own_k']['se']:.4f}  agreement {r['agreement']:.4f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
