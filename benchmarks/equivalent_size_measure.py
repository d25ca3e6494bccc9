"""Equivalent size, measured (issue 20): per-window NLL of the family and of RoE, and decode-step latency.

Shapes: N windows, W window length + 1, B prompts, P prompt tokens, V vocab.

``evaluate`` scores every member of the family (a ``tools.train`` checkpoint, ``ckpt.pt``) at K = 1
on the same held-out windows (``roe.loading.held_out_windows``, as ``roe eval`` cuts them) of each
text, and the 1x member with RoE at every K of the grid, through roe's own scoring
(``roe.eval.perplexity.window_nll`` / ``roster_nll``): nothing here computes a log-prob. The
temperatures are calibrated once on the 1x member on validation windows with ``roe calibrate``'s
search (``roe.calibrate.search_schedule``): the paper's App. B uniform grid, one tau on every MoE
layer, then optional TPE trials seeded with the best grid point.

Every scored unit (member, text, K) is a JSON file of per-window NLLs under the results directory,
written every ``CHUNK`` windows: an interrupted run resumes inside the unit it was scoring. Each
file carries a fingerprint of its windows and the checkpoint's step; a file scored on other
windows or another checkpoint is refused, never mixed in, so the per-window values of every
member and every K are paired window for window (what the bootstrap of
``equivalent_size_fit`` resamples).

``latency`` times the decode step of every member at K = 1 and of RoE-K on the 1x member in one
process, with roe's engine (``roe.engine.FoldedDecoder``, as ``roe bench``'s roster method), at
batch 1 and batch 8, in interleaved rounds (each round visits every configuration once, so a slow
spell of the shared machine hits all of them), one round per cache write.

This module knows nothing about fitting or plotting (``equivalent_size_fit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 32  # windows per cache write: a multiple of every batch size used, so resumed chunks batch as one run
SERIES = "nll"  # the per-window key of a unit file


@dataclass(frozen=True, kw_only=True)
class Texts:
    """The held-out texts, by name: the test split and unseen English are scored; validation calibrates."""

    test: Path
    unseen: Path
    validation: Path

    def scored(self) -> dict[str, Path]:
        return {"test": self.test, "unseen": self.unseen}


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    window: int = 256
    max_windows: int = 400
    calib_windows: int = 100
    calib_K: int = 8
    grid: tuple[float, ...] = (0.0, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)
    tpe_trials: int = 1  # 1: TPE's only trial is the enqueued best grid point, i.e. the uniform grid alone
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seed: int = 0
    batch_size: int = 4


# -- members ------------------------------------------------------------------------------------

def checkpoint_state(run: Path) -> dict:
    path = run / "ckpt.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint")
    return torch.load(path, weights_only=False, map_location="cpu", mmap=True)  # only what is read is loaded


def is_finished(state: dict) -> bool:
    """A checkpoint that took its whole step budget (tools.train's --total-steps)."""
    return state["config"]["total_steps"] > 0 and state["step"] >= state["config"]["total_steps"]


def load_member(run: Path, eos_id: int, allow_unfinished: bool = False):
    """(model in eval mode, its checkpoint step) from a tools.train checkpoint ``run/ckpt.pt``, in fp32.

    NOTE: the fp32 checkpoint, not ``final/`` (fp16 safetensors): the family is compared at the
    precision it was trained in, and the checkpoint exists for unfinished members too.
    """
    from tools.train import TrainConfig

    state = checkpoint_state(run)
    if not (allow_unfinished or is_finished(state)):
        raise SystemExit(f"{run.name}: step {state['step']}/{state['config']['total_steps']}: not finished "
                         "(train it to the end, or pass --allow-unfinished for a look that is not a result)")
    cfg = TrainConfig(**state["config"])
    vocab = state["model"]["model.embed_tokens.weight"].shape[0]
    return member_model(cfg, vocab, eos_id, state["model"]), state["step"]


def member_model(cfg, vocab_size: int, eos_id: int, weights: dict | None = None):
    """A member built from its tools.train config, in eval mode: its checkpoint's ``weights``, or as initialised."""
    from tools.train import build_model

    model = build_model(cfg, vocab_size=vocab_size, eos_id=eos_id)
    if weights is not None:
        model.load_state_dict(weights)
    model.config.output_router_logits = False  # no router logits or aux loss in scoring and decoding
    return model.eval()


def parameter_counts(model) -> dict:
    """Total and active parameters (dense + top-k / E of the expert parameters), counted on the model."""
    k_over_e = model.config.num_experts_per_tok / model.config.num_experts
    total = expert = 0
    for name, param in model.named_parameters():
        total += param.numel()
        expert += param.numel() if ".experts." in name else 0
    return {"params": total, "active_params": round(total - expert + expert * k_over_e), "expert_params": expert}


def missing_members(runs: Path, names: list[str], allow_unfinished: bool = False) -> dict[str, str]:
    """Members that cannot be used, with the reason: no checkpoint, or not trained to the end."""
    missing = {}
    for name in names:
        try:
            state = checkpoint_state(runs / name)
        except FileNotFoundError:
            missing[name] = "no checkpoint"
            continue
        if not (allow_unfinished or is_finished(state)):
            missing[name] = f"step {state['step']}/{state['config']['total_steps']}"
    return missing


# -- cached per-window scoring -------------------------------------------------------------------

def fingerprint(windows_NW: torch.Tensor) -> str:
    """sha1 of the windows' token ids: units with the same fingerprint were scored on the same windows."""
    return hashlib.sha1(windows_NW.numpy().astype("int64").tobytes()).hexdigest()[:16]


def unit_path(results: Path, member: str, text: str, K: int) -> Path:
    return results / "units" / f"{member}.{text}.K{K}.json"


def write_json(path: Path, doc: dict) -> None:
    """Atomic write: an interrupted run leaves the previous file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def scored_unit(path: Path, meta: dict, windows_NW: torch.Tensor, score, progress=None) -> list[float]:
    """Per-window NLLs of ``score(windows) -> [n]`` over all windows, resumed from ``path`` and saved every CHUNK.

    Refuses a file whose ``meta`` (windows fingerprint, checkpoint step, schedule...) differs:
    its values would not be paired with the others.
    """
    done: list[float] = []
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["meta"] != meta:
            raise SystemExit(f"{path} was scored with {saved['meta']}, not {meta}: move it away to rescore")
        done = saved[SERIES]
        if progress is not None:
            progress.update(len(done))
    while len(done) < len(windows_NW):
        chunk = windows_NW[len(done) : len(done) + CHUNK]
        done += [float(v) for v in score(chunk)]
        write_json(path, {"meta": meta, SERIES: done})
        if progress is not None:
            progress.update(len(chunk))
    return done


def read_unit(results: Path, member: str, text: str, K: int) -> dict | None:
    """A finished unit file ({"meta", "nll"}), or None when it is absent or incomplete."""
    path = unit_path(results, member, text, K)
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return doc if len(doc[SERIES]) == doc["meta"]["windows"] else None


# -- evaluate -----------------------------------------------------------------------------------

def text_windows(tokenizer, texts: Texts, settings: EvalSettings) -> dict[str, torch.Tensor]:
    """The scored windows of each text (roe eval's cut), the same for every member."""
    from roe.loading import held_out_windows

    for name, path in {**texts.scored(), "validation": texts.validation}.items():
        if not Path(path).is_file():
            hint = " (python -m tools.unseen --out data/unseen.txt)" if name == "unseen" else ""
            raise SystemExit(f"{name} text {path} not found{hint}")
    return {name: held_out_windows(tokenizer, path, settings.window, settings.max_windows)
            for name, path in texts.scored().items()}


def calibrate(model, step: int, tokenizer, texts: Texts, settings: EvalSettings, path: Path) -> list[float]:
    """The tau schedule of the 1x member (App. B uniform grid on every MoE layer, then TPE), cached in ``path``."""
    from roe.calibrate import SearchSpace, num_moe_layers, search_schedule
    from roe.loading import held_out_windows
    from roe.schedule import Schedule, model_fingerprint

    windows_NW = held_out_windows(tokenizer, texts.validation, settings.window, settings.calib_windows)
    meta = {"step": step, "windows": len(windows_NW), "fingerprint": fingerprint(windows_NW), "K": settings.calib_K,
            "grid": list(settings.grid), "tpe_trials": settings.tpe_trials, "seed": settings.seed}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["provenance"]["meta"] != meta:
            raise SystemExit(f"{path} was calibrated with {saved['provenance']['meta']}, not {meta}: move it away")
        return saved["tau"]
    space = SearchSpace(num_layers=num_moe_layers(model), tau_max=max(max(settings.grid), 1e-6), skip_first=0,
                        skip_last=0)
    found = search_schedule(model, windows_NW, space, K=settings.calib_K, trials=settings.tpe_trials,
                            seed=settings.seed, grid=list(settings.grid), batch_size=settings.batch_size)
    provenance = {"meta": meta, "data": "validation", "objective": "validation_nll", "base_value": found.base_value,
                  "best_value": found.best_value, "best_delta_se": found.best_delta_se,
                  "uniform": [{"tau": t, "nll": v} for t, v in found.uniform], "fingerprint": model_fingerprint(model),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Schedule(tau=tuple(found.tau), provenance=provenance).save(path)
    return list(found.tau)


def roe_config(K: int, tau: list[float], seed: int, kernels: bool = True):
    """RoE with this exact per-layer schedule (every MoE layer as given: no skipped layers on top)."""
    from roe import RoEConfig

    return RoEConfig(roster_size=K, tau=list(tau), seed=seed, skip_first=0, skip_last=0, kernels=kernels)


def evaluate(runs: Path, names: list[str], roe_member: str, texts: Texts, tokenizer_dir: Path, results: Path,
             settings: EvalSettings, allow_unfinished: bool = False) -> None:
    """K = 1 per-window NLL of every named member on every text; RoE over the K grid on ``roe_member``."""
    from transformers import AutoTokenizer

    missing = missing_members(runs, names, allow_unfinished)
    if missing:
        raise SystemExit(f"members not ready in {runs}: {missing}; evaluate the others with --members")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    windows = text_windows(tokenizer, texts, settings)
    for name in names:
        model, step = load_member(runs / name, tokenizer.eos_token_id, allow_unfinished)
        for text, windows_NW in windows.items():
            score_member(model, {"member": name, "step": step, "text": text, "K": 1}, windows_NW, results, settings)
        if name != roe_member:
            continue
        tau = calibrate(model, step, tokenizer, texts, settings, results / f"schedule_{name}.json")
        for K in (K for K in settings.ks if K > 1):
            for text, windows_NW in windows.items():
                unit = {"member": name, "step": step, "text": text, "K": K, "tau": [round(t, 6) for t in tau],
                        "seed": settings.seed}
                score_member(model, unit, windows_NW, results, settings, roe_config(K, tau, settings.seed))


def score_member(model, unit: dict, windows_NW: torch.Tensor, results: Path, settings: EvalSettings,
                 cfg=None) -> list[float]:
    """One unit's per-window NLLs: the untouched model (``cfg`` None) or RoE with ``cfg``, cached and resumable."""
    from functools import partial

    from tqdm import tqdm

    from roe.eval.perplexity import clean_score_fn, roster_nll, window_nll

    meta = {**unit, "windows": len(windows_NW), "window_tokens": settings.window,
            "fingerprint": fingerprint(windows_NW), **parameter_counts(model)}
    score = (partial(window_nll, clean_score_fn(model), batch_size=settings.batch_size) if cfg is None
             else partial(roster_nll, model, cfg, batch_size=settings.batch_size))
    path = unit_path(results, unit["member"], unit["text"], unit["K"])
    with tqdm(total=len(windows_NW), desc=f"{unit['member']} {unit['text']} K={unit['K']}", unit="win") as bar:
        return scored_unit(path, meta, windows_NW, score, bar)


# -- latency ------------------------------------------------------------------------------------

@torch.no_grad()
def step_times(model, cfg, prompt_P: torch.Tensor, batch: int, steps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` greedy decode steps of ``batch`` copies of the prompt (roe bench's roster path)."""
    import roe
    from roe.engine import FoldedDecoder

    with roe.roster(model, cfg) as r:
        decoder = FoldedDecoder(r, [prompt_P] * batch)
        tokens_B = prompt_P[-1].expand(batch).clone()
        pos_B = torch.full((batch,), len(prompt_P) - 1)
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            tokens_B = decoder.step(tokens_B, pos_B).argmax(dim=-1)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            pos_B = pos_B + 1
    return times


def latency_configs(names: list[str], roe_member: str, ks: tuple[int, ...]) -> list[tuple[str, int]]:
    """(member, K): every member at K = 1 (the family), then RoE-K on the 1x member."""
    return [(name, 1) for name in names] + [(roe_member, K) for K in ks if K > 1]


def latency(runs: Path, names: list[str], roe_member: str, results: Path, tokenizer_dir: Path, prompt_text: Path,
            *, ks: tuple[int, ...], batches: tuple[int, ...] = (1, 8), rounds: int = 5, steps: int = 16,
            prompt_tokens: int = 128, threads: int = 1, kernels: bool = True, allow_unfinished: bool = False,
            init: Callable[[str, int], torch.nn.Module] | None = None, schedule: Path | None = None) -> dict:
    """Interleaved rounds of decode-step timings; every round is appended to ``results/latency.json``.

    ``init`` (name, eos id -> model) times the members as initialised instead of as trained (``--weights
    init``): a decode step does the same arithmetic on any weights of the same shape, except that the router
    picks other experts. ``schedule`` is the RoE temperatures' file (default: the 1x member's calibration).
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from roe.eval.perplexity import text_tokens
    from roe.kernels import prepare as prepare_kernels

    wanted = sorted({*names, roe_member})
    missing = {} if init else missing_members(runs, wanted, allow_unfinished)
    if missing:
        raise SystemExit(f"members not ready in {runs}: {missing}")
    schedule = schedule or results / f"schedule_{roe_member}.json"
    if any(K > 1 for K in ks) and not schedule.is_file():
        raise SystemExit(f"{schedule} not found: `evaluate` calibrates the 1x member's temperatures first")
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt_P = torch.from_numpy(text_tokens(tokenizer, prompt_text)[:prompt_tokens])
    if init:
        models = {name: (init(name, tokenizer.eos_token_id), 0) for name in wanted}
    else:
        models = {name: load_member(runs / name, tokenizer.eos_token_id, allow_unfinished) for name in wanted}
    tau = read_tau(schedule) if schedule.is_file() else None
    if kernels:
        prepare_kernels()  # built or loaded now: compiling must not land in a timed step
    configs = latency_configs(names, roe_member, ks)
    conditions = {"configs": [latency_key(n, K, b) for b in batches for n, K in configs], "batches": list(batches),
                  "prompt_tokens": len(prompt_P), "prompt_text": Path(prompt_text).name, "steps_per_round": steps,
                  "warmup_steps": 2, "weights": "init" if init else "checkpoint",
                  "checkpoint_steps": {n: models[n][1] for n in sorted(models)}, "kernels": kernels,
                  "tau": tau, "schedule": schedule.name if tau else None, **machine(threads)}
    path = results / "latency.json"
    doc = json.loads(path.read_text()) if path.exists() else {"conditions": conditions, "rounds": []}
    if doc["conditions"] != conditions:
        raise SystemExit(f"{path} was measured under {doc['conditions']}: move it away to measure {conditions}")
    bar = tqdm(total=rounds * len(configs) * len(batches), initial=len(doc["rounds"]) * len(configs) * len(batches),
               desc="latency", unit="config")
    while len(doc["rounds"]) < rounds:
        round_ = {"loadavg": [round(x, 2) for x in os.getloadavg()], "times_ms": {}}
        for batch in batches:
            for name, K in configs:
                cfg = roe_config(K, tau, 0, kernels) if K > 1 else _clean_config(kernels)
                ms = [t * 1e3 for t in step_times(models[name][0], cfg, prompt_P, batch, steps)]
                round_["times_ms"][latency_key(name, K, batch)] = ms
                bar.update(1)
        doc["rounds"].append(round_)
        write_json(path, doc)
    bar.close()
    return summarise_latency(doc)


def read_tau(schedule: Path) -> list[float]:
    """The per-layer temperatures of a schedule file (``roe calibrate``'s or ``evaluate``'s), or a clear refusal."""
    try:
        tau = json.loads(schedule.read_text())["tau"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"{schedule}: not a schedule with a 'tau' list ({type(error).__name__}: {error})") from None
    if not (isinstance(tau, list) and tau and all(isinstance(t, (int, float)) and t >= 0 for t in tau)):
        raise SystemExit(f"{schedule}: 'tau' must be a list of temperatures >= 0, got {tau!r}")
    return tau


def machine(threads: int) -> dict:
    """What the timings depend on besides the configuration."""
    import platform

    import transformers

    return {"engine": "roe FoldedDecoder (roe bench's roster method)", "threads": threads, "dtype": "float32",
            "seed": 0, "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "nice": os.nice(0)}


def _clean_config(kernels: bool):
    from roe import RoEConfig

    return RoEConfig(roster_size=1, tau=0.0, kernels=kernels)


def latency_key(name: str, K: int, batch: int) -> str:
    return f"{name} K={K} B={batch}"


def summarise_latency(doc: dict) -> dict:
    """Median step time over every timed step of every round, its 95% distribution-free interval, per-round medians."""
    from roe.bench import median_ci

    out = {}
    for key in doc["rounds"][0]["times_ms"]:
        pooled = [t for r in doc["rounds"] for t in r["times_ms"][key]]
        ci = median_ci(pooled)
        out[key] = {"step_ms": statistics.median(pooled), "ci95_ms": list(ci) if ci else None, "steps": len(pooled),
                    "round_medians_ms": [statistics.median(r["times_ms"][key]) for r in doc["rounds"]]}
    return {"conditions": doc["conditions"], "rounds": len(doc["rounds"]),
            "loadavg": [r["loadavg"] for r in doc["rounds"]], "configs": out}
