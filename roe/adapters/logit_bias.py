"""correction bias on the logits: Kolibri1.

    idx_TA = topk(logits_TE + bias_E, A);   w_TA = sigmoid(logits_TE[idx_TA]) (renormalised)

Differs from ``SigmoidBias`` by adding the bias to the logits instead of the scores, and by
gathering the chosen logits before the sigmoid, as ``Kolibri1TopKRouter`` does.

NOTE: gather-then-sigmoid is not bit for bit sigmoid-then-gather. PyTorch's CPU sigmoid runs
the vectorised body on whole chunks of 2 vector widths and the scalar loop on the tail (the last
numel mod 32 elements of a small fp32 tensor with AVX-512, mod 16 with AVX2); the two disagree
in the last bit for a few per cent of inputs. So an element's sigmoid depends on its position
in the tensor, and the [T, E] and [T, A] tensors put it in different places: the weights must
come from the sigmoid of the gathered [T, A] logits, at every k.
"""

from __future__ import annotations

from dataclasses import dataclass

from roe.adapters.sigmoid_bias import SigmoidBias, router_bias


@dataclass(frozen=True)
class LogitBias(SigmoidBias):
    name = "logit-bias"

    @classmethod
    def applies(cls, router):
        return super().applies(router) and router_bias(router) is not None

    def choice(self, router, logits_TE):
        return logits_TE + self.bias_E

    def chosen_scores(self, router, logits_TE, idx_TA):
        return self.scores(router, logits_TE.gather(-1, idx_TA))
