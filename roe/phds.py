"""MoE-PHDS (arXiv 2509.23012) and RoE-aware training: fine-tune a checkpoint under perturbed routing.

Shapes: B windows, S positions, T rows (B * S), E experts, V vocab, L MoE layers.

One step counter runs two phases:

    steps [0, steps):                          k ~ Uniform(ks), keyed (seed, step) (see ``k_at``)
    steps [steps, steps + curriculum_steps):   k = min(ks), the sparsest level (the anchoring curriculum)

At step t the model runs at k_t exactly as roe serves it: through the runtime dial
(``roe.roster`` with K = 1, tau = 0, ``experts_per_token = k_t``), i.e. the model built with
``num_experts_per_tok = k_t``. Gradients flow as in that model (through the gate weights of the
k chosen experts). The loss is that model's own objective:

    loss = CE(next token) + c * balance(router_logits, k_t)

c is ``router_aux_loss_coef`` when the model's own loss has that Switch balance term, else 0
(self-tested on a probe forward, ``Dial._aux_coefficient``).

RoE-aware training (``routing_tau``; the paper's future work, arXiv 2509.17238 Sec. 6): the
same steps with RoE's routing noise. Window b of a step's batch is roster member b: member 0
clean, the others selecting experts as RoE samples them (``idx = TopK(r + tau_l * G, A)``, the
keyed Gumbel noise of roe/routing.py at the per-layer temperatures of ``routing_tau``, a float
uniform over the middle MoE layers or a schedule JSON such as the calibrated one), with a fresh
noise seed each step (``noise_seed_at``), then the model's clean gate weights at the chosen
experts. With tau = 0 the steps equal those without routing noise bit for bit.

Everything a step uses is a pure function of (settings, step): the windows (``roe.tokens.batch_at``),
k_t, the noise seed and the learning rate (linear warm-up, cosine over all steps). So a checkpoint
(weights, AdamW state, step, log) resumed gives the parameters of an uninterrupted run bit for bit.

The input is a checkpoint directory (``roe.load``) or a ``tools.train`` checkpoint file (ckpt.pt).

This module knows the dial and the roster's member forwards (roe.roster) and the token files
(roe.tokens); it knows nothing of evaluation beyond a clean (K = 1) validation NLL per level for the log.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

PHDS_FORMAT = "roe.phds/1"
STATE_FILE = "phds-state.pt"  # the training checkpoint inside --out; removed once the run is done
LOG_FILE = "phds.json"
# NOTE: the installed package never imports the repository's tools/ (tests/test_train.py): a reader of
# other checkpoint files, (path) -> (model, tokenizer, {"kind": ...}), is installed by the entry point that
# needs it (tools/finetune.py installs tools.train's); the package alone reads checkpoint directories.
FILE_READER = None
TRAIN_CHECKPOINT = "tools.train checkpoint"  # an input kind: written back in that format too (save_train_checkpoint)
DEFAULT_TOKENS = Path("data/tokens")  # where `python -m tools.tokenizer --encode` writes the default model's windows
K_STREAM = 1  # keys the k draws apart from the window draws of the same (seed, step)
NOISE_STREAM = 2  # keys the routing-noise seeds apart from both
PRODUCE_TOKENS = ("python -m tools.corpus --out data/corpus && python -m tools.tokenizer --corpus data/corpus "
                  "--existing roe/assets/default --out data/tokenizer --encode --tokens data/tokens")


@dataclass(frozen=True, kw_only=True)
class PhdsConfig:
    """The fine-tune's settings: everything that decides the resulting parameters.

    ks: the sparsity levels (experts per token) sampled during the first phase; the curriculum
        runs at min(ks). A single level is the "oracle" fine-tune at that k with the same budget.
        None: the model's own k only (no dial; ``run`` resolves it once the model is loaded).
    routing_tau: RoE's routing noise during training (see the module docstring): None for none,
        a temperature (uniform over the MoE layers between one clean layer at each end, as
        ``RoEConfig(tau=...)``), or the path of a roe schedule JSON (one tau per MoE layer).
    steps / curriculum_steps: optimiser steps of each phase.
    lr: peak learning rate (linear warm-up over ``warmup_steps``, cosine to ``min_lr_ratio * lr``
        over both phases); AdamW (0.9, 0.95) with ``weight_decay`` on matrices, as the default
        model was trained (tools/train.py), gradients clipped at norm 1.
    batch_size x seq_len: the token windows of one step. eval_windows: validation windows per
        level for the log (0: none).
    """

    ks: tuple[int, ...] | None = None
    routing_tau: float | str | None = None
    steps: int = 400
    curriculum_steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0
    eval_windows: int = 32

    def __post_init__(self) -> None:
        if self.ks is not None:
            if not isinstance(self.ks, tuple) or not self.ks:
                raise ValueError(f"--ks needs at least one level of experts per token, got {self.ks!r}")
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
                raise ValueError(f"--ks levels must be integers >= 1 (experts per token), got {list(self.ks)}")
            object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        self._check_routing_tau()
        for name in ("steps", "curriculum_steps", "warmup_steps", "seed", "eval_windows"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.total_steps < 1:
            raise ValueError("--steps plus --curriculum-steps must be at least 1")
        for name in ("batch_size", "seq_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--lr must be finite and > 0 and min_lr_ratio in [0, 1], got {self.lr}, "
                             f"{self.min_lr_ratio}")

    def _check_routing_tau(self) -> None:
        """A finite temperature >= 0 (kept as a float) or a roe schedule file that loads."""
        from roe.schedule import Schedule

        tau = self.routing_tau
        if tau is None:
            return
        if isinstance(tau, str):
            Schedule.load(tau)
            return
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"--routing-tau must be a finite temperature >= 0 or a schedule JSON file, got {tau!r}")
        object.__setattr__(self, "routing_tau", float(tau))

    @property
    def total_steps(self) -> int:
        return self.steps + self.curriculum_steps


def parse_routing_tau(text: str) -> float | str:
    """--routing-tau: '0.3' -> 0.3 (uniform), anything else is a schedule file's path."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_levels(ks: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); the checks against the model's experts come with the model."""
    try:
        levels = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers (experts per token), got {ks!r}") from None
    if not levels:
        raise ValueError(f"--ks needs at least one level of experts per token, got {ks!r}")
    return levels


def k_at(cfg: PhdsConfig, step: int) -> int:
    """The experts per token of step ``step``: uniform over ``ks``, then min(ks) in the curriculum.

    NOTE: drawn without replacement in blocks of len(ks) steps (each block a random permutation of
    the levels, keyed (seed, block)): every step's k is uniform over the levels, as independent
    draws would be, and every level gets the same share of a short budget.
    """
    if step >= cfg.steps:
        return cfg.ks[0]
    block, slot = divmod(step, len(cfg.ks))
    order = np.random.default_rng([cfg.seed, block, K_STREAM]).permutation(len(cfg.ks))
    return int(cfg.ks[order[slot]])


def noise_seed_at(cfg: PhdsConfig, step: int) -> int:
    """The routing-noise seed of step ``step``: a fresh key each step, a pure function of (seed, step).

    With it, member b of the step's batch draws the keyed noise of (noise seed, b, position), so
    no two steps (nor two rows) share noise, and a resumed run draws what an uninterrupted one does.
    """
    return int(np.random.default_rng([cfg.seed, step, NOISE_STREAM]).integers(1 << 62))


def lr_at(cfg: PhdsConfig, step: int) -> float:
    """Linear warm-up, then cosine down to ``min_lr_ratio * lr`` at the last step (both phases).

    NOTE: over steps, not wall-clock time as tools/train.py does: a resumed run must see the
    same rates as an uninterrupted one.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_ce(logits_BSV: torch.Tensor, rows_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's next token (the window is input and labels)."""
    return torch.nn.functional.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(), rows_BS[:, 1:].reshape(-1))


def balance_loss(router_logits_L: list[torch.Tensor], k: int) -> torch.Tensor:
    """Switch-Transformer load balancing at k experts per token, as transformers computes it
    (``load_balancing_loss_func`` of OLMoE, Mixtral, Qwen-MoE with ``top_k = k``):

        E * sum_e f_e * P_e,   f_e = top-k selections of e per row,  P_e = mean softmax prob of e

    pooled over all MoE layers' rows; gradients through P only (f is a count).
    """
    experts = router_logits_L[0].shape[-1]
    counts_E = torch.zeros(experts)
    probs_sum_E = torch.zeros(experts)
    rows = 0
    for logits_TE in router_logits_L:
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        idx_TA = torch.topk(probs_TE, k, dim=-1).indices
        counts_E = counts_E + torch.bincount(idx_TA.reshape(-1), minlength=experts).float()
        probs_sum_E = probs_sum_E + probs_TE.sum(dim=0)
        rows += logits_TE.shape[0]
    return experts * torch.sum((counts_E / rows) * (probs_sum_E / rows))


class Dial:
    """The model's forward at k experts per token, through roe's runtime dial, with its loss.

    One roster per level, built once; building it checks the level against every router's experts
    and refuses a family whose model fixes k. Without ``routing_tau`` every row is the clean
    member (K = 1, tau = 0). With it the roster has ``members`` members at those temperatures
    (checked against the model's MoE layers), and a forward given a noise seed makes window b
    member b (see ``forward``). Each forward installs the roster's router wrappers for that call only.
    """

    def __init__(self, model, ks: tuple[int, ...], routing_tau: float | str | None = None, members: int = 1) -> None:
        import roe
        from roe.roster import schedule_for

        self.model = model
        self.noisy = routing_tau is not None
        tau = 0.0 if routing_tau is None else routing_tau
        try:
            self.tau_L = schedule_for(model, roe.RoEConfig(tau=tau)).tau
        except ValueError as err:
            raise ValueError(f"--routing-tau {routing_tau}: {err}") from None
        self.rosters = {}
        for k in ks:
            try:
                self.rosters[k] = roe.roster(model, roe.RoEConfig(roster_size=members if self.noisy else 1, tau=tau,
                                                                  experts_per_token=k))
            except ValueError as err:
                raise ValueError(f"--ks {k}: {err}") from None
        self.slots = next(iter(self.rosters.values())).slots
        self.aux_coef = self._aux_coefficient()

    def _aux_coefficient(self) -> float:
        """The weight of the balance term in the model's own loss, found as the routing rules are:
        on one probe forward at the model's own k, the candidate (``router_aux_loss_coef``, else 0:
        Llama-4 declares the coefficient but its loss has no such term) that reproduces the loss the
        model reports. A model whose loss is neither is refused: PHDS could not train its objective."""
        coef = float(getattr(self.model.config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)
        vocab = self.model.config.get_text_config().vocab_size
        rows_BS = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1234))
        own_k = self.slots[0].rule.model_k(self.slots[0].module)
        with torch.no_grad(), self._router_logits() as router_logits_L:
            out = self.model(input_ids=rows_BS, labels=rows_BS, output_router_logits=True, use_cache=False)
            ce = next_token_ce(out.logits, rows_BS)
            for candidate in dict.fromkeys((coef, 0.0)):
                if torch.allclose(ce + candidate * balance_loss(router_logits_L, own_k), out.loss, rtol=1e-5):
                    return candidate
        raise ValueError(f"{type(self.model).__name__}: its training loss is neither cross-entropy nor cross-entropy + "
                         f"{coef} x the Switch load-balancing loss roe computes at each k; roe phds cannot "
                         "train its objective at other k")

    @contextmanager
    def _router_logits(self) -> Iterator[list[torch.Tensor]]:
        """Collect every router's logits [T, E] during the forwards inside the block."""
        router_logits_L: list[torch.Tensor] = []
        hooks = [slot.module.register_forward_hook(
            lambda module, _args, output, rule=slot.rule: router_logits_L.append(rule.logits(module, output)))
            for slot in self.slots]
        try:
            yield router_logits_L
        finally:
            for hook in hooks:
                hook.remove()

    def forward(self, rows_BS: torch.Tensor, k: int,
                noise_seed: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits [B, S, V], router logits [T, E] of every MoE layer) of the model at k.

        ``noise_seed`` None: every window is the clean member. Else window b is roster member b
        with the routing noise keyed (noise_seed, b, position); window 0 stays clean.

        NOTE: each sequence of the batch is one member for its whole length, so training costs
        what a plain step costs (1x compute), and gradients flow through the experts the noise
        chose and through the model's clean gate weights at them (selection only, as RoE runs;
        the router gets gradients through those weights and the balance term). The per-token
        selection is RoE's (same noise, temperatures, clean member 0), but a noisy member here
        attends to its own noisy history, where RoE's members attend to the clean one
        (roe/cache.py): training on RoE's exact semantics needs every position's member as its own
        query row over the clean history (K x S rows a window, the folded scoring forward), K
        times the compute. The balance term counts the clean top-k (the model's own loss does the
        same from the router logits, which the noise does not change).
        """
        B, S = rows_BS.shape
        position_BS = torch.arange(S).expand(B, S)
        if noise_seed is None:
            member_BS, seed_BS = torch.zeros_like(rows_BS), None
        else:
            member_BS, seed_BS = torch.arange(B)[:, None].expand(B, S), torch.full_like(rows_BS, noise_seed)
        with self._router_logits() as router_logits_L:
            out = self.rosters[k].forward(member_BQ=member_BS, position_BQ=position_BS, seed_BQ=seed_BS,
                                          input_ids=rows_BS, use_cache=False)
        return out.logits, router_logits_L

    def loss(self, rows_BS: torch.Tensor, k: int,
             noise_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, next-token CE, balance) of the windows at k (``noise_seed``: see ``forward``);
        the window is input and labels."""
        logits_BSV, router_logits_L = self.forward(rows_BS, k, noise_seed)
        ce = next_token_ce(logits_BSV, rows_BS)
        aux = balance_loss(router_logits_L, k) if self.aux_coef else torch.zeros(())
        return ce + self.aux_coef * aux, ce, aux

    @torch.no_grad()
    def validation_nll(self, tokens: np.ndarray, cfg: PhdsConfig, k: int) -> float:
        """Mean next-token NLL at k over evenly spaced windows of the validation tokens."""
        n = min(cfg.eval_windows, (len(tokens) - 1) // cfg.seq_len)
        starts = np.linspace(0, len(tokens) - cfg.seq_len, n).astype(np.int64)
        total = 0.0
        for chunk in np.array_split(starts, max(1, math.ceil(n / cfg.batch_size))):
            rows_BS = torch.from_numpy(np.stack([tokens[s: s + cfg.seq_len] for s in chunk]).astype(np.int64))
            total += self.loss(rows_BS, k)[1].item() * len(chunk)
        return total / n


def make_optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95), weight decay on matrices except the embeddings; tools/train.py pretrains with it too.

    ``cfg``: anything with ``lr`` and ``weight_decay``."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def load_tokens(data: Path | None, vocab_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(train tokens, validation tokens or None) from ``data``.

    None: the default model's training windows (``data/tokens/train.bin``, written by
    ``python -m tools.tokenizer --encode``). A directory: its ``train.bin`` (and ``validation.bin``),
    flat uint16 (``roe.tokens``). A file: token ids, ``.npy`` (any integer dtype) or flat uint16.
    """
    from roe.tokens import load_split

    path = DEFAULT_TOKENS if data is None else Path(data)
    if path.is_dir() and (path / "train.bin").is_file():
        train = load_split(path, "train")
        val = load_split(path, "validation") if (path / "validation.bin").is_file() else None
    elif path.is_file():
        train = np.load(path) if path.suffix == ".npy" else np.fromfile(path, dtype=np.uint16)
        val = None
    elif data is None:
        raise FileNotFoundError(f"the tokenised training data of the default model is missing ({path}/train.bin, "
                                f"relative to {Path.cwd()}). Produce it from the repository root with:\n  "
                                f"{PRODUCE_TOKENS}\nor pass --data FILE (token ids: .npy, or flat uint16)")
    else:
        raise FileNotFoundError(f"--data {data}: neither a token file nor a directory with train.bin")
    for name, tokens in (("train", train), ("validation", val)):
        if tokens is None:
            continue
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"--data: {name} tokens must be a flat array of integer ids, got {tokens.dtype} "
                             f"{tokens.shape}")
        if len(tokens) <= seq_len:
            raise ValueError(f"--data: {len(tokens)} {name} tokens, fewer than one window of --seq-len {seq_len}")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(f"--data: {name} token ids span [{tokens.min()}, {tokens.max()}], outside the model's "
                             f"vocabulary of {vocab_size}")
    return train, val


def step_once(dial: Dial, optimizer, tokens: np.ndarray, cfg: PhdsConfig, step: int) -> dict[str, Any]:
    """One optimiser step at k_t (and the step's routing noise, with ``routing_tau``) on the windows
    of step ``step``; returns its log record."""
    from roe.tokens import batch_at

    start = time.perf_counter()
    k = k_at(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    loss, ce, aux = dial.loss(batch_at(tokens, cfg, step), k, noise_seed_at(cfg, step) if dial.noisy else None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dial.model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "k": k, "lr": optimizer.param_groups[0]["lr"], "loss": round(loss.item(), 5),
            "ce": round(ce.item(), 5), "aux": round(aux.item(), 5), "seconds": round(time.perf_counter() - start, 3)}


def save_state(path: Path, model, optimizer, step: int, log: list, settings: dict) -> None:
    """The training checkpoint, written atomically (an interruption leaves the previous one)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log,
                "settings": settings}, tmp)
    os.replace(tmp, path)


