"""Shared set-up of the vLLM plugin tests: in-process engines, offline, one thread, a small KV cache.

Engines cost ~20-30 s each to start on this CPU, so every test module shares its engines through
module-scoped fixtures. roe's reference runs in the main venv (.venv, transformers 5.23) as a
subprocess (roe_reference.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAIN_PYTHON = REPO / ".venv" / "bin" / "python"
REFERENCE = Path(__file__).with_name("roe_reference.py")


def roe_reference(spec: dict) -> list[dict]:
    """roe's transformers engine on ``spec`` (see roe_reference.py): per prompt, tokens and log-probs."""
    if not MAIN_PYTHON.exists():
        pytest.fail(f"roe's reference needs the main venv at {MAIN_PYTHON} (make install-dev)")
    done = subprocess.run([str(MAIN_PYTHON), str(REFERENCE), json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"roe reference failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)["outputs"]


def generate(llm, prompts: list[list[int]], extra_args: list[dict | None] | dict | None = None, *, max_tokens: int = 32,
             logprobs: int | None = None, **sampling) -> list:
    """Greedy completions of token-id prompts (eos ignored), one per prompt, with per-request extra_args."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extras = extra_args if isinstance(extra_args, list) else [extra_args] * len(prompts)
    params = [SamplingParams(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0.0), logprobs=logprobs,
                             ignore_eos=True, extra_args=extra, **sampling) for extra in extras]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def assert_each_as_alone(llm, prompts: list[list[int]], extras: list[dict | None]) -> None:
    """One batch of requests with mixed settings gives each the tokens and top-20 log-probs it gets alone."""
    together = generate(llm, prompts, extras, logprobs=20)
    for prompt, extra, out in zip(prompts, extras, together):
        alone = generate(llm, [prompt], extra, logprobs=20)[0]
        assert list(out.token_ids) == list(alone.token_ids)
        for x, y in zip(out.logprobs, alone.logprobs):
            assert x.keys() == y.keys()
            assert max(abs(x[t].logprob - y[t].logprob) for t in x) < 1e-4


def dense_logprobs(output, vocab: int) -> torch.Tensor:
    """[steps, V] log-probs of a completion requested with logprobs=V (NaN where none was returned)."""
    out = torch.full((len(output.logprobs), vocab), float("nan"))
    for step, by_token in enumerate(output.logprobs):
        for token, lp in by_token.items():
            out[step, token] = lp.logprob
    return out


def tied_copy(src: Path, dst: Path) -> Path:
    """A copy of a tied-embedding checkpoint that stores lm_head.weight (what stock vLLM OLMoE needs)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json",) and f.name != "config.json":
            (dst / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(src / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="session")
def default_model() -> Path:
    sys.path.insert(0, str(REPO))
    from roe.loading import DEFAULT_MODEL

    return DEFAULT_MODEL
