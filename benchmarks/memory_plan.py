"""The training-state memory table of README "Multiple GPUs and nodes": computed, not measured.

    python benchmarks/memory_plan.py

Builds Llama 3.2 1B, Llama 2 7B and Llama 3 70B from their published configs on the meta device (no
weights, no download), counts their parameters and prints memory_plan.plan_for for 1, 8 and 16 GPUs:
fp32 master weights + fp32 gradients + AdamW moments (16 B/parameter) split over the ranks by FSDP,
plus one decoder layer gathered in bf16. Activations are not included (they depend on
--micro-batch-tokens and --gradient-checkpointing). Not a test.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from gvpo_offline.model.memory_plan import plan_for

MODELS = {  # published config.json values (hidden, intermediate, layers, heads, kv heads, vocab, tied)
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
GIB = 1 << 30


def main() -> None:
    print("| model | parameters | 1 GPU | 8 GPUs (1 node) | 16 GPUs (2 nodes) |")
    print("|---|---|---|---|---|")
    for name, kw in MODELS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**kw))
        params = sum(p.numel() for p in model.parameters())
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        cells = [f"{plan_for(params, layer, world, on_gpu=True).per_rank_bytes / GIB:,.1f} GiB" for world in (1, 8, 16)]
        print(f"| {name} | {params / 1e9:.2f} B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
