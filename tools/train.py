"""Train the embedded default model: a small fine-grained OLMoE on the offline corpus.

    python -m tools.train --preset e64k8 --minutes 95 --out runs/default
    python -m tools.train --preset e32k4 --total-steps 1200 --out runs/x --resume

Runs on CPU in fp32 for a wall-clock budget, or for a token budget (``--total-steps``). The
learning rate follows a linear warm-up then a cosine decay over the *time* budget (so a run
ends annealed whatever the machine's speed) or over the step budget (so runs of different
sizes see the same tokens with the same schedule, and an interrupted run resumed with
``--resume`` takes exactly the steps an uninterrupted one takes). Data windows are drawn from
a generator seeded by ``(seed, step)``, and a checkpoint (model, optimiser, step, elapsed time)
is written atomically every few minutes and on SIGTERM, so an interrupted run resumes where it
stopped with ``--resume``. Validation loss is measured on fixed windows of the validation
split. At the end the model is saved in fp16 safetensors with its tokenizer (``--out``/final).
This module knows nothing about RoE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roe.phds import make_optimizer  # the same AdamW for pretraining and the PHDS fine-tune
from roe.tokens import batch_at, load_split

PRESETS = {
    # Same active expert parameters per token (A * I) and the same total expert parameters
    # (E * I); only the granularity differs.
    "e32k4": dict(num_experts=32, num_experts_per_tok=4, intermediate_size=96),
    "e64k8": dict(num_experts=64, num_experts_per_tok=8, intermediate_size=48),
    "e16k2": dict(num_experts=16, num_experts_per_tok=2, intermediate_size=192),
    "tiny": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16),
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    preset: str = "e64k8"
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    minutes: float = 95.0
    seed: int = 0
    eval_every_min: float = 5.0
    ckpt_every_min: float = 4.0
    eval_windows: int = 64
    max_steps: int = 0  # 0: stop on the time (or step) budget only
    total_steps: int = 0  # >0: a token budget: cosine over this many steps, end there; `minutes` is ignored
    intermediate_size: int = 0  # 0: the preset's expert width


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    moe = {**PRESETS[cfg.preset], **({"intermediate_size": cfg.intermediate_size} if cfg.intermediate_size else {})}
    hidden = 32 if cfg.preset == "tiny" else cfg.hidden_size
    config = OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2 if cfg.preset == "tiny" else cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        norm_topk_prob=False,
        output_router_logits=True,
        router_aux_loss_coef=cfg.aux_loss_coef,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        **moe,
    )
    torch.manual_seed(cfg.seed)
    model = OlmoeForCausalLM(config)
    model.config._experts_implementation = "grouped_mm"
    return model


def lr_at(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warm-up over steps, then cosine over the step or wall-clock budget down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.total_steps:
        progress = min(1.0, step / cfg.total_steps)
    else:
        progress = min(1.0, elapsed_s / (cfg.minutes * 60))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def budget_spent(cfg: TrainConfig, step: int, elapsed_s: float) -> bool:
    """True once the run has taken its steps (max_steps, else total_steps) or, with no step budget, its minutes."""
    if cfg.max_steps and step >= cfg.max_steps:
        return True
    if cfg.total_steps:
        return step >= cfg.total_steps
    return elapsed_s >= cfg.minutes * 60


@torch.no_grad()
def validation_loss(model, tokens: np.ndarray, cfg: TrainConfig) -> float:
    """Mean next-token NLL over fixed, evenly spaced windows of the validation split."""
    model.eval()
    n = min(cfg.eval_windows, (len(tokens) - 1) // cfg.seq_len)
    starts = np.linspace(0, len(tokens) - cfg.seq_len, n).astype(np.int64)
    total = 0.0
    for chunk in np.array_split(starts, max(1, n // 16)):
        rows = torch.from_numpy(np.stack([tokens[s : s + cfg.seq_len] for s in chunk]).astype(np.int64))
        out = model(input_ids=rows, labels=rows, output_router_logits=False)
        total += out.loss.item() * len(chunk)
    model.train()
    return total / n


def save_checkpoint(path: Path, model, optimizer, step: int, elapsed_s: float, cfg: TrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
         "elapsed_s": elapsed_s, "config": asdict(cfg)},
        tmp,
    )
    os.replace(tmp, path)


def save_final(model, tokenizer, out: Path) -> None:
    """fp16 safetensors + tokenizer; computation stays fp32 (roe.load upcasts)."""
    final = out / "final"
    model.half().save_pretrained(final, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(final)


def load_init_weights(model, init: Path) -> None:
    """Copy saved weights (a save_pretrained directory, fp16 allowed) into ``model``; shapes must match."""
    from transformers import AutoModelForCausalLM

    if not (Path(init) / "config.json").exists():
        raise SystemExit(f"--init {init}: not a saved model directory (no config.json)")
    saved = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).state_dict()
    own = model.state_dict()
    bad = [k for k in own if k not in saved or saved[k].shape != own[k].shape]
    if bad:
        raise SystemExit(f"--init {init}: weights do not fit this config (first mismatches: {bad[:3]})")
    model.load_state_dict(saved)
    print(f"initialised from {Path(init).name} ({len(saved)} tensors)", flush=True)


def train_step(model, optimizer, rows: torch.Tensor, lr: float):
    """One optimiser step on a batch of windows (cross-entropy + the model's aux loss); returns the output."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = model(input_ids=rows, labels=rows)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


@contextlib.contextmanager
def stop_on_sigterm():
    """Yield an event that SIGTERM sets (instead of killing), so the loop stops at a step boundary.

    NOTE: a job killed with SIGTERM (a session ending, or its owner) then checkpoints the step it
    reached instead of losing everything since the last periodic checkpoint. The previous
    handler is restored on exit; outside the main thread no handler can be installed.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig, data: Path, tokenizer_dir: Path, out: Path, resume: bool,
          init: Path | None = None) -> bool:
    """Train for cfg.minutes of wall-clock time (or cfg.total_steps), resuming from out/ckpt.pt when asked.

    ``init`` warm-starts from saved weights (e.g. the shipped model) with a fresh optimiser and
    a fresh warm-up + cosine schedule: continued training, not a resume. Returns False when
    SIGTERM stopped the run early (checkpointed, no final model), True when it ran its budget.
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_tokens, val_tokens = load_split(data, "train"), load_split(data, "validation")
    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    if init is not None:
        load_init_weights(model, init)
    optimizer = make_optimizer(model, cfg)
    step, elapsed = 0, 0.0
    ckpt = out / "ckpt.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
        print(f"resumed at step {step}, {elapsed / 60:.1f} min")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M, train tokens {len(train_tokens) / 1e6:.2f} M", flush=True)
    log = (out / "log.jsonl").open("a")
    model.train()
    last_eval = last_ckpt = elapsed
    by_steps = cfg.total_steps > 0
    bar = tqdm(total=cfg.total_steps if by_steps else int(cfg.minutes * 60), initial=step if by_steps else int(elapsed),
               unit="step" if by_steps else "s", mininterval=30)
    t0 = time.perf_counter() - elapsed
    with stop_on_sigterm() as stop:
        while not budget_spent(cfg, step, elapsed) and not stop.is_set():
            rows = batch_at(train_tokens, cfg, step)
            out_ = train_step(model, optimizer, rows, lr_at(cfg, step, elapsed))
            step += 1
            now = time.perf_counter() - t0
            bar.update(1 if by_steps else int(now) - int(elapsed))
            elapsed = now
            record = {"step": step, "min": round(elapsed / 60, 2), "loss": round(out_.loss.item(), 4),
                      "aux": round(out_.aux_loss.item(), 4), "lr": optimizer.param_groups[0]["lr"],
                      "tokens": step * cfg.batch_size * cfg.seq_len}
            final = budget_spent(cfg, step, elapsed)
            if elapsed - last_eval >= cfg.eval_every_min * 60 or final:
                record["val_loss"] = round(validation_loss(model, val_tokens, cfg), 4)
                last_eval = elapsed
                bar.set_postfix(loss=record["loss"], val=record["val_loss"])
                print(json.dumps(record), flush=True)
            if step % 10 == 0 or "val_loss" in record or stop.is_set():
                log.write(json.dumps(record) + "\n")
                log.flush()
            if elapsed - last_ckpt >= cfg.ckpt_every_min * 60:
                save_checkpoint(ckpt, model, optimizer, step, elapsed, cfg)
                last_ckpt = elapsed
    bar.close()
    save_checkpoint(ckpt, model, optimizer, step, elapsed, cfg)
    if stop.is_set():
        print(f"stopped by SIGTERM at step {step} ({elapsed / 60:.1f} min), checkpointed: resume with --resume",
              flush=True)
        return False
    save_final(model, tokenizer, out)
    print(f"done: {step} steps, {step * cfg.batch_size * cfg.seq_len / 1e6:.2f} M tokens, {elapsed / 60:.1f} min")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/tokens"))
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init", type=Path, default=None,
                        help="warm-start from saved weights (a model directory), fresh optimiser and schedule")
    parser.add_argument("--threads", type=int, default=2)
    for field, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    data, tok, out, resume, init, threads = (
        args.pop(k) for k in ("data", "tokenizer", "out", "resume", "init", "threads"))
    torch.set_num_threads(threads)
    cfg = TrainConfig(**args)
    if cfg.preset not in PRESETS:
        parser.error(f"unknown preset {cfg.preset!r}; choose from {sorted(PRESETS)}")
    if not train(cfg, data, tok, out, resume, init):
        raise SystemExit(128 + signal.SIGTERM)


