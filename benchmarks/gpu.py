"""GPU benchmark: tokens/s, peak CUDA memory and MFU of precompute and train, packed vs padded rows.

    python benchmarks/gpu.py [--ks 4 8] [--prompt 512] [--response 128] [--groups 32] [--step-groups 8]
                             [--steps 3] [--peak-tflops auto]

A ~1.2B Llama-3.2-1B-shaped model built from a config (hidden 2048, 16 layers, 32/8 GQA heads, MLP 8192,
vocabulary 128,256, tied embeddings; random init, nothing downloaded), in bf16 weights with fp32 master
weights for AdamW (stages/train/master.py): the tool's own GPU regime. Synthetic long-prompt groups (prompt --prompt tokens, k responses
of --response tokens). Measured with the tool's code at its GPU defaults, in one process:
  precompute   scoring.batched_logps, --batch-tokens 16384, three paths: padded (packed=False),
               pieces (packed=True, SDPA per bucket of pieces) and varlen (packed=True, torch's flash
               varlen kernel; its first call is checked against the pieces path, and the check's
               outcome is printed: if it fails, the varlen rows are the pieces path again)
  train step   step.gvpo_backward + clip + AdamW over --step-groups groups, --micro-batch-tokens 8192
               (the median of --steps steps after one warm-up step), the same three paths
tokens/s counts prompt + response tokens of every pair (the work as separate sequences). Peak memory is
torch.cuda.max_memory_allocated over the measurement. MFU = model FLOPs / (seconds × peak bf16 FLOP/s),
model FLOPs = 2 × body parameters × tokens the path feeds the body (padded: every pair's tokens; packed:
each prompt once) + 2 × d × V per response token (LM head) + causal attention 4 × L × d × (query, key)
pairs a separate-sequence computation needs; ×3 for a train step (forward + backward). The split-group
no-grad pass of the padded train step is extra work not counted. --peak-tflops auto: 989 for H100/H200
(dense bf16), 312 for A100; pass a number otherwise. Run with the `device` tool:
    python benchmarks/gpu.py
"""

from __future__ import annotations

import argparse
import statistics
import time

from shared_prompt import make_groups  # the same synthetic groups as the CPU benchmark

PATHS = ("padded", "pieces", "varlen")


def use_path(path: str) -> bool:
    """Set up one path; returns ``packed`` for the tool's functions."""
    from gvpo_offline.model import packing

    if path == "pieces":
        packing._VARLEN_CHECK["ok"] = False  # the bucket path only
    elif path == "varlen" and packing._VARLEN_CHECK.get("ok") is False:
        packing._VARLEN_CHECK.clear()  # back to the kernel (checked again on its first call)
    return path != "padded"


def build_model(device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=500_000.0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


def model_flops(model, prompts, responses, packed: bool) -> float:
    """Forward FLOPs of the work as defined in the module docstring."""
    cfg = model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    if packed:
        fed = sum(len(p) for p in {tuple(p) for p in prompts}) + sum(len(r) for r in responses)
    else:
        fed = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    response_tokens = sum(len(r) for r in responses)
    pairs = sum((n := len(p) + len(r)) * (n + 1) // 2 for p, r in zip(prompts, responses))
    return 2 * body * fed + 2 * d * vocab * response_tokens + 4 * layers * d * pairs


def peak_flops(name: str, override: str) -> float:
    if override != "auto":
        return float(override) * 1e12
    for key, tflops in (("H100", 989), ("H200", 989), ("A100", 312), ("L40", 362), ("A10", 125)):
        if key in name:
            return tflops * 1e12
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--groups", type=int, default=32, help="groups in the precompute stage")
    parser.add_argument("--step-groups", type=int, default=8, help="groups per train step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", default="auto")
    args = parser.parse_args()

    import torch

    from gvpo_offline.model import packing
    from gvpo_offline.model.scoring import batched_logps
    from gvpo_offline.stages.train.master import MasterWeights
    from gvpo_offline.stages.train.step import StepBatch, gvpo_backward

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name, args.peak_tflops)
    model = build_model(device).to(torch.bfloat16)  # the cache's weights dtype on a GPU, run in it
    vocab = model.config.vocab_size
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}; torch {torch.__version__}; model {params / 1e9:.2f}B params (bf16 weights, fp32 master weights); "
          f"attention {model.config._attn_implementation}; peak {peak / 1e12:.0f} TFLOP/s")
    header = f"{'stage':<11}{'k':>3}{'path':>8}{'tokens':>9}{'tok/s':>10}{'speed-up':>10}{'peak GiB':>10}{'MFU':>8}"
    print(header)
    for k in args.ks:
        prompts, responses, gids = make_groups(args.groups, k, args.prompt, args.response, vocab, seed=k)
        tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
        base = None
        for path in PATHS:  # precompute
            packed = use_path(path)
            batched_logps(model, prompts[:k], responses[:k], 16384, packed=packed)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            batched_logps(model, prompts, responses, 16384, packed=packed)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rate = tokens / seconds
            base = base or rate
            mfu = model_flops(model, prompts, responses, packed) / seconds / peak
            print(f"{'precompute':<11}{k:>3}{path:>8}{tokens:>9,}{rate:>10,.0f}"
                  f"{rate / base:>9.2f}x{torch.cuda.max_memory_allocated() / 2**30:>10.1f}{mfu:>8.1%}")

        n_step = args.step_groups * k
        g = torch.Generator().manual_seed(1)
        batch = StepBatch(prompts[:n_step], responses[:n_step],
                          rewards=torch.randn(n_step, generator=g, dtype=torch.float64),
                          ref_logps=-torch.rand(n_step, generator=g, dtype=torch.float64) * 30 - 10,
                          group_index=torch.tensor(gids[:n_step]), n_groups=args.step_groups)
        step_tokens = batch.tokens
        base = None
        for path in PATHS:  # train step
            packed = use_path(path)
            model.train(False)
            master = MasterWeights(list(model.parameters()))
            optimizer = torch.optim.AdamW(master.master, lr=1e-7)
            times = []
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            for step in range(args.steps + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                gvpo_backward(model, batch, 0.1, 8192, packed=packed)
                torch.nn.utils.clip_grad_norm_(master.master, 1.0)
                optimizer.step()
                master.to_model()
                torch.cuda.synchronize()
                if step:  # the first step is warm-up (allocates the optimizer state)
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rate = step_tokens / seconds
            base = base or rate
            mfu = 3 * model_flops(model, batch.prompt_ids, batch.response_ids, packed) / seconds / peak
            print(f"{'train step':<11}{k:>3}{path:>8}{step_tokens:>9,}{rate:>10,.0f}"
                  f"{rate / base:>9.2f}x{torch.cuda.max_memory_allocated() / 2**30:>10.1f}{mfu:>8.1%}")
            master.remove()
            del optimizer, master
    print(f"varlen kernel check: {packing._VARLEN_CHECK or 'not reached'}")


if __name__ == "__main__":
    main()
