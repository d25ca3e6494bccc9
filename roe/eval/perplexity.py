"""Held-out perplexity of a roster against the untouched model, with paired standard errors.

Windows: the token stream is cut into consecutive, non-overlapping windows of ``length + 1``
tokens; each window is scored on its own (no carried context), predicting its last ``length``
tokens from the ones before. Every configuration is scored on the *same* windows, so the
difference against K = 1 is a paired per-window difference and its standard error is
sd(delta_w) / sqrt(n_windows), far smaller than the SE of either NLL alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from roe.config import RoEConfig
from roe.roster import roster, target_logprob


def make_windows(tokens: np.ndarray, length: int) -> torch.Tensor:
    """[N, length + 1] consecutive windows; raises if the text is shorter than one window."""
    n = (len(tokens) - 1) // length
    if n < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {length + 1}")
    rows = [tokens[i * length : i * length + length + 1] for i in range(n)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


@torch.no_grad()
def window_nll(target_fn, windows_NW: torch.Tensor, batch_size: int = 4, progress=None) -> torch.Tensor:
    """Mean next-token NLL of each window [N] under ``target_fn(ids, targets) -> log p(targets)``."""
    out = []
    for start in range(0, len(windows_NW), batch_size):
        rows = windows_NW[start : start + batch_size]
        nll_BS = -target_fn(rows[:, :-1], rows[:, 1:])
        out.append(nll_BS.mean(dim=1))
        if progress is not None:
            progress.update(len(rows))
    return torch.cat(out).double()


def clean_score_fn(model):
    """The untouched model's log p(targets) (``Roster.target_logprobs`` without a roster)."""
    return lambda ids, targets: target_logprob(model(input_ids=ids, use_cache=False).logits, targets)


@dataclass(frozen=True, kw_only=True)
class PerplexityRow:
    K: int
    nll: float
    ppl: float
    bpb: float
    delta_nll: float
    delta_se: float
    tau: object = None
    # With an ``against`` configuration (K > 1 rows only): its NLL on the same windows and the
    # paired difference this row minus it (negative: this row's temperatures are better).
    against_nll: float | None = None
    against_delta_nll: float | None = None
    against_delta_se: float | None = None


def paired(nll_N: torch.Tensor, other_N: torch.Tensor) -> tuple[float, float]:
    """Mean per-window difference and its standard error, sd(delta_w) / sqrt(n)."""
    delta_N = nll_N - other_N
    n = len(delta_N)
    se = float(delta_N.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(delta_N.mean()), se


def summarise(K: int, nll_N: torch.Tensor, base_N: torch.Tensor, bytes_per_token: float, tau=None,
              against_N: torch.Tensor | None = None) -> PerplexityRow:
    delta, se = paired(nll_N, base_N)
    nll = float(nll_N.mean())
    versus = {}
    if against_N is not None:
        d, d_se = paired(nll_N, against_N)
        versus = {"against_nll": float(against_N.mean()), "against_delta_nll": d, "against_delta_se": d_se}
    return PerplexityRow(K=K, nll=nll, ppl=math.exp(nll), bpb=nll / math.log(2) / bytes_per_token,
                         delta_nll=delta, delta_se=se, tau=tau, **versus)


def roster_nll(model, cfg: RoEConfig, windows_NW: torch.Tensor, batch_size: int = 4, progress=None) -> torch.Tensor:
    with roster(model, cfg) as r:
        return window_nll(r.target_logprobs, windows_NW, batch_size, progress)


def text_tokens(tokenizer, path) -> np.ndarray:
    """Token ids of a UTF-8 text file (gzip allowed), with clear errors for missing or empty files."""
    import gzip
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    docs = [d for d in text.split("\n\n\n") if d.strip()]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc_ids in tokenizer(docs, add_special_tokens=False).input_ids:
        ids.extend(doc_ids)
        if eos is not None:
            ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def window_bytes(tokenizer, windows_NW: torch.Tensor) -> int:
    """UTF-8 bytes of the predicted tokens of every window (for bits per byte)."""
    texts = tokenizer.batch_decode(windows_NW[:, 1:], skip_special_tokens=True)
    return sum(len(t.encode("utf-8")) for t in texts)


def perplexity_sweep(model, windows_NW, ks, make_cfg, batch_size: int = 4, bytes_total: int | None = None,
                     progress: bool = True, against=None) -> list[PerplexityRow]:
    """Base (K = 1) and RoE rows over the K grid, all on the same windows.

    ``against(K) -> RoEConfig`` (optional) is a second configuration scored at every K > 1 on the
    same windows (e.g. one uniform tau against a calibrated schedule); each row then carries the
    paired difference against it. With ``make_cfg(1).experts_per_token`` set, the base is the
    model at that k (K = 1 through a roster), so every row's delta is paired at the same k.
    """
    from tqdm import tqdm

    tokens = windows_NW[:, 1:].numel()
    bytes_per_token = (bytes_total / tokens) if bytes_total else 1.0
    runs = len(ks) + (sum(K > 1 for K in ks) if against else 0)
    bar = tqdm(total=len(windows_NW) * runs, desc="windows", disable=not progress, unit="win")
    dialled = make_cfg(1)
    if dialled.experts_per_token is None:
        base = window_nll(clean_score_fn(model), windows_NW, batch_size, bar)
    else:
        base = roster_nll(model, dialled, windows_NW, batch_size, bar)
    rows = []
    for K in ks:
        nll = base if K == 1 else roster_nll(model, make_cfg(K), windows_NW, batch_size, bar)
        other = roster_nll(model, against(K), windows_NW, batch_size, bar) if against and K > 1 else None
        rows.append(summarise(K, nll, base, bytes_per_token, against_N=other))
    bar.close()
    return rows
