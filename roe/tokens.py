"""Token files and the training windows drawn from them, shared by `roe phds` and tools/train.py.

A split is a flat file of uint16 token ids, ``<dir>/{train,validation,test}.bin``, as
``python -m tools.tokenizer --encode`` writes them. A step's windows are a pure function of
(seed, step), so an interrupted run that resumes sees exactly the windows of an uninterrupted one.

This module knows the file layout only: nothing of models, tokenizers or RoE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TOKEN_DTYPE = np.uint16  # vocabularies up to 65,536 ids


def load_split(data: Path, split: str) -> np.ndarray:
    """The token ids of one split of a token directory (``<data>/<split>.bin``)."""
    return np.fromfile(Path(data) / f"{split}.bin", dtype=TOKEN_DTYPE)


def batch_at(tokens: np.ndarray, cfg, step: int) -> torch.Tensor:
    """``cfg.batch_size`` random windows of ``cfg.seq_len`` tokens [B, S], a pure function of (cfg.seed, step).

    NOTE: transformers shifts ``labels`` inside the loss, so a window is both input and labels.
    """
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.seq_len, size=cfg.batch_size)
    rows_BS = np.stack([tokens[s : s + cfg.seq_len] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows_BS)
