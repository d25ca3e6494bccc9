"""``roe phds``: the MoE-PHDS fine-tune on a tiny OLMoE (8 experts, top-2) and random token files.

The training forward at k is the model built with ``num_experts_per_tok = k`` (loss and
gradients), the k of every step is read from the experts the model actually ran (a spy on
``OlmoeExperts.forward``): varied across --ks, then min(ks) in the curriculum. An interrupted run
re-run with the same command continues from its checkpoint and ends with the parameters of an
uninterrupted run, bit for bit. Bad --ks, a family whose model fixes k and missing data are
refused with one clear line (exit status 2, no traceback).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, OlmoeForCausalLM
from transformers.models.olmoe import modeling_olmoe

import roe
from roe import cli, families, phds
from roe.tokens import batch_at
from tests.conftest import refused

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ["--ks", "1,2,3", "--steps", "8", "--curriculum-steps", "3", "--batch-size", "2", "--seq-len", "16",
            "--eval-windows", "2", "--ckpt-minutes", "0"]


def run_cli(saved_model, tokens_dir, out, *extra):
    cli.main(["phds", "--model", str(saved_model), "--data", str(tokens_dir), "--out", str(out), *SETTINGS, *extra])


@pytest.fixture
def experts_spy(monkeypatch):
    """The experts per token every training forward really ran (one entry per MoE layer call)."""
    used = []
    original = modeling_olmoe.OlmoeExperts.forward

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if torch.is_grad_enabled():
            used.append(top_k_index.shape[-1])
        return original(self, hidden_states, top_k_index, top_k_weights)

    monkeypatch.setattr(modeling_olmoe.OlmoeExperts, "forward", forward)
    return used


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_training_forward_is_the_model_built_with_k(saved_model, tokens_dir, k):
    """Loss (CE + aux at k) and every gradient equal those of the same weights built with k."""
    model, _ = roe.load(saved_model)
    rebuilt = OlmoeForCausalLM.from_pretrained(saved_model, num_experts_per_tok=k, dtype=torch.float32)
    cfg = phds.PhdsConfig(ks=(1, 2, 3), batch_size=2, seq_len=16)
    rows_BS = batch_at(np.fromfile(tokens_dir / "train.bin", dtype=np.uint16), cfg, 0)
    want = rebuilt(input_ids=rows_BS, labels=rows_BS, output_router_logits=True).loss
    want.backward()
    got = phds.Dial(model.train(), cfg.ks).loss(rows_BS, k)[0]
    got.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for (name, param), rebuilt_param in zip(model.named_parameters(), rebuilt.parameters(), strict=True):
        torch.testing.assert_close(param.grad, rebuilt_param.grad, rtol=1e-5, atol=1e-7, msg=name)
    own = OlmoeForCausalLM.from_pretrained(saved_model, dtype=torch.float32)
    if k != own.config.num_experts_per_tok:
        assert (own(input_ids=rows_BS, labels=rows_BS).loss - got).abs() > 1e-4, f"k={k} changed nothing"


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "llama4"])
def test_the_training_forward_is_the_model_built_with_k_in_other_families(name):
    """Renormalised softmax (Mixtral), sigmoid + bias with no balance loss (DeepSeek-V3), and a model
    that declares router_aux_loss_coef but trains without the term (Llama-4): loss and gradients at
    k = 3 equal those of the model built with num_experts_per_tok = 3."""
    model = families.build(name).train()
    config = families.FAMILIES[name]()
    config.num_experts_per_tok = 3
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rows_BS = torch.randint(3, families.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    want = rebuilt(input_ids=rows_BS, labels=rows_BS, output_router_logits=True).loss
    want.backward()
    got = phds.Dial(model, (1, 3)).loss(rows_BS, 3)[0]
    got.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for (param_name, param), rebuilt_param in zip(model.named_parameters(), rebuilt.parameters(), strict=True):
        if rebuilt_param.grad is None:
            assert param.grad is None or not param.grad.any(), param_name
        else:
            torch.testing.assert_close(param.grad, rebuilt_param.grad, rtol=1e-5, atol=1e-7, msg=param_name)


def test_run_varies_k_then_anchors_at_min_and_writes_a_loadable_checkpoint(saved_model, tokens_dir, tmp_path,
                                                                           experts_spy):
    out = tmp_path / "phds"
    run_cli(saved_model, tokens_dir, out)
    layers = json.loads((saved_model / "config.json").read_text())["num_hidden_layers"]
    assert len(experts_spy) == 11 * layers
    per_step = experts_spy[::layers]
    assert all(experts_spy[i * layers: (i + 1) * layers] == [k] * layers for i, k in enumerate(per_step))
    assert set(per_step[:8]) == {1, 2, 3}, f"k was not varied across --ks: {per_step[:8]}"
    assert per_step[8:] == [1, 1, 1], "the curriculum must run at min(ks)"
    record = json.loads((out / "phds.json").read_text())
    assert record["done"] and record["settings"]["ks"] == [1, 2, 3]
    assert [e["k"] for e in record["log"] if "k" in e] == per_step
    assert [e["step"] for e in record["log"] if "validation_nll" in e] == [0, 8, 11]
    assert not (out / phds.STATE_FILE).exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    tuned, _ = roe.load(out)
    base, _ = roe.load(saved_model)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "the fine-tune changed no weight"
    with roe.roster(tuned, roe.RoEConfig(roster_size=1, tau=0.0, experts_per_token=1)) as r:
        assert torch.isfinite(r.score(torch.tensor([[5, 6, 7, 8]]))).all()


def test_an_interrupted_run_resumes_to_the_uninterrupted_parameters(saved_model, tokens_dir, tmp_path, monkeypatch,
                                                                    experts_spy, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_cli(saved_model, tokens_dir, whole)
    experts_spy.clear()
    real_step = phds.step_once

    def interrupted(dial, optimizer, tokens, cfg, step):
        if step == 5:
            raise KeyboardInterrupt
        return real_step(dial, optimizer, tokens, cfg, step)

    monkeypatch.setattr(phds, "step_once", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(saved_model, tokens_dir, parts)
    assert torch.load(parts / phds.STATE_FILE, weights_only=False)["step"] == 5
    monkeypatch.setattr(phds, "step_once", real_step)
    capsys.readouterr()
    experts_spy.clear()
    run_cli(saved_model, tokens_dir, parts)
    assert "at step 5 of 11" in capsys.readouterr().out
    layers = json.loads((saved_model / "config.json").read_text())["num_hidden_layers"]
    assert len(experts_spy) == 6 * layers, "the resumed run must do only the remaining 6 steps"
    want, got = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    steps = [e["step"] for e in json.loads((parts / "phds.json").read_text())["log"] if "k" in e]
    assert steps == list(range(1, 12))
    run_cli(saved_model, tokens_dir, parts)
    assert "nothing to do" in capsys.readouterr().out
    err = refused(["phds", "--model", str(saved_model), "--data", str(tokens_dir), "--out", str(parts), *SETTINGS,
                   "--seed", "1"], capsys)
    assert "already holds a PHDS fine-tune made with other settings" in err
    assert torch.equal(load_file(parts / "model.safetensors")["lm_head.weight"], got["lm_head.weight"])


def test_the_input_directory_is_not_an_output(saved_model, tokens_dir, capsys):
    err = refused(["phds", "--model", str(saved_model), "--data", str(tokens_dir), "--out", str(saved_model),
                   *SETTINGS], capsys)
    assert "is the input model's directory" in err
    assert not (saved_model / "phds.json").exists()


def test_a_checkpoint_of_other_settings_is_not_resumed(saved_model, tokens_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "phds"
    real_step = phds.step_once

    def interrupted(dial, optimizer, tokens, cfg, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(dial, optimizer, tokens, cfg, step)

    monkeypatch.setattr(phds, "step_once", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(saved_model, tokens_dir, out)
    monkeypatch.setattr(phds, "step_once", real_step)
    assert (out / phds.STATE_FILE).is_file()
    err = refused(["phds", "--model", str(saved_model), "--data", str(tokens_dir), "--out", str(out), *SETTINGS,
                   "--lr", "1e-3"], capsys)
    assert "other settings (lr)" in err


@pytest.mark.parametrize(("ks", "message"), [
    ("", "at least one level"),
    (",", "at least one level"),
    ("0,2", "integers >= 1"),
    ("-1", "integers >= 1"),
    ("2,x", "comma-separated integers"),
    ("2,9", "--ks 9: experts_per_token=9 exceeds the 8 experts of OlmoeForCausalLM"),
])
def test_bad_ks_are_refused(saved_model, tokens_dir, tmp_path, capsys, ks, message):
    out = tmp_path / "phds"
    err = refused(["phds", "--model", str(saved_model), "--data", str(tokens_dir), "--out", str(out), "--ks", ks],
                  capsys)
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_family_whose_model_fixes_k_is_refused(tmp_path, capsys, tokens_dir, saved_model):
    path = tmp_path / "phimoe"
    families.build("phimoe").save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((saved_model / name).read_bytes())
    err = refused(["phds", "--model", str(path), "--data", str(tokens_dir), "--out", str(tmp_path / "out"),
                   "--ks", "1,2"], capsys)
    assert "--ks 1: PhimoeForCausalLM cannot run experts_per_token=1" in err and "always picks exactly 2" in err
    assert not (tmp_path / "out").exists()


def test_missing_training_data_says_how_to_make_it(saved_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(phds, "DEFAULT_TOKENS", tmp_path / "no-tokens")
    err = refused(["phds", "--model", str(saved_model), "--out", str(tmp_path / "out"), "--ks", "1,2"], capsys)
    assert "tokenised training data of the default model is missing" in err
    assert "python -m tools.tokenizer" in err and "--encode" in err and "--data FILE" in err


def test_a_token_file_out_of_the_vocabulary_is_refused(saved_model, tmp_path, capsys):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(100_000, 100_500, dtype=np.int64))
    err = refused(["phds", "--model", str(saved_model), "--data", str(ids), "--out", str(tmp_path / "out"),
                   "--ks", "1,2", "--seq-len", "16"], capsys)
    assert "outside the model's vocabulary" in err
