"""The ``roe`` lm-eval model on local tasks (tests/data/lm_eval) and the tiny saved checkpoint.

lm-eval's own ``hf`` model on the same checkpoint is the reference: K = 1 must give its numbers
exactly; K > 1 must give what ``Roster.score`` / ``Roster.generate`` give directly.
"""

import os
import subprocess
import sys
from pathlib import Path

# NOTE: lm-eval is imported, not importorskip'ed: the dev install (make test) has it, so a missing
# or broken lm-eval is a failure here, not a skip.
import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.models.utils_hf import pad_and_concat
from lm_eval.tasks import TaskManager

import roe
from roe.lm_eval import RoELM

TASKS = Path(__file__).parent / "data" / "lm_eval"
MC, GEN = "roe_tiny_mc", "roe_tiny_gen"
NOISY = dict(roster_size=4, tau=1.0)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """Offline, a fresh datasets cache, run from the task directory (data_files are relative)."""
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        # the libraries read these at import time, possibly before this module ran
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.chdir(TASKS)
        yield TaskManager(include_path=str(TASKS), include_defaults=False)


def evaluate(lm, task_manager, tasks=(MC, GEN)):
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, log_samples=True)
    return out["results"], {task: out["samples"][task] for task in tasks}


def resps(samples):
    return [s["resps"] for s in samples]


@pytest.fixture(scope="module")
def hf_run(saved_model, task_manager):
    return evaluate(HFLM(pretrained=str(saved_model), device="cpu", batch_size=4), task_manager)


@pytest.fixture(scope="module")
def noisy(saved_model, task_manager):
    """K = 4, tau = 1 at batch size 1 (no padding: numerically the same call as a direct score)."""
    lm = RoELM(pretrained=saved_model, batch_size=1, **NOISY)
    return lm, *evaluate(lm, task_manager)


def test_k1_is_exactly_lm_evals_hf(saved_model, task_manager, hf_run):
    # batch size 4: right-padded batches, scored through HFLM's own forward
    results, samples = evaluate(RoELM(pretrained=saved_model, roster_size=1, batch_size=4), task_manager)
    hf_results, hf_samples = hf_run
    assert resps(samples[MC]) == resps(hf_samples[MC])
    assert results[MC]["acc,none"] == hf_results[MC]["acc,none"]
    # generation goes through the roster engine; K = 1 greedy is the model's greedy
    assert resps(samples[GEN]) == resps(hf_samples[GEN])


def test_noisy_loglikelihoods_are_roster_scores(saved_model, noisy, hf_run):
    lm, results, samples = noisy
    assert resps(samples[MC]) != resps(hf_run[1][MC])
    assert results["roe_tiny_mc"]["alias"] == MC
    model, _ = roe.load(saved_model)
    with roe.roster(model, roe.RoEConfig(**NOISY)) as r:
        for sample in samples[MC]:
            for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
                context_ids, cont_ids = lm._encode_pair(context, continuation)
                inputs = torch.tensor([(context_ids + cont_ids)[:-1]])
                # lm-eval log_softmaxes what _model_call returns: a renormalisation of the roster's log-probs
                logprobs_1CV = torch.log_softmax(r.score(inputs), dim=-1)[:, -len(cont_ids):]
                cont_1C = torch.tensor([cont_ids])
                picked_1C = logprobs_1CV.gather(2, cont_1C[..., None])[..., 0]
                greedy = bool((logprobs_1CV.argmax(-1) == cont_1C).all())
                assert resp == [(float(picked_1C.sum()), greedy)]


def test_noisy_generation_is_roster_generate(saved_model, noisy):
    lm, _, samples = noisy
    model, tokenizer = roe.load(saved_model)
    stop = [".", tokenizer.eos_token]
    with roe.roster(model, roe.RoEConfig(**NOISY)) as r:
        for sample in samples[GEN]:
            context, gen_kwargs = sample["arguments"][0]
            assert gen_kwargs["max_gen_toks"] == 6
            ids, mask = lm.tok_batch_encode([context])
            out = r.generate(ids, attention_mask=mask, max_new_tokens=6, stop_strings=stop, tokenizer=tokenizer)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            assert sample["resps"] == [[postprocess_generated_text(text, stop, None)]]


def test_right_padding_does_not_reach_real_positions(noisy):
    lm = noisy[0]
    rows = [torch.randint(2, 200, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5)]
    padded = pad_and_concat(9, list(rows), padding_side="right")  # HFLM's own right padding (edits the list)
    batch_logprobs = lm._model_call(padded)
    for row, logprobs in zip(rows, batch_logprobs, strict=True):
        torch.testing.assert_close(logprobs[: len(row)], lm._model_call(row[None])[0], rtol=0, atol=1e-5)


def test_model_info_records_the_roster(noisy):
    info = noisy[0].get_model_info()["roe"]
    assert info["roster_size"] == 4 and info["tau_per_moe_layer"] == [0.0, 1.0, 0.0]


def test_schedule_file_and_clear_errors(saved_model, tmp_path):
    path = tmp_path / "schedule.json"
    roe.Schedule(tau=(0.0, 0.7, 0.2)).save(path)
    assert RoELM(pretrained=saved_model, schedule=str(path)).roster.tau_L == (0.0, 0.7, 0.2)
    with pytest.raises(ValueError, match="either tau or schedule"):
        RoELM(pretrained=saved_model, tau=0.3, schedule=str(path))
    with pytest.raises(ValueError, match="roster_size must be >= 1"):
        RoELM(pretrained=saved_model, roster_size=0)


def test_the_default_tau_is_the_models_default_schedule(saved_model, tmp_path):
    """Without tau or schedule, RoELM runs the schedule the checkpoint ships, as the CLI and the
    library do (it used to fall back to uniform 0.1 while the CLI used the shipped one)."""
    import shutil

    model_dir = tmp_path / "with-schedule"
    shutil.copytree(saved_model, model_dir)
    roe.Schedule(tau=(0.05, 0.3, 0.2)).save(model_dir / "schedule.json")
    assert RoELM(pretrained=model_dir, roster_size=2).roster.tau_L == (0.05, 0.3, 0.2)
    assert RoELM(pretrained=model_dir, roster_size=2, tau=0.4).roster.tau_L == (0.0, 0.4, 0.0)
    assert RoELM(pretrained=saved_model, roster_size=2).roster.tau_L == (0.0, 0.1, 0.0)


def run_module(argv, cwd, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path),
               OMP_NUM_THREADS="1", PYTHONPATH=str(Path(roe.__file__).parents[1]))
    return subprocess.run([sys.executable, "-m", "roe.lm_eval", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_roe_is_registered_and_python_m_hands_over_to_lm_evals_cli(tmp_path):
    from lm_eval.api.registry import get_model

    assert get_model("roe") is RoELM
    done = run_module(["run", "--help"], tmp_path, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--model_args" in done.stdout


@pytest.mark.slow
def test_python_m_roe_lm_eval_runs_a_task(saved_model, tmp_path):
    """The full CLI path (lm-eval indexes all its built-in tasks first: ~15-30 s)."""
    done = run_module(["--model", "roe", "--model_args", f"pretrained={saved_model},roster_size=2,tau=1.0",
                       "--tasks", MC, "--include_path", str(TASKS), "--device", "cpu", "--limit", "2"],
                      TASKS, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert MC in done.stdout and "acc" in done.stdout