# NOTE: settings added after runs were made with the fields before them; such a run used the default.
ADDED_SETTINGS = {"routing_tau": None}


def as_made(stored: dict) -> dict:
    """A run's stored settings with the fields added since it was made at their defaults."""
    return {**ADDED_SETTINGS, **stored}


def resume_state(out: Path, model, optimizer, settings: dict) -> tuple[int, list]:
    """(next step, log) from ``out``'s checkpoint, or (0, []) for a fresh run; refuses other settings."""
    path = out / STATE_FILE
    if not path.is_file():
        return 0, []
    state = torch.load(path, weights_only=False)
    stored = as_made(state["settings"])
    if stored != settings:
        differ = sorted(k for k in settings if stored.get(k) != settings[k])
        raise ValueError(f"{out} holds a PHDS checkpoint made with other settings ({', '.join(differ)}); re-run with "
                         "the same settings to resume, or choose another --out")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["log"]


def load_model(model_path: str | Path | None) -> tuple[Any, Any, dict]:
    """(model, tokenizer, what the input is) to fine-tune: a checkpoint directory or hub id (``roe.load``,
    None: the embedded model), or a file that ``FILE_READER`` reads."""
    import roe

    path = None if model_path is None else Path(model_path).expanduser()
    if path is not None and path.is_file():
        if FILE_READER is None:
            raise ValueError(f"--model {path} is a file, not a checkpoint directory; a tools.train checkpoint "
                             "(ckpt.pt) is fine-tuned from the repository root with `python -m tools.finetune "
                             f"--model {path} ...` (the options of roe phds)")
        return FILE_READER(path)
    model, tokenizer = roe.load(model_path)
    return model, tokenizer, {"kind": "model directory"}


