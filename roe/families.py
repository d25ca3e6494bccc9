"""Tiny random-weight configs for every router-based MoE causal-LM family in transformers 5.23.

Every entry of ``FAMILIES`` returns a fresh config with >= 2 MoE layers, hidden 64, 4 heads
(2 KV heads where the attention allows it), vocab 128, 8 experts, top-2 (Zaya: top-1, its
config refuses anything else), small intermediate sizes and max_position_embeddings 256.
Families whose default layer schedule starts with dense layers (DeepSeek ``first_k_dense_replace``,
``mlp_layer_types``, ``num_dense_layers``, ...) are switched to MoE on every layer; hybrids get
one layer of each attention kind (sliding + full, linear + full, mamba + attention, ...).

``build(name)`` seeds torch, builds the model in fp32 with ``AutoModelForCausalLM.from_config``
(direct class for the few families missing from the auto mapping) and returns it in eval mode.
Router weights that ``_init_weights`` leaves at exactly zero (AfMoE) are re-drawn N(0, 0.02) so
routing is not decided by ties. Every routing-bias tensor (``e_score_correction_bias``, also
Ernie's ``moe_statics``; ``expert_bias``; Zaya's ``balancing_biases``) gets N(0, 0.1) added, so the
bias path of each rule is really exercised (they initialise to zeros).

Run ``python -m roe.families`` to build every family, check the router count, run a forward on
(2, 7) input ids and ``generate(max_new_tokens=3, do_sample=False)``.

The configs are built lazily (inside the lambdas), so importing this module is cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig

VOCAB = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
EXPERTS = 8
TOP_K = 2
MOE_INTER = 32
INTER = 64
MAX_POS = 256
WINDOW = 16

# Token ids inside the tiny vocab (many configs default to ids >= 100k).
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _cls(name: str, module: str | None = None):
    if module is not None:
        return getattr(importlib.import_module(f"transformers.models.{module}"), name)
    return getattr(transformers, name)


def _attn(**overrides) -> dict:
    """Common dense-attention kwargs."""
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        **TOKENS,
    )
    kw.update(overrides)
    return kw


def _mla(**overrides) -> dict:
    """DeepSeek-style multi-head latent attention (one KV head per query head)."""
    kw = _attn(
        num_key_value_heads=HEADS,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    )
    kw.update(overrides)
    return kw


def _dsv3_moe(**overrides) -> dict:
    """DeepSeek-V3-style routed + shared experts."""
    kw = dict(
        intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER,
        n_routed_experts=EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=TOP_K,
    )
    kw.update(overrides)
    return kw


SPARSE2 = ["sparse", "sparse"]


FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    # ----------------------------------------------------------------- softmax -> topk family
    "olmoe": lambda: _cls("OlmoeConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=False,
    ),
    "flex_olmo": lambda: _cls("FlexOlmoConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=False,
    ),
    "mixtral": lambda: _cls("MixtralConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "minimax": lambda: _cls("MiniMaxConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, block_size=16,
        layer_types=["full_attention", "linear_attention"],
    ),
    "qwen2_moe": lambda: _cls("Qwen2MoeConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=INTER, moe_intermediate_size=MOE_INTER,
        shared_expert_intermediate_size=MOE_INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        norm_topk_prob=False,
    ),
    "qwen3_moe": lambda: _cls("Qwen3MoeConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
    ),
    "qwen3_next": lambda: _cls("Qwen3NextConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        moe_intermediate_size=MOE_INTER, shared_expert_intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True,
    ),
    "qwen3_5_moe": lambda: _cls("Qwen3_5MoeTextConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        moe_intermediate_size=MOE_INTER, shared_expert_intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "qwen4_exp": lambda: _cls("Qwen4ExpTextConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2,
        layer_types=["linear_attention", "indexed_attention"],
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        moe_intermediate_size=MOE_INTER, shared_expert_intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, hc_count=2, hc_lowrank=8,
        # "indexed_attention" layers need the QSA indexer fields (only linear/indexed layers are allowed)
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4,
    ),
    "mellum": lambda: _cls("MellumConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW, mlp_layer_types=SPARSE2,
        moe_intermediate_size=MOE_INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "hunyuan_v1_moe": lambda: _cls("HunYuanMoEV1Config")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_experts=EXPERTS, moe_topk=TOP_K,
    ),
    "jamba": lambda: _cls("JambaConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, use_mamba_kernels=False, mamba_d_state=8,
    ),
    "gemma4": lambda: _cls("Gemma4TextConfig")(
        **_attn(), head_dim=HEAD_DIM, global_head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW,
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
        enable_moe_block=True, num_experts=EXPERTS, top_k_experts=TOP_K, moe_intermediate_size=MOE_INTER,
    ),
    "ernie4_5_moe": lambda: _cls("Ernie4_5_MoeConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=INTER, moe_intermediate_size=MOE_INTER,
        moe_num_experts=EXPERTS, moe_k=TOP_K, moe_num_shared_experts=1, moe_layer_start_index=0,
    ),
    "dbrx": lambda: _cls("DbrxConfig")(
        d_model=HIDDEN, n_heads=HEADS, n_layers=2, max_seq_len=MAX_POS, vocab_size=VOCAB, **TOKENS,
        # DbrxAttention reads attn_config.rope_theta (undeclared in DbrxAttentionConfig, 5.23) and clamps with clip_qkv
        attn_config={"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},  # clip_qkv=None crashes clamp()
        ffn_config={"ffn_hidden_size": MOE_INTER, "moe_num_experts": EXPERTS, "moe_top_k": TOP_K},
    ),
    # ----------------------------------------------------------------- topk -> softmax family
    "gpt_oss": lambda: _cls("GptOssConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, sliding_window=WINDOW,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 2.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128},
    ),
    "granitemoe": lambda: _cls("GraniteMoeConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "granitemoeshared": lambda: _cls("GraniteMoeSharedConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER, shared_intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "granitemoe_swa": lambda: _cls("GraniteMoeSWAConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER, shared_intermediate_size=MOE_INTER,
        layer_types=["full_attention", "sliding_attention"], sliding_window=WINDOW,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "granitemoehybrid": lambda: _cls("GraniteMoeHybridConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER, shared_intermediate_size=MOE_INTER,
        layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=16,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "jetmoe": lambda: _cls("JetMoeConfig")(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_key_value_heads=KV_HEADS, kv_channels=HEAD_DIM,
        num_hidden_layers=2, intermediate_size=MOE_INTER, max_position_embeddings=MAX_POS,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, **TOKENS,
    ),  # num_attention_heads is derived: kv_heads * top_k = 4
    "aria": lambda: _cls("AriaTextConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER,
        moe_num_experts=EXPERTS, moe_topk=TOP_K, moe_num_shared_experts=1,
    ),
    "cohere2_moe": lambda: _cls("Cohere2MoeConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=MOE_INTER,
        sliding_window=WINDOW, sliding_window_pattern=2, num_shared_experts=1,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, expert_selection_fn="softmax",
    ),
    "llama4": lambda: _cls("Llama4TextConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=MOE_INTER, intermediate_size_mlp=INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, interleave_moe_layer_step=1,
        no_rope_layer_interval=2, attention_chunk_size=WINDOW,
    ),
    # ----------------------------------------------------------------- PhiMoE sparsemixer
    "phimoe": lambda: _cls("PhimoeConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    # ----------------------------------------------------------------- softmax + group limited (DeepSeek-V2 family)
    "deepseek_v2": lambda: _cls("DeepseekV2Config")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, first_k_dense_replace=0,
        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.0,
    ),
    "mistral4": lambda: _cls("Mistral4Config")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, first_k_dense_replace=0, n_group=2, topk_group=1,
    ),  # keep the default YaRN rope: the "default" rope ignores partial_rotary_factor and breaks MLA shapes
    "longcat_flash": lambda: _cls("LongcatFlashConfig")(
        **_mla(), head_dim=8, num_layers=2, ffn_hidden_size=INTER, expert_ffn_hidden_size=MOE_INTER,
        n_routed_experts=EXPERTS, moe_topk=TOP_K, zero_expert_num=2, routed_scaling_factor=1.0,
    ),
    # ----------------------------------------------------------------- sigmoid + bias (+ groups), DeepSeek-V3 family
    "deepseek_v3": lambda: _cls("DeepseekV3Config")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, first_k_dense_replace=0, n_group=2, topk_group=1,
    ),
    "deepseek_v32": lambda: _cls("DeepseekV32Config")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, first_k_dense_replace=0, n_group=2, topk_group=1,
        index_topk=4, index_head_dim=16, index_n_heads=2,
    ),
    "glm_moe_dsa": lambda: _cls("GlmMoeDsaConfig")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, first_k_dense_replace=0, n_group=1, topk_group=1,
        index_topk=4, index_head_dim=16, index_n_heads=2,
    ),
    "axk1": lambda: _cls("AXK1Config")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, mlp_layer_types=SPARSE2, n_group=2, topk_group=1,
    ),
    "axk2": lambda: _cls("AXK2Config")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, mlp_layer_types=SPARSE2, n_group=2, topk_group=1,
        index_topk=4, index_head_dim=16, index_n_heads=2, gated_norm_rank=4,
    ),
    "glm4_moe": lambda: _cls("Glm4MoeConfig")(
        **_attn(), head_dim=HEAD_DIM, **_dsv3_moe(), num_hidden_layers=2, first_k_dense_replace=0,
        n_group=1, topk_group=1, num_mtp_layers=0,
    ),
    "glm4_moe_lite": lambda: _cls("Glm4MoeLiteConfig")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, mlp_layer_types=SPARSE2,
    ),
    "dots1": lambda: _cls("Dots1Config")(
        **_attn(), head_dim=HEAD_DIM, **_dsv3_moe(), num_hidden_layers=2, first_k_dense_replace=0,
        sliding_window=WINDOW, max_window_layers=1,
    ),
    "dots3_note": lambda: _cls("Dots3NoteTextConfig")(
        **_mla(), head_dim=HEAD_DIM, **_dsv3_moe(shared_experts_intermediate_size=MOE_INTER),
        num_hidden_layers=2, mlp_layer_types=SPARSE2, n_group=2, topk_group=1,
        index_topk=4, index_head_dim=16, index_n_heads=2,
    ),
    "exaone_moe": lambda: _cls("ExaoneMoeConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        num_shared_experts=1, first_k_dense_replace=0, sliding_window=WINDOW, sliding_window_pattern=2,
    ),
    "hy_v4": lambda: _cls("HYV4Config")(
        **_mla(), **_dsv3_moe(), num_hidden_layers=2, mlp_layer_types=SPARSE2,
        index_topk=4, index_head_dim=16, index_n_heads=2,
    ),
    "kimi_linear": lambda: _cls("KimiLinearConfig")(
        **_mla(q_lora_rank=None), intermediate_size=INTER, moe_intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K,
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], mlp_layer_types=SPARSE2,
        linear_head_dim=16, linear_num_heads=HEADS,
    ),
    "bailing_hybrid": lambda: _cls("BailingHybridConfig")(
        **_mla(), head_dim=HEAD_DIM, intermediate_size=INTER, moe_intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K, n_group=2, topk_group=1,
        num_hidden_layers=2, layer_group_size=2, first_k_dense_replace=0, num_mtp_layers=0,
    ),
    "mimo_v2_flash": lambda: _cls("MiMoV2FlashConfig")(
        **_attn(), head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
        num_hidden_layers=2, mlp_layer_types=SPARSE2, sliding_window=WINDOW,
    ),
    "nemotron_h": lambda: _cls("NemotronHConfig")(
        **_attn(), head_dim=HEAD_DIM, intermediate_size=INTER,
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"], num_hidden_layers=4,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
        use_mamba_kernels=False, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
        moe_intermediate_size=MOE_INTER, moe_shared_expert_intermediate_size=MOE_INTER,
    ),
    "solar_open": lambda: _cls("SolarOpenConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, moe_intermediate_size=MOE_INTER,
        n_routed_experts=EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K,
    ),
    "beam": lambda: _cls("BeamConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        mlp_layer_types=SPARSE2, sliding_window=WINDOW, n_group=2, topk_group=1,
    ),
    # ----------------------------------------------------------------- sigmoid + bias, no groups
    "minimax_m2": lambda: _cls("MiniMaxM2Config")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=MOE_INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "minimax_m3_vl": lambda: _cls("MiniMaxM3VLTextConfig")(
        **_attn(), head_dim=HEAD_DIM, rotary_dim=8, num_hidden_layers=2, intermediate_size=MOE_INTER,
        shared_intermediate_size=MOE_INTER, dense_intermediate_size=INTER,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, mlp_layer_types=SPARSE2,
        index_n_heads=2, index_head_dim=16, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
    ),
    "hy_v3": lambda: _cls("HYV3Config")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K, num_shared_experts=1,
        mlp_layer_types=SPARSE2,
    ),
    "afmoe": lambda: _cls("AfmoeConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER, num_dense_layers=0, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        num_shared_experts=1, global_attn_every_n_layers=2, sliding_window=WINDOW,
    ),
    "lfm2_moe": lambda: _cls("Lfm2MoeConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=INTER, moe_intermediate_size=MOE_INTER,
        num_dense_layers=0, num_experts=EXPERTS, num_experts_per_tok=TOP_K, layer_types=["conv", "full_attention"],
    ),
    "laguna": lambda: _cls("LagunaConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER, shared_expert_intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, mlp_layer_types=SPARSE2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW,
    ),
    "deepseek_v4": lambda: _cls("DeepseekV4Config")(
        **_attn(num_key_value_heads=1), head_dim=HEAD_DIM, q_lora_rank=32, num_hidden_layers=3,
        moe_intermediate_size=MOE_INTER, n_routed_experts=EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K,
        # one hash-routed layer (DeepseekV4HashRouter, NOT in _can_record_outputs) + two learned-router layers
        mlp_layer_types=["hash_moe", "moe", "moe"], sliding_window=WINDOW, o_groups=2, o_lora_rank=16,
        index_n_heads=2, index_head_dim=16, index_topk=4, num_nextn_predict_layers=0,
    ),
    "inkling2": lambda: _cls("Inkling2TextConfig")(
        **_attn(), head_dim=HEAD_DIM, swa_num_attention_heads=HEADS, swa_num_key_value_heads=KV_HEADS,
        swa_head_dim=HEAD_DIM, sliding_window_size=WINDOW, unpadded_vocab_size=VOCAB,
        num_hidden_layers=2, layer_types=["hybrid_sliding", "hybrid"], moe_intermediate_size=MOE_INTER,
        n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
    ),
    "inkling": lambda: _cls("InklingTextConfig")(
        **_attn(), head_dim=HEAD_DIM, swa_num_attention_heads=HEADS, swa_num_key_value_heads=KV_HEADS,
        swa_head_dim=HEAD_DIM, sliding_window_size=WINDOW,
        num_hidden_layers=2, local_layer_ids=[0], intermediate_size=INTER, moe_intermediate_size=MOE_INTER,
        n_routed_experts=EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K,
    ),
    "flint": lambda: _cls("FlintConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, intermediate_size=INTER,
        moe_intermediate_size=MOE_INTER, shared_expert_intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, mlp_only_layers=[],
        layer_types=["full_attention", "sliding_attention"], sliding_window=WINDOW,
    ),
    "kolibri1": lambda: _cls("Kolibri1Config")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2,
        moe_intermediate_size=MOE_INTER, shared_expert_intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW,
    ),
    "zaya": lambda: _cls("ZayaConfig")(
        **_attn(), head_dim=HEAD_DIM, num_hidden_layers=2, moe_intermediate_size=MOE_INTER,
        num_experts=EXPERTS, num_experts_per_tok=1, router_hidden_size=16,
    ),  # ZayaConfig.validate_architecture: num_experts_per_tok must be 1
    # ----------------------------------------------------------------- product keys, refused (roe/adapters/locality.py)
    "doge": lambda: _cls("DogeConfig")(
        **_attn(), num_hidden_layers=2, intermediate_size=INTER,
        is_moe=True, num_experts=16, num_experts_per_tok=TOP_K,
    ),  # 16 = 4 x 4 product keys (keys = floor(sqrt(experts)): with 8 only 2 x 2 experts are reachable)
}


# Families that AutoModelForCausalLM cannot build from their config (missing from the auto mapping).
DIRECT_CLASS: dict[str, tuple[str, str]] = {
    "mistral4": ("Mistral4ForCausalLM", "mistral4.modeling_mistral4"),
}


def causal_lm_class(name: str):
    if name in DIRECT_CLASS:
        cls, module = DIRECT_CLASS[name]
        return getattr(importlib.import_module(f"transformers.models.{module}"), cls)
    return None


def build(name: str, seed: int = 0):
    """Seeded tiny fp32 model in eval mode (sdpa attention where supported, else eager)."""
    cfg = FAMILIES[name]()
    torch.manual_seed(seed)
    direct = causal_lm_class(name)
    last_err = None
    for impl in ("sdpa", "eager"):
        cfg._attn_implementation = impl
        try:
            if direct is not None:
                model = direct._from_config(cfg, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            _redraw_zero_router_weights(model)
            _perturb_routing_biases(model)
            return model.eval()
        except (ValueError, NotImplementedError) as err:  # sdpa not supported -> eager
            last_err = err
            torch.manual_seed(seed)
    raise last_err


def _redraw_zero_router_weights(model, std: float = 0.02) -> None:
    """AfMoE's _init_weights zero-fills AfmoeTokenChoiceRouter.gate.weight: every logit is 0 and top-k
    is decided by ties. Re-draw any all-zero 2-D router weight N(0, std) (deterministic under the seed)."""
    with torch.no_grad():
        for _, mod, _ in router_modules(model):
            for pname, p in mod.named_parameters():
                if pname.endswith("weight") and p.dim() == 2 and not p.any():
                    p.normal_(0.0, std)


BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "balancing_biases")


def _perturb_routing_biases(model, std: float = 0.1) -> None:
    """Add N(0, std) to every routing-bias buffer or parameter (all zeros at init; Zaya's skip class -1)."""
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.rsplit(".", 1)[-1] in BIAS_NAMES:
                tensor.add_(torch.randn(tensor.shape, dtype=torch.float32).to(tensor.dtype) * std)


def router_modules(model) -> list[tuple[str, torch.nn.Module, int]]:
    """(qualified name, module, output index) of every module the model records as router_logits."""
    found = []
    targets = []
    for sub in model.modules():
        rec = getattr(type(sub), "_can_record_outputs", None) or {}
        spec = rec.get("router_logits")
        if spec is None:
            continue
        for s in spec if isinstance(spec, (list, tuple)) else [spec]:
            tc = getattr(s, "target_class", s)
            targets.append((tc, getattr(s, "index", 0)))
    for mname, mod in model.named_modules():
        for tc, idx in targets:
            if isinstance(tc, type) and isinstance(mod, tc):
                found.append((mname, mod, idx))
                break
    return found


def _smoke(names=None) -> int:
    import time
    import warnings

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    # NOTE: one thread: on matmuls this tiny, intra-op threads on a busy machine cost far more than they save.
    torch.set_num_threads(1)
    failures = 0
    total = time.perf_counter()
    for name in names or FAMILIES:
        t0 = time.perf_counter()
        try:
            model = build(name)
            routers = router_modules(model)
            ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                out = model(input_ids=ids)
                assert out.logits.shape == (2, 7, VOCAB), out.logits.shape
                assert torch.isfinite(out.logits).all()
                gen = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
            assert gen.shape == (2, 10), gen.shape
            n_params = sum(p.numel() for p in model.parameters())
            kinds = sorted({type(m).__name__ for _, m, _ in routers})
            status = "ok" if len(routers) >= 2 else "FEW-ROUTERS"
            failures += status != "ok"
            print(f"{name:18s} {status:11s} {type(model).__name__:30s} attn={model.config._attn_implementation:5s} "
                  f"routers={len(routers)} {kinds} params={n_params/1e6:.2f}M {time.perf_counter()-t0:.2f}s")
        except Exception as err:  # noqa: BLE001
            failures += 1
            print(f"{name:18s} FAIL        {type(err).__name__}: {str(err)[:300]}")
    print(f"{len(names or FAMILIES)} families, {failures} failures, {time.perf_counter()-total:.1f}s")
    return failures


if __name__ == "__main__":
    import sys

    raise SystemExit(1 if _smoke(sys.argv[1:] or None) else 0)
