"""Tiny causal LMs of any installed family, built from their config classes with small sizes (no hub)."""

from __future__ import annotations

import torch

VOCAB = 128
# Size fields of the config classes, by the many names they go by, and the tiny value for each.
TINY = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "n_embed", "dim", "embed_dim", "hidden_dim",
                     "embedding_size", "word_embed_proj_dim", "text_hidden_size"), 32),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "intermediate_dim", "ffn_hidden_size",
                     "decoder_ffn_dim", "dense_intermediate_size", "inner_hidden_size"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
                     "num_decoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
                     "num_key_value_groups"), 2),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_dim", "v_head_dim", "qk_nope_head_dim",
                     "qk_rope_head_dim", "mamba_d_head", "mamba_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim"), 8),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), 128),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "moe_k"), 2),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank", "mamba_d_ssm", "ssm_state_size", "state_size",
                     "mamba_d_state", "time_step_rank", "linear_num_key_heads", "linear_num_value_heads"), 8),
    "mamba_n_heads": 4,
    **dict.fromkeys(("n_group", "topk_group", "first_k_dense_replace", "n_shared_experts"), 1),
}


def tiny_config(config_cls, **extra):
    """A config of ``config_cls`` with every size field it has set small, vocabulary :data:`VOCAB`,
    special token ids inside it, per-layer lists cut to the layer count; ``extra`` on top."""
    default = config_cls()
    have = set(default.to_dict()) | set(getattr(config_cls, "attribute_map", {}))
    kwargs = {k: v for k, v in TINY.items() if k in have}
    kwargs["vocab_size"] = VOCAB
    layers_before = getattr(default, "num_hidden_layers", None)
    layers = kwargs.get("num_hidden_layers", 2)
    for key, value in default.to_dict().items():
        if key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            kwargs[key] = 1
        elif key.endswith("token_id") and isinstance(value, list):
            kwargs[key] = [v if v < VOCAB else 1 for v in value]
        elif isinstance(value, list) and layers_before and len(value) == layers_before and key not in kwargs:
            kwargs[key] = value[:layers]
    kwargs.update(extra)
    return config_cls(**kwargs)


MAX_PARAMETERS = 2_000_000


class TooLarge(Exception):
    """The config class kept a large size somewhere tiny_config does not know (e.g. a sub-config)."""


def tiny_model(config_cls, model_cls, seed: int = 0, **extra):
    """An eval-mode float32 ``model_cls`` of :func:`tiny_config`, weights drawn with ``seed``. Counted on
    the meta device first: raises :class:`TooLarge` above :data:`MAX_PARAMETERS` (never allocates it)."""
    config = tiny_config(config_cls, **extra)
    with torch.device("meta"):
        n = sum(p.numel() for p in model_cls(config).parameters())
    if n > MAX_PARAMETERS:
        raise TooLarge(f"{n / 1e6:.0f}M parameters after shrinking")
    torch.manual_seed(seed)
    return model_cls(config).float().eval()
