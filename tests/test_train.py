"""The default model's training script (tools/train.py): a tiny config, a few steps, resume; and
tools/ stays out of the installed package."""

import ast
import json
from pathlib import Path

import numpy as np
import setuptools
from setuptools.config.pyprojecttoml import read_configuration

from tests.conftest import tiny_tokenizer
from tools import train


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


ROOT = Path(__file__).resolve().parents[1]


def test_the_research_pipeline_is_not_installed():
    """tools/ runs from the repository: package discovery leaves it out, and no installed module imports it."""
    find = read_configuration(ROOT / "pyproject.toml", expand=False)["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(ROOT, include=find["include"], exclude=find.get("exclude", ()))
    assert "roe" in packages
    assert not [p for p in packages if not p.startswith("roe")], packages
    assert not [p for p in packages if p == "roe.data" or p.startswith("roe.data.")], packages
    importers = []
    for path in (ROOT / "roe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            importers += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "tools"]
    assert not importers
