"""``roe phds --routing-tau``: RoE-aware training on a tiny OLMoE (3 MoE layers, 8 experts, top-2).

Window b of a step's batch is roster member b: member 0 routes as the model does, the others with
RoE's keyed noise of a seed that changes every step. What the tests hold it to: at tau = 0 the
run is plain fine-tuning (the model's own loss, AdamW) bit for bit; at tau > 0 the member rows
really choose other experts in the noisy layers while row 0 keeps the clean choice; the router
gets gradients through the clean gate weights at the noisy choice; an interrupted run resumes to
the parameters of an uninterrupted one; a tools.train checkpoint (ckpt.pt) is an input.
"""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers.models.olmoe import modeling_olmoe

import roe
from benchmarks import equivalent_size_measure as measure
from roe import cli, phds
from roe.tokens import batch_at
from tests.conftest import refused

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ["--steps", "6", "--curriculum-steps", "0", "--batch-size", "4", "--seq-len", "16", "--eval-windows", "0",
            "--ckpt-minutes", "0"]


def run_cli(model, tokens_dir, out, *extra):
    cli.main(["phds", "--model", str(model), "--data", str(tokens_dir), "--out", str(out), *SETTINGS, *extra])


@pytest.fixture
def experts_spy(monkeypatch):
    """The (expert ids [T, A], gate weights [T, A]) every MoE layer ran, in call order."""
    used = []
    original = modeling_olmoe.OlmoeExperts.forward

    def forward(self, hidden_states, top_k_index, top_k_weights):
        used.append((top_k_index.detach().clone(), top_k_weights.detach().clone()))
        return original(self, hidden_states, top_k_index, top_k_weights)

    monkeypatch.setattr(modeling_olmoe.OlmoeExperts, "forward", forward)
    return used


def test_at_tau_0_the_run_is_plain_fine_tuning_bit_for_bit(saved_model, tokens_dir, tmp_path):
    """The model's own loss (CE + its balance term), AdamW, the same windows and rates: equal parameters;
    and tau = 0.5 gives others, so the comparison can see the noise."""
    run_cli(saved_model, tokens_dir, tmp_path / "tau0", "--routing-tau", "0")
    model, _ = roe.load(saved_model)
    model.train()
    cfg = phds.PhdsConfig(steps=6, curriculum_steps=0, batch_size=4, seq_len=16)
    optimizer = phds.make_optimizer(model, cfg)
    tokens = np.fromfile(tokens_dir / "train.bin", dtype=np.uint16)
    for step in range(cfg.total_steps):
        for group in optimizer.param_groups:
            group["lr"] = phds.lr_at(cfg, step)
        rows_BS = batch_at(tokens, cfg, step)
        model(input_ids=rows_BS, labels=rows_BS, output_router_logits=True).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    got, plain = roe.load(tmp_path / "tau0")[0].state_dict(), model.state_dict()
    assert got.keys() == plain.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, plain[name]), name
    run_cli(saved_model, tokens_dir, tmp_path / "tau05", "--routing-tau", "0.5")
    noisy = roe.load(tmp_path / "tau05")[0].state_dict()
    assert any(not torch.equal(noisy[name], plain[name]) for name in got), "tau = 0.5 changed nothing"


def test_member_rows_route_differently_and_row_0_stays_clean(saved_model, experts_spy):
    """Four copies of one window: clean, all rows pick the same experts. With noise (tau 2 on the middle
    MoE layer), rows 1-3 pick others there, each its own, and another step's seed others again;
    row 0 keeps the clean choice in every layer, and the first (clean) layer is untouched."""
    model, _ = roe.load(saved_model)
    dial = phds.Dial(model.train(), (2,), routing_tau=2.0, members=4)
    assert dial.tau_L == (0.0, 2.0, 0.0)
    rows_BS = torch.randint(2, 128, (1, 16), generator=torch.Generator().manual_seed(3)).expand(4, 16)
    cfg = phds.PhdsConfig(routing_tau=2.0)
    picks = {}
    for name, seed in (("clean", None), ("step 0", phds.noise_seed_at(cfg, 0)), ("step 1", phds.noise_seed_at(cfg, 1))):
        experts_spy.clear()
        with torch.no_grad():
            dial.forward(rows_BS, 2, seed)
        picks[name] = [ids.reshape(4, 16, -1).sort(dim=-1).values for ids, _ in experts_spy]
    clean = picks["clean"]
    assert all(torch.equal(layer[b], layer[0]) for layer in clean for b in range(4))
    for name in ("step 0", "step 1"):
        first, middle, last = picks[name]
        assert torch.equal(first, clean[0])
        assert torch.equal(middle[0], clean[1][0]) and torch.equal(last[0], clean[2][0]), f"{name}: row 0 not clean"
        moved = [(middle[b] != clean[1][0]).any(dim=-1).sum().item() for b in range(1, 4)]
        assert all(m >= 4 for m in moved), f"{name}: the noisy rows kept the clean experts ({moved} of 16 moved)"
        assert not torch.equal(middle[1], middle[2]) and not torch.equal(middle[2], middle[3]), "members share noise"
    assert not torch.equal(picks["step 0"][1], picks["step 1"][1]), "two steps drew the same noise"


