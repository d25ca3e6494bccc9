"""roe's transformers engine as the reference for the vLLM plugin: run with the main venv (.venv).

    .venv/bin/python vllm_plugin/tests/roe_reference.py '{"model": null, "prompt_ids": [[...]],
        "max_new_tokens": 32, "configs": [{"roster_size": 4, "tau": 0.3, "seed": 0}, ...]}'

Prints one JSON document: per config, per prompt, the greedy tokens and the aggregated log-probs
[steps, V] each was chosen from (eos ignored). ``model`` null is roe's embedded default model,
else the path of a local checkpoint (no tokenizer needed).
"""

import json
import sys

import torch

import roe


def load(path):
    if path is None:
        return roe.load()[0]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run(model, cfg: dict, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    out = []
    with roe.roster(model, roe.RoEConfig(**cfg)) as r:
        for ids in prompts:
            steps: list = []
            tokens = r.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=[],
                                on_step=lambda chosen, logprobs, into=steps: into.append(logprobs[0].tolist()))
            out.append({"tokens": tokens[0, len(ids):].tolist(), "logprobs": steps})
    return out


def main(spec: dict) -> dict:
    model = load(spec.get("model"))
    return {"outputs": [run(model, cfg, spec["prompt_ids"], spec["max_new_tokens"]) for cfg in spec["configs"]]}


if __name__ == "__main__":
    json.dump(main(json.loads(sys.argv[1])), sys.stdout)
