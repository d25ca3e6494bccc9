"""The token-budget schedule of the training script: a run killed and resumed equals one never stopped.

The equivalent-size family (benchmarks/equivalent_size.py) trains across sessions that kill
their jobs; its members are only comparable if an interruption changes nothing. With the
wall-clock schedule the learning rate depends on elapsed time, so a resumed run drifts from an
uninterrupted one; with ``--total-steps`` it must not, down to the last bit.
"""

import json
import os
import signal

import numpy as np
import pytest
import torch

from tests.conftest import tiny_tokenizer
from tools import train

pytestmark = pytest.mark.usefixtures("one_thread")

TOTAL = 8


@pytest.fixture
def run_args(tmp_path):
    tokenizer = tiny_tokenizer()
    tok_dir, data = tmp_path / "tok", tmp_path / "tokens"
    tokenizer.save_pretrained(tok_dir)
    data.mkdir()
    text = "To be, or not to be, that is the question. In the beginning was the word. The quick brown fox."
    ids = np.array(tokenizer(text).input_ids, dtype=np.uint16)
    np.tile(ids, 300).tofile(data / "train.bin")
    np.tile(ids, 40).tofile(data / "validation.bin")
    return ["--data", str(data), "--tokenizer", str(tok_dir), "--preset", "tiny", "--seq-len", "32",
            "--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-2", "--eval-windows", "4", "--threads", "1",
            "--total-steps", str(TOTAL), "--intermediate-size", "24"]


def log_records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(run_args, tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train.main([*run_args, "--out", str(straight), "--eval-every-min", "0"])

    batch_at = train.batch_at

    def killed_at_step_3(tokens, cfg, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_at(tokens, cfg, step)

    monkeypatch.setattr(train, "batch_at", killed_at_step_3)
    with pytest.raises(SystemExit) as stopped:
        train.main([*run_args, "--out", str(broken), "--eval-every-min", "0"])
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "batch_at", batch_at)
    # The step under way when SIGTERM arrived is finished and checkpointed; no final model yet.
    assert torch.load(broken / "ckpt.pt", weights_only=False)["step"] == 4
    assert not (broken / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    train.main([*run_args, "--out", str(broken), "--eval-every-min", "0", "--resume"])
    a, b = (torch.load(run / "ckpt.pt", weights_only=False) for run in (straight, broken))
    assert a["step"] == b["step"] == TOTAL
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (broken / "final" / "model.safetensors").is_file()
    lrs = {r["step"]: r["lr"] for r in log_records(straight)}
    assert lrs == {r["step"]: r["lr"] for r in log_records(broken)}


def test_step_budget_anneals_within_its_steps_whatever_the_minutes(run_args, tmp_path):
    out = tmp_path / "run"
    train.main([*run_args, "--out", str(out), "--eval-every-min", "0", "--minutes", "600"])
    records = log_records(out)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    lrs = [r["lr"] for r in records]
    assert lrs[1] == pytest.approx(1e-2)  # end of the 2-step warm-up
    assert all(later < earlier for earlier, later in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] < 0.2e-2  # cosine almost down to min_lr_ratio after 8 of 8 steps, not of 600 minutes
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["intermediate_size"] == 24  # --intermediate-size overrides the preset's expert width
