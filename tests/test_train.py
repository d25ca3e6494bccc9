"""Smoke test of the default model's training script: a tiny config, a few steps, resume."""

import json

import numpy as np

from roe.data import train
from tests.conftest import tiny_tokenizer


def test_tiny_training_learns_checkpoints_and_resumes(tmp_path):
    tokenizer = tiny_tokenizer()
    tok_dir, data, out = tmp_path / "tok", tmp_path / "tokens", tmp_path / "run"
    tokenizer.save_pretrained(tok_dir)
    data.mkdir()
    cycle = np.array(tokenizer("To be, or not to be, that is the question.").input_ids, dtype=np.uint16)
    np.tile(cycle, 400).tofile(data / "train.bin")
    np.tile(cycle, 60).tofile(data / "validation.bin")
    args = ["--data", str(data), "--tokenizer", str(tok_dir), "--out", str(out), "--preset", "tiny",
            "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-2", "--eval-windows", "4",
            "--eval-every-min", "0", "--threads", "1"]
    train.main([*args, "--max-steps", "12"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0, vals
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    train.main([*args, "--max-steps", "15", "--resume"])
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 15 and 13 in steps
    # Continued training from the saved fp16 weights: the first validation loss is the trained one,
    # far below a fresh model's.
    fresh = tmp_path / "fresh"
    train.main([*args, "--out", str(fresh), "--max-steps", "1", "--lr", "1e-9"])
    cont = tmp_path / "cont"
    train.main([*args, "--out", str(cont), "--max-steps", "1", "--lr", "1e-9", "--init", str(out / "final")])
    first = {run: json.loads((run / "log.jsonl").read_text().splitlines()[0])["val_loss"] for run in (fresh, cont)}
    assert first[cont] < first[fresh] - 1.0, first
    assert abs(first[cont] - vals[-1]) < 0.5, (first, vals[-1])
