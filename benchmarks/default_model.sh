#!/usr/bin/env bash
# Everything measured on the default model after training, in order, into benchmarks/results/:
# ship the run, calibrate the schedule on validation, evaluate on the test split and on unseen
# English, built-in tasks, cost benchmarks and the step profile, then the model card and README.
#
#   bash benchmarks/default_model.sh runs/cont [runs/cont/history.json]
#
# Needs data/corpus and data/tokens (python -m tools.corpus / tools.tokenizer --encode) and
# writes data/unseen.txt (python -m tools.unseen). About 6 hours on 2 quiet cores.
set -euo pipefail
RUN=${1:?usage: default_model.sh RUN_DIR [HISTORY_JSON]}
HISTORY=${2:-}
BIN=${BIN:-.venv/bin}
R=benchmarks/results
mkdir -p "$R"
step() { echo "=== $(date +%H:%M:%S) $*"; }
history_args=()
[ -n "$HISTORY" ] && history_args=(--history "$HISTORY")

step ship weights
"$BIN/python" -m tools.ship --run "$RUN" "${history_args[@]}"

step "calibrate: the paper's protocol over every MoE layer (about 65 minutes)"
# the App. B grid (one tau on all six MoE layers), then TPE per layer seeded with the grid's best
# (its first trial), so its result is the better of the two on validation; that is shipped, and
# compared with the grid's best on both held-out sets below
"$BIN/roe" calibrate -K 8 --trials 1 --uniform --grid 0,0.05,0.1,0.15,0.2,0.25,0.3 --tau-max 0.3 --skip-first 0 \
    --skip-last 0 --window 256 --max-windows 400 --out "$R/schedule_uniform_all.json" \
    --plot "$R/calibrate_every_layer.png" --json | tail -n1 > "$R/calibrate_every_layer.json"
BEST_ALL=$("$BIN/python" -c "import json; print(json.load(open('$R/calibrate_every_layer.json'))['provenance']['best_uniform_tau'])")
"$BIN/roe" calibrate -K 8 --trials 12 --uniform --grid "$BEST_ALL" --tau-max 0.3 --skip-first 0 --skip-last 0 \
    --window 256 --max-windows 400 --out "$R/schedule_all_layers_tpe.json" --plot "$R/calibrate_every_layer_tpe.png" \
    --json | tail -n1 > "$R/calibrate_every_layer_tpe.json"
cp "$R/schedule_all_layers_tpe.json" roe/assets/default/schedule.json

step eval test
"$BIN/roe" eval --ks 1,2,4,8,16,32 --max-windows 400 --plot "$R/eval_test.png" --json | tail -n1 > "$R/eval_test.json"
"$BIN/roe" eval --schedule "$R/schedule_all_layers_tpe.json" --ks 1,8 --max-windows 400 \
    --against-schedule "$R/schedule_uniform_all.json" --json | tail -n1 > "$R/eval_test_every_layer_tpe.json"

step eval unseen
[ -f data/unseen.txt ] || "$BIN/python" -m tools.unseen --out data/unseen.txt
"$BIN/roe" eval --text data/unseen.txt --ks 1,8,16 --max-windows 400 --plot "$R/eval_unseen.png" --json \
    | tail -n1 > "$R/eval_unseen.json"
"$BIN/roe" eval --text data/unseen.txt --schedule "$R/schedule_all_layers_tpe.json" --ks 1,8 --max-windows 400 \
    --against-schedule "$R/schedule_uniform_all.json" --json | tail -n1 > "$R/eval_unseen_every_layer_tpe.json"
# the same two pairings with another noise seed
"$BIN/roe" eval --schedule "$R/schedule_all_layers_tpe.json" --ks 1,8 --max-windows 400 --seed 1 \
    --against-schedule "$R/schedule_uniform_all.json" --json | tail -n1 > "$R/eval_test_every_layer_tpe_seed1.json"
"$BIN/roe" eval --text data/unseen.txt --schedule "$R/schedule_all_layers_tpe.json" --ks 1,8 --max-windows 400 \
    --seed 1 --against-schedule "$R/schedule_uniform_all.json" --json | tail -n1 > "$R/eval_unseen_every_layer_tpe_seed1.json"