def test_the_router_learns_through_the_clean_gate_weights_at_the_noisy_choice(saved_model, experts_spy):
    """The experts run with the clean softmax weights at the noisy choice; cross-entropy alone (no
    balance term) reaches every router, and in the noisy layer its gradient differs from the clean
    run's (the noisy choice is what the weights are trained at)."""
    model, _ = roe.load(saved_model)
    model.train()
    dial = phds.Dial(model, (2,), routing_tau=1.0, members=4)
    rows_BS = torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    grads = {}
    for name, seed in (("clean", None), ("noisy", 7)):
        model.zero_grad(set_to_none=True)
        experts_spy.clear()
        logits_BSV, router_logits_L = dial.forward(rows_BS, 2, seed)
        phds.next_token_ce(logits_BSV, rows_BS).backward()
        grads[name] = [layer.mlp.gate.weight.grad.clone() for layer in model.model.layers]
    clean_ids_TA = torch.topk(router_logits_L[1], 2, dim=-1).indices
    ids_TA, weights_TA = experts_spy[1]
    assert not torch.equal(ids_TA.sort(-1).values, clean_ids_TA.sort(-1).values), "no noisy choice to test"
    clean_weights_TA = torch.softmax(router_logits_L[1].detach(), dim=-1).gather(1, ids_TA)
    torch.testing.assert_close(weights_TA, clean_weights_TA, rtol=0, atol=0)
    for layer, grad in enumerate(grads["noisy"]):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"no gradient reached router {layer}"
    assert not torch.allclose(grads["noisy"][1], grads["clean"][1]), "the noisy layer trained as if clean"


