"""The ``roe`` model for lm-evaluation-harness: any HF MoE checkpoint, evaluated as a roster.

    python -m roe.lm_eval --model roe --model_args pretrained=PATH,roster_size=8,tau=0.3 --tasks ...

or, in Python, ``lm_eval.simple_evaluate(model=RoELM(pretrained=PATH, roster_size=8), ...)``.

``RoELM`` is lm-eval's own ``HFLM`` (tokenisation, batching, request ordering, few-shot and
chat handling are all lm-eval's) with the two model calls routed through a ``Roster``:

- log-likelihoods (multiple choice, rolling perplexity) come from ``Roster.score``, which has
  generation's semantics: the distribution at each continuation position is the K-member
  aggregate that ``generate`` computes at that step (clean history, noisy current token);
- ``generate_until`` runs ``Roster.generate`` (stop strings, eos, max tokens, sampling).

HFLM right-pads the batches it scores and passes no attention mask. Scoring is causal (a
position depends on the tokens up to it only, and the noise is keyed by position), so the pads
after a row's last token change none of its real positions: the padded batch is scored as is.
When the roster is the untouched model (K = 1 or tau = 0 everywhere) HFLM's own forward is
used, so the scores are exactly those of lm-eval's ``hf`` model on the same checkpoint.

lm-eval discovers no models through entry points, so ``"roe"`` exists once this module is
imported; ``main()`` imports it and then hands the command line to lm-eval's own CLI.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from roe.config import RoEConfig
from roe.loading import DEFAULT_MODEL
from roe.roster import Roster

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "roe.lm_eval needs lm-evaluation-harness; install it with: pip install 'roe[eval]'"
    ) from error

logger = logging.getLogger(__name__)


@register_model("roe")
class RoELM(HFLM):
    """HFLM whose log-likelihoods and generations come from a roster of experts.

    pretrained: a checkpoint directory, a hub id, or a loaded ``PreTrainedModel``; default
        the embedded model (``roe.loading.DEFAULT_MODEL``).
    roster_size, tau, skip_first, skip_last, seed, aggregator, noisy_weights: ``RoEConfig``;
        without tau or schedule, the model's default schedule (its shipped ``schedule.json``,
        as the embedded model's, else uniform 0.1), as everywhere in roe.
    schedule: path of a per-layer schedule JSON (instead of ``tau``).
    dtype: float32 by default, as ``roe.load`` (pass ``dtype=bfloat16`` etc. for big models).
    Every other keyword is HFLM's.
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        roster_size: int = RoEConfig.roster_size,
        tau: float | None = None,
        schedule: str | Path | None = None,
        seed: int = RoEConfig.seed,
        skip_first: int = RoEConfig.skip_first,
        skip_last: int = RoEConfig.skip_last,
        aggregator: str = RoEConfig.aggregator,
        noisy_weights: bool = RoEConfig.noisy_weights,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        **kwargs,
    ) -> None:
        if tau is not None and schedule is not None:
            raise ValueError("give either tau or schedule, not both")
        tau_spec = schedule if schedule is not None else tau  # None: the model's default schedule
        cfg = RoEConfig(roster_size=roster_size, tau=tau_spec, seed=seed, skip_first=skip_first,
                        skip_last=skip_last, aggregator=aggregator, noisy_weights=noisy_weights)
        if pretrained is None:
            if not (DEFAULT_MODEL / "config.json").is_file():
                raise FileNotFoundError(f"the embedded default model is missing from {DEFAULT_MODEL}; "
                                        "pass pretrained=PATH")
            pretrained = DEFAULT_MODEL
        if isinstance(pretrained, Path):
            pretrained = str(pretrained)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, dtype=dtype, device=device, **kwargs)
        if self.backend != "causal":
            raise TypeError("roe evaluates decoder-only causal LMs only")
        # NOTE: never entered as a `with` block: each score/generate call installs the roster for
        # its duration, so HFLM's own calls always run the untouched model.
        self.roster = Roster(self.model, cfg)

    @property
    def untouched(self) -> bool:
        """True when the roster is the model itself (K = 1 or tau = 0 in every layer)."""
        return self.roster.members == 1

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """RoE log-probs [B, S, V] of right-padded rows (HFLM applies log_softmax on top).

        The pads follow each row's tokens, so causality keeps them out of its real positions.
        lm-eval's second log_softmax only renormalises (within a few ulps of the roster's).
        """
        if self.untouched:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        return self.roster.score(inps)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """``Roster.generate`` on left-padded prompts; returns [B, S + new] like ``model.generate``."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        temperature = float(generation_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = generation_kwargs.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        top_p = float(generation_kwargs.pop("top_p", 1.0) or 1.0)
        if generation_kwargs:
            logger.warning("roe generation ignores the unsupported options %s", sorted(generation_kwargs))
        return self.roster.generate(
            context, attention_mask=attention_mask, max_new_tokens=max(0, max_length - context.shape[1]),
            do_sample=do_sample, temperature=temperature if do_sample else 1.0, top_p=top_p,
            stop_strings=stop, tokenizer=self.tokenizer, pad_token_id=self.tokenizer.pad_token_id,
        )

    def get_model_info(self) -> dict:
        """HFLM's model info plus the roster actually run (per-layer tau included)."""
        cfg = self.roster.cfg
        return super().get_model_info() | {"roe": {
            "roster_size": cfg.roster_size, "members_computed": self.roster.members,
            "tau_per_moe_layer": list(self.roster.tau_L), "seed": cfg.seed, "aggregator": cfg.aggregator,
            "noisy_weights": cfg.noisy_weights,
        }}


def main() -> None:
    """``python -m roe.lm_eval ARGS``: lm-eval's CLI with the ``roe`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
