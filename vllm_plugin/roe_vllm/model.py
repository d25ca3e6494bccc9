"""``RoEModel``: a vLLM causal LM whose forward also runs the RoE members of its requests as extra rows.

Shapes: T clean rows of a forward, M member rows, N requests (logits rows), V vocab, D hidden.

One forward (roe_vllm/members.py for the rows, routing.py for the experts, attention.py for the
member attention):

1. ``forward`` reads the batch's RoE requests (roe_vllm/requests.py) and, if some sample a token
   this step, builds the ``Step``; otherwise it is the stock forward, untouched.
2. Pre-hooks append the member rows at the input of the batch's first noisy MoE block (every
   earlier layer, and that layer's attention, run on the T clean rows only) and widen the
   residual, positions and the final norm's inputs after it. The model code is unchanged.
3. Each attention layer runs vLLM's attention on the clean rows (writing the KV cache) and the
   member attention on the member rows (reading it; attention.py, a compiled kernel where it
   builds). Each router re-selects the member rows' experts with roe's keyed noise and gives them
   the clean gate weights; rows of requests that dial ``experts_per_token`` select k experts
   (routing.py).
4. ``forward`` returns the T clean rows and keeps the M member rows; ``compute_logits`` runs the
   head once over the sampled clean rows and the member rows, and replaces each RoE request's
   logits row with ``log mean_k softmax(logits_k)`` over its K members (aggregation.py), so
   greedy, sampling, returned logprobs and stop strings all act on the averaged distribution.

The stock class's weights, kernels and KV cache are used as they are. A tied LM head that vLLM's
class does not tie (OLMoE) is tied at load.
"""

from __future__ import annotations

import torch

from roe_vllm import aggregation, attention, routing
from roe_vllm.aggregation import aggregate
from roe_vllm.members import Request, Step
from roe_vllm.requests import table_for


def check_engine(vllm_config) -> None:
    """Refuse engine settings under which member rows cannot be run correctly."""
    problems = []
    if not vllm_config.model_config.enforce_eager:
        problems.append("compiled graphs (pass enforce_eager=True; roe_vllm.engine_args does)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallel")
    if parallel.data_parallel_size > 1:
        problems.append("data parallel (MoE gathers the rows of all ranks before routing)")
    if getattr(parallel, "enable_eplb", False):
        problems.append("EPLB")
    if getattr(vllm_config.compilation_config.pass_config, "enable_sp", False):
        problems.append("sequence parallel")
    if vllm_config.use_v2_model_runner:
        problems.append("the V2 model runner (set VLLM_USE_V2_MODEL_RUNNER=0)")
    if problems:
        raise ValueError("RoE on vLLM does not support " + "; ".join(problems))


