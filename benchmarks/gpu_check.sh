#!/usr/bin/env bash
# RoE on vLLM on an NVIDIA GPU: the plugin's exactness checks and its cost benchmark, one JSON, < 10 minutes.
#
#   benchmarks/gpu_check.sh CHECKPOINT_DIR [--out PATH] [--vllm-python PATH] [--roe-python PATH] [--dtype D]
#
# PREPARED, NEVER RUN: this project's machine has no GPU. Run from the repository root on a machine with
# an NVIDIA GPU, its driver, and a local checkpoint of a family the plugin supports (OLMoE, Mixtral,
# Qwen3-MoE; `roe_vllm.architectures`). It installs nothing; it needs:
#   --vllm-python (default .venv-vllm-gpu/bin/python): a venv with vLLM's CUDA build and this repository's
#       two packages without their dependencies:
#         python3 -m venv .venv-vllm-gpu && .venv-vllm-gpu/bin/pip install "vllm==0.32.0" pytest &&
#         .venv-vllm-gpu/bin/pip install --no-deps -e . -e vllm_plugin
#   --roe-python (default .venv/bin/python, `make install`): roe's own engine, the reference of step 2;
#       with a CUDA torch it runs on the GPU, else on the CPU. Skipped (and said so in the JSON) when it
#       fails, e.g. when the checkpoint does not fit.
# Steps (each under its own time limit, all within 600 s):
#   1. benchmarks/vllm_cost.py on the GPU: first the exactness check (32 greedy steps; K=1 must give plain
#      vLLM's tokens and log-probs bit for bit, K>1 must move them), then the decode step, TTFT and KV
#      bytes of plain vs K=1..16 at batch 1 and 8 (5 rounds).
#   2. roe's transformers engine on the same prompt, settings and seed: tokens and chosen-token log-probs
#      of K=4 and K=8 against the plugin's.
# Writes one JSON document (default benchmarks/results/gpu_check.json); exit status 1 when a check fails.
set -euo pipefail

fail() { echo "gpu_check: $*" >&2; exit 2; }

CKPT="" OUT=benchmarks/results/gpu_check.json VLLM_PY=.venv-vllm-gpu/bin/python ROE_PY=.venv/bin/python DTYPE=float32
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --vllm-python) VLLM_PY=$2; shift 2 ;;
    --roe-python) ROE_PY=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) fail "unknown option $1 (see --help)" ;;
    *) [ -z "$CKPT" ] || fail "one checkpoint only"; CKPT=$1; shift ;;
  esac
done
[ -n "$CKPT" ] || fail "usage: benchmarks/gpu_check.sh CHECKPOINT_DIR [--out PATH] (see --help)"
[ -f benchmarks/vllm_cost.py ] || fail "run it from the repository root"

# Fail fast, before anything loads: GPU, driver, venv, checkpoint.
command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi: this needs an NVIDIA GPU and its driver (none here)"
GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1) || true
[ -n "$GPU" ] || fail "nvidia-smi finds no GPU"
[ -f "$CKPT/config.json" ] || fail "$CKPT is not a local checkpoint directory (no config.json)"
[ -x "$VLLM_PY" ] || fail "$VLLM_PY not found: create the vLLM GPU venv as described in --help"
"$VLLM_PY" -c "import torch, vllm, roe_vllm; assert torch.cuda.is_available(), 'torch sees no CUDA device'" \
  || fail "$VLLM_PY cannot import torch+CUDA, vllm and roe_vllm (see --help)"

START=$SECONDS
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "gpu_check: $GPU; checkpoint $CKPT; dtype $DTYPE"

# 1. the plugin: exactness check, then the cost sweep, in one engine (one model load)
timeout 420 "$VLLM_PY" benchmarks/vllm_cost.py --model "$CKPT" --dtype "$DTYPE" --rounds 5 --new-tokens 32 \
  --check-steps 32 --out "$TMP/vllm.json" > "$TMP/vllm.log" 2>&1 \
  || { tail -40 "$TMP/vllm.log" >&2; fail "benchmarks/vllm_cost.py failed or took over 420 s (log above)"; }

# 2. roe's engine on the plugin's prompt and settings (K=4 and K=8)
LEFT=$((600 - (SECONDS - START) - 20))
ROE_STATUS=ok
if [ "$LEFT" -lt 60 ]; then
  ROE_STATUS="skipped: less than 60 s left of the 10 minutes"
elif [ ! -x "$ROE_PY" ]; then
  ROE_STATUS="skipped: $ROE_PY not found"
elif ! timeout "$LEFT" "$ROE_PY" - "$CKPT" "$TMP/vllm.json" "$TMP/roe.json" "$DTYPE" > "$TMP/roe.log" 2>&1 <<'PY'
import json, sys
import torch
import roe

ckpt, vllm_json, out, dtype = sys.argv[1:]
check = json.load(open(vllm_json))["check"]
device = "cuda" if torch.cuda.is_available() else "cpu"
model, _ = roe.load(ckpt, dtype=getattr(torch, dtype), device=device)
ids = torch.tensor([check["prompt_ids"]], device=device)
runs = {}
for name in ("K=4", "K=8"):
    s = check["settings"][name]
    chosen = []
    with roe.roster(model, roe.RoEConfig(roster_size=s["roster_size"], tau=s["tau"], seed=s["seed"])) as r:
        t = r.generate(ids, max_new_tokens=check["steps"], eos_token_id=-1,
                       on_step=lambda t_B, lp_BV: chosen.append(lp_BV[0, t_B[0]].item()))
    runs[name] = {"tokens": t[0, ids.shape[1]:].tolist(), "logprobs": chosen}
json.dump({"device": device, "runs": runs}, open(out, "w"))
PY
then
  ROE_STATUS="skipped: roe's engine failed ($(tail -1 "$TMP/roe.log"))"
fi

# 3. one JSON: the benchmark's document plus the comparison; exit 1 when a check fails
"$VLLM_PY" - "$TMP/vllm.json" "$TMP/roe.json" "$OUT" "$ROE_STATUS" "$GPU" "$((SECONDS - START))" <<'PY'
import json, os, sys

vllm_json, roe_json, out, roe_status, gpu, seconds = sys.argv[1:]
doc = json.load(open(vllm_json))
check = doc["check"]
ok = check["logprob_gap_vs_plain"]["K=1"] == 0.0 and check["tokens_equal_plain"]["K=1"]
ok &= all(gap > 0 for name, gap in check["logprob_gap_vs_plain"].items() if name not in ("plain", "K=1"))
compare = {"status": roe_status}
if roe_status == "ok":
    theirs = json.load(open(roe_json))
    for name, run in theirs["runs"].items():
        ours = check["first_prompt"][name]
        if len(ours["logprobs"]) != len(run["logprobs"]):
            raise SystemExit(f"{name}: {len(ours['logprobs'])} tokens from vLLM, {len(run['logprobs'])} from roe")
        gap = max(abs(a - b) for a, b in zip(ours["logprobs"], run["logprobs"]))
        compare[name] = {"tokens_equal": ours["tokens"] == run["tokens"], "max_logprob_gap": gap}
        ok &= ours["tokens"] == run["tokens"] and gap <= 1e-4
    compare["device"] = theirs["device"]
doc["gpu_check"] = {"gpu": gpu, "seconds": int(seconds), "roe_engine": compare, "passed": bool(ok)}
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
open(out, "w").write(json.dumps(doc) + "\n")
print(json.dumps(doc["gpu_check"]))
sys.exit(0 if ok else 1)
PY
