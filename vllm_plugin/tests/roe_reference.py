"""roe's transformers engine as the reference for the vLLM plugin: run with the main venv (.venv).

    .venv/bin/python vllm_plugin/tests/roe_reference.py '{"model": null, "prompt_ids": [[...]], "roster_size": 4,
        "tau": 0.3, "seed": 0, "skip_first": 1, "skip_last": 1, "max_new_tokens": 32}'

Prints one JSON document: per prompt, the greedy tokens and the aggregated log-probs [steps, V] each was
chosen from. The model is roe's embedded default one (``model`` null) or a local checkpoint path.
"""

import json
import sys

import torch

import roe


def main(spec: dict) -> dict:
    model, _ = roe.load(spec.get("model"))
    cfg = roe.RoEConfig(**{k: spec[k] for k in ("roster_size", "tau", "seed", "skip_first", "skip_last") if k in spec})
    out = []
    with roe.roster(model, cfg) as r:
        for ids in spec["prompt_ids"]:
            steps: list = []
            tokens = r.generate(torch.tensor([ids]), max_new_tokens=spec["max_new_tokens"], eos_token_id=[],
                                on_step=lambda chosen, logprobs, into=steps: into.append(logprobs[0].tolist()))
            out.append({"tokens": tokens[0, len(ids):].tolist(), "logprobs": steps})
    return {"outputs": out}


if __name__ == "__main__":
    json.dump(main(json.loads(sys.argv[1])), sys.stdout)
