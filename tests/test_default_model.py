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
