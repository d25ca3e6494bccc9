"""roe.load(): the embedded default model, or any transformers MoE checkpoint, in fp32.

The default model lives in ``roe/assets/default`` (weights stored in fp16, upcast to fp32 for
CPU computation). Nothing is downloaded for the default model; a hub id is passed through to
``from_pretrained`` as usual, once ``checked_source`` has made sure it can be found: a path
that does not exist, or a hub id that neither the cache nor the hub can serve, fails at once
with one line instead of transformers' retries and traceback.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"


def load(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode; ``path`` None means the embedded default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None and not (DEFAULT_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the embedded default model is missing from {DEFAULT_MODEL}; reinstall roe")
    source, local = checked_source(DEFAULT_MODEL if path is None else path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    return model, tokenizer


def checked_source(path: str | Path) -> tuple[str | Path, bool]:
    """(source, is local) for ``from_pretrained``: a checkpoint directory, or a hub id it can get.

    Raises FileNotFoundError for a path that does not exist or holds no config.json, and for a
    hub id that the local hub cache does not hold when HF_HUB_OFFLINE is set (nothing may be
    downloaded) or when the hub cannot be reached or does not know it.
    """
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json in it)")
        return local, True
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(path))
    except HFValidationError:
        raise FileNotFoundError(f"model directory not found: {path}") from None
    if isinstance(try_to_load_from_cache(str(path), "config.json"), str):
        return str(path), False
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{path} is not a local directory and the hub cache does not hold it "
                                "(HF_HUB_OFFLINE is set: nothing is downloaded)")
    try:
        model_info(str(path), timeout=10)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{path} is neither a local directory nor a model on the hub "
                                "(or it is private: log in with `hf auth login`)") from None
    except Exception as error:  # no network, DNS, proxy, timeout: what transformers would retry for a minute
        raise FileNotFoundError(f"{path} is not a local directory, the hub cache does not hold it, and the hub "
                                f"cannot be reached ({type(error).__name__}: {error})") from None
    return str(path), False


def default_split_path(split: str) -> Path:
    """The embedded model's held-out text (validation or test split), shipped gzipped."""
    return DEFAULT_MODEL / "data" / f"{split}.txt.gz"


def default_schedule_path() -> Path:
    """The calibrated temperature schedule shipped with the embedded model."""
    return DEFAULT_MODEL / "schedule.json"


def held_out_windows(tokenizer, path: str | Path, window: int, max_windows: int) -> torch.Tensor:
    """[N, window + 1] consecutive token windows of a text file, at most ``max_windows`` spread evenly.

    `roe eval` and `roe calibrate` cut their text this way, so the same options score the same
    windows in both. Raises if the file is missing, empty, or shorter than one window.
    """
    import numpy as np

    from roe.eval.perplexity import make_windows, text_tokens

    windows_NW = make_windows(text_tokens(tokenizer, path), window)
    if len(windows_NW) > max_windows:
        windows_NW = windows_NW[np.linspace(0, len(windows_NW) - 1, max_windows).astype(int)]
    return windows_NW