def model_k(model) -> int:
    """The model's own experts per token (its first router's)."""
    from roe.analysis import analyse

    slot = analyse(model).slots()[0]
    return slot.rule.model_k(slot.module)


def source_dir(model_path: str | Path | None) -> Path | None:
    """The input checkpoint directory (None for a hub id)."""
    from roe.loading import DEFAULT_MODEL

    path = DEFAULT_MODEL if model_path is None else Path(model_path).expanduser()
    return path if path.is_dir() else None


def save_checkpoint(model, tokenizer, source: Path | None, out: Path) -> None:
    """The fine-tuned model as a loadable checkpoint: config, weights in the input's dtype, tokenizer,
    and the input's schedule.json when it has one.

    NOTE: the schedule was calibrated on the input's weights; it is kept so RoE runs as before,
    and ``roe calibrate`` re-fits it to the new weights.
    """
    dtype = torch.float32
    if source is not None:
        config = json.loads((source / "config.json").read_text())
        dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(out)
    if source is not None and (source / "schedule.json").is_file():
        shutil.copyfile(source / "schedule.json", out / "schedule.json")


def save_train_checkpoint(model, origin: dict, settings: dict, steps: int, out: Path) -> None:
    """The fine-tuned weights of a tools.train input also in that format: ``out``/ckpt.pt with the
    input's TrainConfig, step = its step + the fine-tune's steps, and the fine-tune's settings.

    NOTE: so what reads the family's checkpoints (benchmarks/equivalent_size.py evaluate, which
    takes ``--runs DIR`` holding ``<member>/ckpt.pt``) reads the fine-tuned model as a member, in
    fp32, its step telling it apart from the input. It holds no optimiser state: tools.train
    cannot resume it (this fine-tune's own checkpoint is ``STATE_FILE``).
    """
    state = {"model": model.state_dict(), "config": origin["config"], "step": origin["step"] + steps,
             "fine_tune": settings}
    tmp = out / "ckpt.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "ckpt.pt")


