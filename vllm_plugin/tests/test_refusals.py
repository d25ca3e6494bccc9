"""What RoE on vLLM cannot run is refused with the reason: engine settings, model families, settings."""

from types import SimpleNamespace

import pytest
from roe_vllm.architectures import num_moe_layers, roe_name
from roe_vllm.model import check_engine
from roe_vllm.settings import EngineSettings, check_request


def _config(**over):
    parallel = SimpleNamespace(pipeline_parallel_size=1, data_parallel_size=1, enable_eplb=False)
    base = dict(model_config=SimpleNamespace(enforce_eager=True), speculative_config=None, parallel_config=parallel,
                compilation_config=SimpleNamespace(pass_config=SimpleNamespace(enable_sp=False)),
                use_v2_model_runner=False)
    for key, value in over.items():
        if key in ("pipeline_parallel_size", "data_parallel_size", "enable_eplb"):
            setattr(parallel, key, value)
        else:
            base[key] = value
    return SimpleNamespace(**base)


def test_supported_engine_passes():
    check_engine(_config())


@pytest.mark.parametrize("over,reason", [
    ({"model_config": SimpleNamespace(enforce_eager=False)}, "compiled graphs"),
    ({"speculative_config": object()}, "speculative decoding"),
    ({"pipeline_parallel_size": 2}, "pipeline parallel"),
    ({"data_parallel_size": 2}, "data parallel"),
    ({"enable_eplb": True}, "EPLB"),
    ({"compilation_config": SimpleNamespace(pass_config=SimpleNamespace(enable_sp=True))}, "sequence parallel"),
    ({"use_v2_model_runner": True}, "V2 model runner"),
])
def test_engine_settings_refused(over, reason):
    with pytest.raises(ValueError, match=reason):
        check_engine(_config(**over))


@pytest.mark.parametrize("arch,reason", [("DeepseekV3ForCausalLM", "MLA"), ("GptOssForCausalLM", "sinks"),
                                         ("LlamaForCausalLM", "untested")])
def test_families_refused_by_name(arch, reason):
    with pytest.raises(ValueError, match=reason):
        roe_name(arch)


def test_supported_names():
    assert roe_name("OlmoeForCausalLM") == "RoEOlmoeForCausalLM"
    assert roe_name("RoEQwen3MoeForCausalLM") == "RoEQwen3MoeForCausalLM"


def test_qwen3_moe_layer_count_skips_dense_layers():
    config = SimpleNamespace(architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=6, mlp_only_layers=[0, 5],
                             decoder_sparse_step=2, num_experts=8)
    assert num_moe_layers(config) == 2  # layers 1 and 3 (5 is dense)


def test_engine_defaults_validated():
    with pytest.raises(ValueError, match="unknown keys"):
        EngineSettings.parse({"roe": {"roster": 8}})
    with pytest.raises(ValueError, match="roster_size"):
        EngineSettings.parse({"roe": {"roster_size": 0}})
    with pytest.raises(ValueError, match="format"):
        EngineSettings.parse({"roe": {"schedules": {"x": {"tau": [0.1]}}}})
    assert not EngineSettings.parse({"roe": {"schedules": {"x": [0.1, 0.2]}}}).enabled
    assert EngineSettings.parse({"roe": {"roster_size": 4}}).enabled


def test_kernels_setting_is_a_switch_not_a_default():
    assert EngineSettings.parse(None).kernels and EngineSettings.parse({"roe": {"roster_size": 4}}).kernels
    off = EngineSettings.parse({"roe": {"kernels": False}})
    assert not off.kernels and not off.enabled and off.defaults == {}
    with pytest.raises(TypeError, match="kernels"):
        EngineSettings.parse({"roe": {"kernels": "no"}})


def test_request_settings_resolve_like_roe():
    engine = EngineSettings.parse({"roe": {"roster_size": 4, "tau": 0.2, "schedules": {"s": [0.0, 0.5, 0.0]}}})
    assert engine.roster(None, 3).tau_L == (0.0, 0.2, 0.0)
    assert engine.roster({"schedule": "s", "seed": 3}, 3).tau_L == (0.0, 0.5, 0.0)
    assert engine.roster({"roster_size": 1}, 3) is None
    assert engine.roster({"tau": [0.0, 0.0, 0.0]}, 3) is None
    assert EngineSettings.parse(None).roster(None, 3) is None
    with pytest.raises(ValueError, match="3 MoE layers"):
        check_request(engine, SimpleNamespace(extra_args={"tau": [0.1]}, prompt_logprobs=None), 3)
    with pytest.raises(ValueError, match="must be a number"):
        check_request(engine, SimpleNamespace(extra_args={"tau": "s"}, prompt_logprobs=None), 3)


def test_compiled_engine_refused_at_start(default_model):
    import roe_vllm
    from vllm import LLM

    args = roe_vllm.engine_args(default_model, dtype="float32", max_model_len=128)
    args["enforce_eager"] = False
    with pytest.raises(Exception, match="enforce_eager"):
        LLM(**args)


def test_roe_requests_never_run_plain_silently():
    """If the model does not read the batch (a stock architecture, or a broken link to its table), the
    logits processor stops the step instead of letting RoE requests come back plain."""
    import torch
    from roe_vllm.requests import RoERequests
    from vllm.v1.sample.logits_processor import BatchUpdate

    config = SimpleNamespace(additional_config={}, model_config=SimpleNamespace(model=None),
                             cache_config=SimpleNamespace())
    table = RoERequests(config, torch.device("cpu"), False)
    params = SimpleNamespace(extra_args={"roster_size": 4, "tau": 0.3})
    table.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, [1, 2], [])], moved=[]))
    logits = torch.zeros(1, 8)
    table.seen = True  # the model read the batch
    assert table.apply(logits) is logits
    with pytest.raises(RuntimeError, match="did not read"):
        table.apply(logits)  # next step: the model did not
