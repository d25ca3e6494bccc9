"""The `roe` command line on a tiny checkpoint directory."""

import json

import pytest
import torch

import roe
from roe.cli import main


def run_json(capsys, argv):
    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_prints_base_and_roe(capsys, saved_model):
    out = run_json(capsys, ["generate", "To be, or not to be", "--model", str(saved_model), "-K", "3",
                            "--tau", "0.5", "--max-new-tokens", "6", "--json"])
    model, tokenizer = roe.load(saved_model)
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out["base"] == tokenizer.decode(base[0, ids.shape[1]:], skip_special_tokens=True)
    with roe.roster(model, roe.RoEConfig(roster_size=3, tau=0.5)) as r:
        ours = r.generate(ids, max_new_tokens=6)
    assert out["roe"] == tokenizer.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)
    assert out["schedule"] == [0.0, 0.5, 0.0]


@pytest.mark.parametrize("argv, message", [
    (["-K", "0"], "roster_size must be >= 1"),
    (["--tau", "-1"], "tau must be finite and >= 0"),
    (["--schedule", "missing.json"], "schedule file not found"),
])
def test_generate_bad_input_is_a_clear_error(saved_model, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["generate", "hello", "--model", str(saved_model), *argv])


def test_help_comes_from_the_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "untouched model and with RoE" in capsys.readouterr().out