def write_log(out: Path, record: dict) -> None:
    tmp = out / (LOG_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out / LOG_FILE)


def evaluate_levels(dial: Dial, val: np.ndarray | None, cfg: PhdsConfig, step: int) -> dict | None:
    """Validation NLL at every level, for the log (None without validation tokens)."""
    if val is None or cfg.eval_windows == 0:
        return None
    was_training = dial.model.training
    dial.model.eval()
    nll = {str(k): round(dial.validation_nll(val, cfg, k), 5) for k in cfg.ks}
    dial.model.train(was_training)
    return {"step": step, "validation_nll": nll}


def run(model_path: str | Path | None, cfg: PhdsConfig, out: Path, *, data: Path | None = None,
        ckpt_minutes: float = 4.0) -> dict:
    """The PHDS fine-tune of ``model_path`` (None: the embedded model) into ``out``; resumes from
    ``out``'s checkpoint when there is one; returns the phds.json record."""
    from tqdm import tqdm

    out = Path(out)
    settings = {"model": "embedded default" if model_path is None else str(model_path),
                "data": "default training windows" if data is None else str(data), **asdict(cfg)}
    settings["ks"] = None if cfg.ks is None else list(cfg.ks)
    source = source_dir(model_path)
    train_file = None if model_path is None else Path(model_path).expanduser()
    home = train_file.parent if train_file is not None and train_file.is_file() else source
    if home is not None and out.resolve() == home.resolve():
        raise ValueError(f"--out {out} is the input model's directory; choose another (the input stays as it is)")
    done = out / LOG_FILE
    if done.is_file() and not (out / STATE_FILE).is_file():
        record = json.loads(done.read_text())
        if record.get("done") and as_made(record.get("settings") or {}) == settings:
            print(f"{out} already holds this PHDS fine-tune (done); nothing to do", flush=True)
            return record
        raise ValueError(f"{out} already holds a PHDS fine-tune made with other settings; choose another --out")
    model, tokenizer, origin = load_model(model_path)
    if origin["kind"] == TRAIN_CHECKPOINT:
        print(f"input: a tools.train checkpoint saved at step {origin['step']} of {origin['total_steps']}", flush=True)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and cfg.seq_len > context:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context of {context} tokens")
    if cfg.ks is None:
        cfg = replace(cfg, ks=(model_k(model),))
    dial = Dial(model, cfg.ks, cfg.routing_tau, cfg.batch_size)
    train_tokens, val_tokens = load_tokens(data, model.config.get_text_config().vocab_size, cfg.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(model, cfg)
    step, log = resume_state(out, model, optimizer, settings)
    if step:
        print(f"resumed from {out / STATE_FILE} at step {step} of {cfg.total_steps}", flush=True)
    model.train()
    record = {"format": PHDS_FORMAT, "settings": settings, "input": origin, "ks": list(cfg.ks),
              "routing_tau_L": list(dial.tau_L) if dial.noisy else None, "done": False, "log": log}
    if step == 0 and (evaluation := evaluate_levels(dial, val_tokens, cfg, 0)):
        log.append(evaluation)
    last_save = time.monotonic()
    noise = f", routing tau {cfg.routing_tau}" if dial.noisy else ""
    bar = tqdm(total=cfg.total_steps, initial=step, unit="step", desc=f"phds k in {list(cfg.ks)}{noise}")
    try:
        while step < cfg.total_steps:
            entry = step_once(dial, optimizer, train_tokens, cfg, step)
            step += 1
            log.append(entry)
            bar.update(1)
            bar.set_postfix(k=entry["k"], loss=entry["loss"])
            phase_end = step in (cfg.steps, cfg.total_steps)
            if phase_end and (evaluation := evaluate_levels(dial, val_tokens, cfg, step)):
                log.append(evaluation)
                bar.write(json.dumps(evaluation))
            if phase_end or time.monotonic() - last_save >= ckpt_minutes * 60:
                save_state(out / STATE_FILE, model, optimizer, step, log, settings)
                write_log(out, record)
                last_save = time.monotonic()
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted at step {step}; re-run the same command to resume from {out / STATE_FILE}", flush=True)
        raise
    bar.close()
    model.eval()
    save_checkpoint(model, tokenizer, source, out)
    if origin["kind"] == TRAIN_CHECKPOINT:
        save_train_checkpoint(model, origin, settings, cfg.total_steps, out)
    record["done"] = True
    write_log(out, record)
    (out / STATE_FILE).unlink(missing_ok=True)
    dials = ", dials k at run time (--experts-per-token K)" if len(cfg.ks) > 1 else ""
    print(f"done: {cfg.total_steps} steps; the fine-tuned model is {out} (--model {out}{dials})", flush=True)
    return record