def test_an_interrupted_noisy_run_resumes_to_the_uninterrupted_parameters(saved_model, tokens_dir, tmp_path,
                                                                          monkeypatch, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_cli(saved_model, tokens_dir, whole, "--routing-tau", "0.5")
    real_step = phds.step_once
    seeds = []
    real_seed = phds.noise_seed_at

    def interrupted(dial, optimizer, tokens, cfg, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(dial, optimizer, tokens, cfg, step)

    monkeypatch.setattr(phds, "step_once", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(saved_model, tokens_dir, parts, "--routing-tau", "0.5")
    assert torch.load(parts / phds.STATE_FILE, weights_only=False)["step"] == 3
    monkeypatch.setattr(phds, "step_once", real_step)
    monkeypatch.setattr(phds, "noise_seed_at", lambda cfg, step: seeds.append(step) or real_seed(cfg, step))
    capsys.readouterr()
    run_cli(saved_model, tokens_dir, parts, "--routing-tau", "0.5")
    assert "at step 3 of 6" in capsys.readouterr().out
    assert seeds == [3, 4, 5], "the resumed run must draw the noise of the remaining steps only"
    want, got = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    record = json.loads((parts / "phds.json").read_text())
    assert record["settings"]["routing_tau"] == 0.5 and record["routing_tau_L"] == [0.0, 0.5, 0.0]
    assert record["ks"] == [2] and record["settings"]["ks"] is None
    err = refused(["phds", "--model", str(saved_model), "--data", str(tokens_dir), "--out", str(parts), *SETTINGS,
                   "--routing-tau", "0.4"], capsys)
    assert "already holds a PHDS fine-tune made with other settings" in err


def test_a_schedule_file_sets_the_temperature_of_each_layer(saved_model, tokens_dir, tmp_path, capsys):
    """A calibrated schedule is used as given; one of another layer count is refused before any step."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    roe.Schedule(tau=(0.3, 0.2, 0.1), provenance={}).save(good)
    roe.Schedule(tau=(0.3, 0.2), provenance={}).save(bad)
    run_cli(saved_model, tokens_dir, tmp_path / "out", "--routing-tau", str(good))
    assert json.loads((tmp_path / "out" / "phds.json").read_text())["routing_tau_L"] == [0.3, 0.2, 0.1]
    err = refused(["phds", "--model", str(saved_model), "--data", str(tokens_dir), "--out", str(tmp_path / "o2"),
                   *SETTINGS, "--routing-tau", str(bad)], capsys)
    assert "--routing-tau" in err and "Traceback" not in err
    for tau, message in (("-1", "finite temperature >= 0"), ("nan", "finite temperature >= 0"),
                         (str(tmp_path / "none.json"), "schedule file not found")):
        err = refused(["phds", "--model", str(saved_model), "--data", str(tokens_dir), "--out", str(tmp_path / "o3"),
                       *SETTINGS, "--routing-tau", tau], capsys)
        assert message in err, err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_a_tools_train_checkpoint_is_an_input(tmp_path, capsys, monkeypatch):
    """ckpt.pt as tools.train writes it (a tiny member on the embedded tokenizer): the weights loaded are the
    checkpoint's, torch's global RNG is left alone, the fine-tune runs from it into a loadable directory
    and a ckpt.pt that benchmarks/equivalent_size.py reads as a member, and the run directory itself is
    refused as --out."""
    from tools import finetune, train

    monkeypatch.setattr(phds, "FILE_READER", None)  # the package alone; finetune.main installs the reader
    tokenizer = roe.load()[1]
    cfg = train.TrainConfig(preset="tiny", num_heads=4, seq_len=16, batch_size=4, total_steps=50)
    model = train.build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.add_(0.25)  # weights no fresh build_model has
    run = tmp_path / "run"
    run.mkdir()
    train.save_checkpoint(run / "ckpt.pt", model, phds.make_optimizer(model, cfg), 40, 1.0, cfg)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    np.random.default_rng(1).integers(0, len(tokenizer), 3000).astype(np.uint16).tofile(tokens / "train.bin")
    torch.rand(5)  # a state a fresh build_model(seed 0) would not leave behind
    rng_state = torch.get_rng_state()
    err = refused(["phds", "--model", str(run / "ckpt.pt"), "--data", str(tokens), "--out", str(tmp_path / "x")],
                  capsys)
    assert "python -m tools.finetune" in err  # the installed package reads directories only
    loaded, _, origin = train.read_checkpoint(run / "ckpt.pt")
    assert torch.equal(torch.get_rng_state(), rng_state), "loading reseeded torch's global RNG"
    assert origin == {"kind": "tools.train checkpoint", "step": 40, "total_steps": 50, "config": asdict(cfg)}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    out = tmp_path / "tuned"
    finetune.main(["--model", str(run / "ckpt.pt"), "--data", str(tokens), "--out", str(out), "--routing-tau",
                   "0.5", "--steps", "2", "--curriculum-steps", "0", "--batch-size", "4", "--seq-len", "16",
                   "--eval-windows", "0"])
    assert "saved at step 40 of 50" in capsys.readouterr().out
    tuned, _ = roe.load(out)
    assert not torch.equal(tuned.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight)
    assert json.loads((out / "phds.json").read_text())["input"]["step"] == 40
    member, step = measure.load_member(out, tokenizer.eos_token_id, allow_unfinished=True)  # as members are read
    assert step == 42
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(member.state_dict()[name], tensor), name
    err = refused(["phds", "--model", str(run / "ckpt.pt"), "--data", str(tokens), "--out", str(run),
                   "--routing-tau", "0.5"], capsys)  # the reader finetune.main installed is still in place
    assert "is the input model's directory" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    err = refused(["phds", "--model", str(tmp_path / "junk.pt"), "--data", str(tokens), "--out", str(out / "x")],
                  capsys)
    assert "not a tools.train checkpoint" in err


def test_runs_made_before_routing_tau_existed_still_resume(saved_model, tokens_dir, tmp_path, capsys):
    """Settings stored before --routing-tau existed (no such key) are a run with routing_tau None."""
    out = tmp_path / "old"
    run_cli(saved_model, tokens_dir, out)
    record = json.loads((out / "phds.json").read_text())
    settings = dict(record["settings"])
    record["settings"].pop("routing_tau")  # as a finished run made before the option stored it
    (out / "phds.json").write_text(json.dumps(record))
    run_cli(saved_model, tokens_dir, out)
    assert "nothing to do" in capsys.readouterr().out  # not refused as "other settings"

    model = roe.load(saved_model)[0]
    optimizer = phds.make_optimizer(model, phds.PhdsConfig(ks=(2,)))
    old = {k: v for k, v in settings.items() if k != "routing_tau"}
    state = {"settings": old, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3, "log": []}
    torch.save(state, out / phds.STATE_FILE)
    assert phds.resume_state(out, model, optimizer, settings)[0] == 3
    torch.save({**state, "settings": {**old, "routing_tau": 0.5}}, out / phds.STATE_FILE)
    with pytest.raises(ValueError, match="routing_tau"):  # a real difference is still refused
        phds.resume_state(out, model, optimizer, settings)