class RoEModel:
    """Mixed into a stock vLLM ``*ForCausalLM`` class (roe_vllm/architectures.py)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        check_engine(vllm_config)
        self._roe_config = vllm_config
        self._roe_step: Step | None = None
        self._roe_members: tuple[Step, torch.Tensor] | None = None  # (the step, its member hidden rows [M, D])
        self._roe_banks: dict = {}  # (seed, K) -> roe NoiseBank, shared by the steps of the requests
        self._roe_layers = self._roe_install()
        self._roe_check_layers(vllm_config)

    def _roe_check_layers(self, vllm_config) -> None:
        """The frontend's MoE layer count (which checks requests) must be the model's; defaults must fit it."""
        from roe_vllm.architectures import num_moe_layers
        from roe_vllm.settings import EngineSettings

        expected = num_moe_layers(vllm_config.model_config.hf_config)
        if expected is not None and expected != self._roe_layers:
            raise ValueError(f"RoE: {type(self).__name__} has {self._roe_layers} MoE layers but its config says "
                             f"{expected}; roe_vllm.architectures.num_moe_layers is wrong for this model")
        engine = EngineSettings.parse(vllm_config.additional_config, vllm_config.model_config.model)
        self._roe_kernel = attention.kernel() if engine.kernels else None
        self._roe_mean_kernel = aggregation.kernel() if engine.kernels else None
        for name, schedule in engine.schedules.items():
            try:
                schedule.check_layers(self._roe_layers)
            except ValueError as err:
                raise ValueError(f"RoE schedule {name!r}: {err}") from None
        if engine.enabled:
            engine.roster(None, self._roe_layers)

    def _roe_install(self) -> int:
        """Hook every router, MoE block, decoder layer, attention layer and the final norm; the MoE layer count."""
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

        runners = [(name, m) for name, m in self.named_modules() if isinstance(getattr(m, "router", None),
                                                                               FusedMoERouter)]
        if not runners:
            raise ValueError(f"{type(self).__name__} has no fused MoE layer for RoE")
        step_of = self._roe_current
        self._roe_runners = [runner for _, runner in runners]
        for layer, (name, runner) in enumerate(runners):
            routing.install(runner.router, layer, step_of)
            block = self.get_submodule(name.rsplit(".", 1)[0])
            block.register_forward_pre_hook(self._roe_fan_out_hook(layer), with_kwargs=True)
        decoder_layers = self._roe_decoder_layers(runners[0][0])
        for module in list(decoder_layers) + [self._roe_norm]:
            if module is not None:
                module.register_forward_pre_hook(self._roe_widen_hook, with_kwargs=True)
        for module in self.modules():
            if isinstance(module, Attention):
                attention.check_layer(module)
                self._roe_wrap_attention(module)
        return len(runners)

    def _roe_decoder_layers(self, runner_path: str) -> torch.nn.ModuleList:
        parts = runner_path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            holder = self.get_submodule(".".join(parts[:cut - 1])) if cut > 1 else self
            layers = getattr(holder, parts[cut - 1], None)
            if isinstance(layers, torch.nn.ModuleList) and parts[cut].isdigit():
                object.__setattr__(self, "_roe_norm", getattr(holder, "norm", None))  # not a submodule
                return layers
        raise ValueError(f"{type(self).__name__}: cannot find the decoder layers around {runner_path}")

    def _roe_current(self) -> Step | None:
        return self._roe_step

    def _roe_fan_out_hook(self, layer: int):
        def hook(_module, args, kwargs):
            step = self._roe_step
            if step is None or step.wide or step.fan_out != layer:
                return None
            step.wide = True
            return self._roe_widen(step, args, kwargs)
        return hook

    def _roe_widen_hook(self, _module, args, kwargs):
        step = self._roe_step
        if step is None or not step.wide:
            return None
        return self._roe_widen(step, args, kwargs)

    @staticmethod
    def _roe_widen(step: Step, args, kwargs):
        """Append the member rows to every per-row tensor argument that has only the T clean rows."""
        def widen(value):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == step.rows:
                return step.widen(value)
            return value
        return tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}

    def _roe_wrap_attention(self, layer) -> None:
        original = layer.forward

        def forward(query, key, value, *args, **kwargs):
            step = self._roe_step
            if step is None or not step.wide or query.shape[0] == step.rows:
                return original(query, key, value, *args, **kwargs)
            T = step.rows
            clean = original(query[:T], key[:T], value[:T], *args, **kwargs)
            from vllm.forward_context import get_forward_context

            metadata = get_forward_context().attn_metadata
            metadata = metadata[layer.layer_name] if isinstance(metadata, dict) else metadata
            q_MHD = query[T:].reshape(-1, layer.num_heads, layer.head_size)
            k_MHD = key[T:].reshape(-1, layer.num_kv_heads, layer.head_size)
            v_MHD = value[T:].reshape(-1, layer.num_kv_heads, layer.head_size)
            out_MHD = attention.attend(layer, q_MHD, k_MHD, v_MHD, step, metadata, layer.kv_cache, self._roe_kernel)
            return torch.cat([clean, out_MHD.reshape(out_MHD.shape[0], *clean.shape[1:])])

        layer.forward = forward

    def _roe_requests(self, positions: torch.Tensor) -> list[Request]:
        """The RoE requests of this forward whose last scheduled token is sampled."""
        table = table_for(self._roe_config)
        if table is None:
            return []
        table.seen = True
        if not table.rows:
            return []
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
        if not metadata:
            return []
        metadata = next(iter(metadata.values())) if isinstance(metadata, dict) else metadata
        last_N = (metadata.query_start_loc[1:] - 1).tolist()
        found = []
        for index, entry in table.rows.items():
            if index >= len(last_N):
                continue
            if not entry.resolved:
                entry.roster = table.engine.roster(entry.extra_args, self._roe_layers)
                entry.resolved = True
            if entry.roster is None:
                continue
            row = last_N[index]
            position = int(positions[row])
            if entry.prompt_len is not None and position + 1 < entry.prompt_len:
                continue  # a prefill chunk that is not the last: its logits are not sampled
            found.append(Request(index=index, row=row, position=position, roster=entry.roster))
        return sorted(found, key=lambda r: r.index)

    def _roe_check_kernels(self) -> None:
        """MoE kernels that route inside the kernel never call the router: refuse them (vLLM's start-up
        warm-up forward runs this once the kernels are chosen, after the weights are loaded)."""
        monolithic = [i for i, runner in enumerate(self._roe_runners) if getattr(runner, "is_monolithic", False)]
        if monolithic:
            raise ValueError(f"RoE on vLLM: MoE layers {monolithic} run a monolithic kernel that routes inside the "
                             "kernel, where the member rows cannot be re-routed; choose a modular MoE backend")
        self._roe_kernels_checked = True

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if not getattr(self, "_roe_kernels_checked", False):
            self._roe_check_kernels()
        requests = self._roe_requests(positions)
        self._roe_members = None
        if not requests:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if len(self._roe_banks) > 256:
            self._roe_banks.clear()
        step = Step.build(positions.shape[0], requests, self._roe_banks)
        self._roe_step = step
        try:
            hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        finally:
            self._roe_step = None
        if not step.wide:
            raise RuntimeError(f"RoE: the member rows were never appended (MoE layer {step.fan_out} did not run)")
        T = step.rows
        self._roe_members = (step, hidden[T:])
        return hidden[:T]

    def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs):
        members, self._roe_members = self._roe_members, None
        if members is None:
            return super().compute_logits(hidden_states, *args, **kwargs)
        step, member_hidden = members
        N = hidden_states.shape[0]
        # one product with the head for the clean and the member rows: the head is read once
        logits = super().compute_logits(torch.cat([hidden_states, member_hidden]), *args, **kwargs)
        if logits is None:  # a tensor-parallel rank that does not hold the gathered logits
            return logits
        return aggregate(logits, N, step, self._roe_mean_kernel)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        config = self._roe_config.model_config.hf_config
        head = getattr(self, "lm_head", None)
        embed = getattr(getattr(self, "model", None), "embed_tokens", None)
        if (getattr(config, "tie_word_embeddings", False) and head is not None and embed is not None
                and "lm_head.weight" not in loaded and head is not embed):
            # NOTE: vLLM's OLMoE builds its own head and ignores tie_word_embeddings; a tied checkpoint has
            # no lm_head.weight and would run with an uninitialised head. Both are sharded alike over TP.
            head.weight.data.copy_(embed.weight.data)
            loaded = set(loaded) | {"lm_head.weight"}
        return loaded

