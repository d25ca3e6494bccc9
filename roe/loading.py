"""roe.load(): the embedded default model, or any transformers MoE checkpoint, in fp32.

The default model lives in ``roe/assets/default`` (weights stored in fp16, upcast to fp32 for
CPU computation). Nothing is downloaded for the default model; a hub id is passed through to
``from_pretrained`` as usual.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"


def load(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode; ``path`` None means the embedded default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = DEFAULT_MODEL if path is None else path
    if path is None and not (DEFAULT_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the embedded default model is missing from {DEFAULT_MODEL}; reinstall roe")
    local = Path(source).exists()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    return model, tokenizer


def default_split_path(split: str) -> Path:
    """The embedded model's held-out text (validation or test split), shipped gzipped."""
    return DEFAULT_MODEL / "data" / f"{split}.txt.gz"


def default_schedule_path() -> Path:
    """The calibrated temperature schedule shipped with the embedded model."""
    return DEFAULT_MODEL / "schedule.json"
