"""The shipped default model (slow: loads 36 MB of weights and runs real text)."""

import pytest
import torch

import roe
from roe.loading import DEFAULT_MODEL, default_schedule_path, default_split_path

pytestmark = pytest.mark.slow


def test_default_model_loads_offline_and_generates_english():
    model, tokenizer = roe.load()
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with roe.roster(model, roe.RoEConfig(roster_size=4, tau=0.1)) as r:
        out = r.generate(ids, max_new_tokens=20)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    words = [w for w in text.split() if w.isalpha()]
    assert len(words) >= 5, text
    assert next(model.parameters()).dtype == torch.float32


def test_default_assets_are_complete():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"):
        assert (DEFAULT_MODEL / name).is_file(), name
    assert default_split_path("test").is_file() and default_split_path("validation").is_file()
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert size < 42e6
    if default_schedule_path().is_file():
        model, _ = roe.load()
        with roe.roster(model, roe.RoEConfig(tau=str(default_schedule_path()))) as r:
            assert len(r.schedule.tau) == model.config.num_hidden_layers


def test_phds_checkpoint_dials_better_than_the_default_model():
    """models/default-phds: the default model's shape and tokenizer, better at k = 1 and at its own k."""
    from pathlib import Path

    from roe.loading import held_out_windows

    path = Path(__file__).resolve().parents[1] / "models" / "default-phds"
    base, tokenizer = roe.load()
    tuned, tuned_tokenizer = roe.load(path)
    assert tuned.config.to_dict() | {"_name_or_path": None} == base.config.to_dict() | {"_name_or_path": None}
    assert tuned_tokenizer.get_vocab() == tokenizer.get_vocab()
    windows_NW = held_out_windows(tokenizer, default_split_path("test"), 128, 24)

    def nll(model, k):
        total = 0.0
        with torch.no_grad(), roe.roster(model, roe.RoEConfig(roster_size=1, experts_per_token=k)) as r:
            for batch in windows_NW.split(8):
                logprobs = r.score(batch[:, :-1])
                total += -logprobs.gather(-1, batch[:, 1:, None]).sum().item()
        return total / windows_NW[:, 1:].numel()

    assert nll(tuned, 1) < nll(base, 1) - 0.05  # the dial: the fine-tune gains ~0.19 at k = 1
    assert nll(tuned, None) < nll(base, None)  # and it is no worse at the model's own k