step "earlier searches with the first and last MoE layer clean (the paper's L = 1; about 2.5 hours)"
# the middle-layer grid and TPE (the schedule shipped until the searches above: uniform 0.2 on the
# middle four layers); a per-layer schedule from an earlier 5-trial run of the same command
# (schedule_first_calibration.json) and a finer TPE search, each paired with uniform 0.2 held out;
# then the App. B grid's best paired with the clean-ends schedule held out
"$BIN/roe" calibrate -K 8 --trials 12 --uniform --grid 0,0.1,0.2,0.3,0.4,0.6 --tau-max 0.6 --window 256 \
    --max-windows 400 --out "$R/schedule_clean_ends.json" --plot "$R/calibrate_clean_ends.png" --json \
    | tail -n1 > "$R/calibrate_clean_ends.json"
for text in test unseen; do
    text_args=(); [ "$text" = unseen ] && text_args=(--text data/unseen.txt)
    "$BIN/roe" eval "${text_args[@]}" --schedule "$R/schedule_first_calibration.json" --ks 1,8 --max-windows 400 \
        --against-tau 0.2 --json | tail -n1 > "$R/eval_${text}_versus.json"
done
"$BIN/roe" calibrate -K 8 --trials 18 --uniform --grid 0.2 --tau-max 0.35 --window 256 --max-windows 400 \
    --out "$R/schedule_third_calibration.json" --plot "$R/calibrate_third.png" --json | tail -n1 > "$R/calibrate_third.json"
for text in test unseen; do
    text_args=(); [ "$text" = unseen ] && text_args=(--text data/unseen.txt)
    "$BIN/roe" eval "${text_args[@]}" --schedule "$R/schedule_third_calibration.json" --ks 1,8 --max-windows 400 \
        --against-tau 0.2 --json | tail -n1 > "$R/eval_${text}_versus_third.json"
    "$BIN/roe" eval "${text_args[@]}" --schedule "$R/schedule_uniform_all.json" --ks 1,8 --max-windows 400 \
        --against-schedule "$R/schedule_clean_ends.json" --json | tail -n1 > "$R/eval_${text}_every_layer.json"
done

step tasks
"$BIN/roe" tasks -K 8 --items 150 --json | tail -n1 > "$R/tasks.json"

step bench
"$BIN/roe" bench --ks 1,2,4,8,16,32,64 --methods roster --new-tokens 32 --time-box 6 --repeats 25 --plot "$R/bench.png" --json \
    | tail -n1 > "$R/bench_roster.json"
"$BIN/roe" bench --ks 1,8,32 --methods roster,separate,batched-own-cache,recompute --new-tokens 16 --time-box 5 --repeats 12 \
    --json | tail -n1 > "$R/bench_methods.json"
"$BIN/roe" bench --ks 1,2,4,8,16,32,64 --methods roster --schedule "$R/schedule_clean_ends.json" --new-tokens 32 \
    --time-box 6 --repeats 25 --json | tail -n1 > "$R/bench_clean_ends.json"
"$BIN/roe" bench --ks 1,8,32 --methods roster --new-tokens 32 --time-box 6 --repeats 25 --json \
    | tail -n1 > "$R/bench_roster_repeat.json"
"$BIN/python" benchmarks/small_m_kernel.py --ks 8,1,8,1 --steps 300 | tail -n1 > "$R/small_m_kernel.json"
"$BIN/python" benchmarks/profile_step.py --ks 1,8,32 --steps 60 | tail -n1 > "$R/profile.json"

step serve load
"$BIN/python" benchmarks/serve_load.py --clients 4 --requests 5 --max-tokens 16 --max-time 90 | tail -n1 > "$R/serve_load.json"

step model card and README
"$BIN/python" -m tools.ship --run "$RUN" --card-only "${history_args[@]}" --eval-json "$R/eval_test.json" \
    --unseen-json "$R/eval_unseen.json"
"$BIN/python" benchmarks/update_readme.py
step done