def read_checkpoint(path: Path) -> tuple[Any, Any, dict]:
    """A ``tools.train`` checkpoint (``--out``/ckpt.pt: the model's and the optimiser's state, the step, the
    TrainConfig) as (model in fp32, tokenizer, what it is: the step it was saved at, of how many).

    NOTE: the file holds training settings, not a transformers config, so the model is rebuilt by
    ``build_model``; it seeds torch's global RNG, so it runs under a forked one. Nor does the file
    name its tokenizer: the default model and the equivalent-size family train on data/tokens,
    encoded with the embedded model's tokenizer, which is used; a checkpoint of another vocabulary
    size is refused.
    """
    import pickle

    from transformers import AutoTokenizer

    from roe.loading import DEFAULT_MODEL
    from roe.phds import TRAIN_CHECKPOINT

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        state = None
    if not isinstance(state, dict) or not {"model", "config", "step"} <= state.keys():
        raise ValueError(f"--model {path}: a file that is not a tools.train checkpoint (model, config, step)")
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    vocab = state["model"]["model.embed_tokens.weight"].shape[0]
    if vocab != len(tokenizer):
        raise ValueError(f"--model {path}: a vocabulary of {vocab} tokens, not the embedded tokenizer's "
                         f"{len(tokenizer)} (the only one a tools.train checkpoint is read with)")
    cfg = TrainConfig(**state["config"])
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, vocab, tokenizer.eos_token_id)
    model.load_state_dict(state["model"])
    return model.eval(), tokenizer, {"kind": TRAIN_CHECKPOINT, "step": state["step"],
                                     "total_steps": cfg.total_steps or None, "config": state["config"]}


if __name__ == "__main__":
    main()
