"""Tiny random-init causal LMs, one per supported architecture, built from a config in code."""

import torch
from transformers import AutoModelForCausalLM

# Small enough for CPU tests, but every architecture keeps its distinctive features:
# grouped-query attention, sliding windows, soft-capping, partial rotary, learned positions.
VOCAB = 128
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **SPECIAL_IDS)


def _llama_like(**extra):
    return dict(COMMON, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=128, **extra)


ARCHITECTURES = {
    "llama": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(head_dim=8),
    "mistral": _llama_like(sliding_window=8),
    "gemma2": _llama_like(
        head_dim=8,
        sliding_window=8,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
        query_pre_attn_scalar=8,
    ),
    "phi3": _llama_like(),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **SPECIAL_IDS),
    "gpt_neox": dict(COMMON, intermediate_size=64, max_position_embeddings=128, rotary_pct=0.5),
    "opt": dict(
        COMMON,
        ffn_dim=64,
        max_position_embeddings=128,
        word_embed_proj_dim=16,  # exercises project_in / project_out
    ),
}


def make_tiny_model(arch: str, seed: int = 0, attn_implementation: str | None = None):
    from transformers import AutoConfig

    torch.manual_seed(seed)
    kwargs = dict(ARCHITECTURES[arch])
    config = AutoConfig.for_model(arch, **kwargs)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_config(config, **extra)
    model.eval()
    return model


def random_batch(batch_size: int = 2, seq_len: int = 12, pad_last: int = 3, seed: int = 0):
    """Random ids with right padding on the last row, and labels with -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_last:
        attention_mask[-1, -pad_last:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels
