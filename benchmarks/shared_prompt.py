"""Benchmark: packed rows (each prompt once, no padding) against padded separate sequences.

    python benchmarks/shared_prompt.py [--ks 4 8] [--prompt 512] [--response 128] [--groups 2]
                                       [--step-groups 1] [--threads 1] [--repeat 2] [--device cpu]

Long-prompt groups (every prompt --prompt tokens, every response --response tokens, k responses) of
synthetic token ids, scored by a random-init Llama built from a config (default hidden 1024, 2 layers,
16/8 GQA heads, vocabulary 4,096: body/LM-head FLOPs per token ≈ 5.5, between Llama-3.2-1B's ≈ 3.7 and
Llama-3-8B's ≈ 13, and sequence length / hidden size as in a 1-3B model; a 32k-vocabulary toy body would
be dominated by the LM head, which both paths run on the same response positions). Both paths are the tool's own code at its CPU
defaults:
  precompute   scoring.batched_logps (what precompute-ref and eval run) over --groups groups,
               --batch-tokens 2048: packed=False (padded, length-bucketed) vs packed=True.
  train step   step.gvpo_backward + AdamW step over --step-groups groups, --micro-batch-tokens 2048:
               packed=False (a group over the budget is split: a no-grad pass for the weights, then
               micro-batches) vs packed=True (a k = 8 group of 512 + 8 × 128 tokens fits one pass).
tokens/s counts prompt + response tokens of every pair (the work as separate sequences), so the ratio
is the wall-clock speed-up. Each (k, stage, path) runs in a fresh spawned process (its peak RSS is its
own; "+MB" is the rise over the RSS after building the model and a warm-up); --repeat runs, interleaved,
the fastest counts; memory from one more process per path in which every tensor is its own mapping
(see run_one). Also prints max |Δ log p| between the paths. Not a test; ~5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def build_model(hidden: int, layers: int, vocab: int, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device).eval()


def make_groups(n_groups: int, k: int, prompt_len: int, response_len: int, vocab: int, seed: int):
    """(prompt_ids, response_ids, group index) of n_groups groups, pairs listed group by group."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts, responses, gids = [], [], []
    for j in range(n_groups):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        for _ in range(k):
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (response_len,), generator=g).tolist())
            gids.append(j)
    return prompts, responses, gids


def measure(stage: str, packed: bool, k: int, args: dict) -> dict:
    """In a fresh process: one stage with one path; seconds, tokens, peak RSS and the log-probs."""
    import torch

    from gvpo_offline.model.scoring import batched_logps
    from gvpo_offline.stages.train.step import StepBatch, gvpo_backward

    torch.set_num_threads(args["threads"])
    model = build_model(args["hidden"], args["layers"], args["vocab"], args["device"])
    n_groups = args["groups"] if stage == "precompute" else args["step_groups"]
    prompts, responses, gids = make_groups(n_groups, k, args["prompt"], args["response"], args["vocab"], seed=k)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    cuda = args["device"].startswith("cuda")
    if stage == "precompute":
        batched_logps(model, prompts[:2], [r[:8] for r in responses[:2]], 2048, packed=packed)  # warm-up
        rss = _rss_mb()
        start, cpu = time.perf_counter(), time.process_time()
        logps = batched_logps(model, prompts, responses, args["batch_tokens"], packed=packed).tolist()
    else:
        n = len(gids)
        g = torch.Generator().manual_seed(1)
        batch = StepBatch(prompts, responses, rewards=torch.randn(n, generator=g, dtype=torch.float64),
                          ref_logps=-torch.rand(n, generator=g, dtype=torch.float64) * 30 - 10,
                          group_index=torch.tensor(gids), n_groups=n_groups)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        rss = _rss_mb()
        start, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        stats = gvpo_backward(model, batch, 0.1, args["batch_tokens"], packed=packed)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        logps = [stats.loss]
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens, "peak_mb": peak, "delta_mb": peak - rss, "logps": logps}


def run_one(*args, memory: bool = False) -> dict:
    return spawn(measure, *args, memory=memory)


def spawn(fn, *args, memory: bool = False) -> dict:
    """``fn(*args)`` in a fresh process. ``memory``: with glibc's mmap threshold fixed at 64 KiB, so that
    every tensor is its own mapping, returned to the OS when freed: the peak RSS is then the peak of live
    memory rather than of what the allocator kept from earlier phases (model building, warm-up), which
    made RSS peaks of the same run differ by ±40 MB. Timings come from runs without it."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if memory:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        if memory and saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        elif memory:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--groups", type=int, default=2, help="groups scored in the precompute stage")
    parser.add_argument("--step-groups", type=int, default=1, help="groups in the train step")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="--batch-tokens / --micro-batch-tokens")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--repeat", type=int, default=2, help="fresh processes per measurement; fastest counts")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    load = os.getloadavg()
    table = Table(title=f"packed rows vs padded separate sequences: prompt {args.prompt}, responses "
                        f"{args.response}, Llama d={args.hidden} L={args.layers} V={args.vocab}, {args.device}, "
                        f"{args.threads} thread(s), load {load[0]:.1f}/{load[1]:.1f} at start")
    for col in ("stage", "k", "pairs", "tokens", "padded tok/s", "packed tok/s", "speed-up", "CPU-time ratio",
                "padded peak RSS", "packed peak RSS", "max |Δ|"):
        table.add_column(col, justify="right")
    options = vars(args)
    for k in args.ks:
        for stage in ("precompute", "train step"):
            res: dict[bool, dict] = {}
            for _ in range(args.repeat):
                for packed in (False, True):
                    out = run_one(stage, packed, k, options)
                    if packed not in res or out["seconds"] < res[packed]["seconds"]:
                        res[packed] = out
            mem = {packed: run_one(stage, packed, k, options, memory=True) for packed in (False, True)}
            padded, packed = res[False], res[True]
            rate = {p: r["tokens"] / r["seconds"] for p, r in res.items()}
            delta = max(abs(a - b) for a, b in zip(padded["logps"], packed["logps"]))
            pairs = k * (args.groups if stage == "precompute" else args.step_groups)
            table.add_row(
                stage, str(k), str(pairs), f"{padded['tokens']:,}", f"{rate[False]:,.0f}", f"{rate[True]:,.0f}",
                f"{rate[True] / rate[False]:.2f}x", f"{padded['cpu_seconds'] / packed['cpu_seconds']:.2f}x",
                f"{mem[False]['peak_mb']:,.0f} MB (+{mem[False]['delta_mb']:,.0f})",
                f"{mem[True]['peak_mb']:,.0f} MB (+{mem[True]['delta_mb']:,.0f})",
                f"{delta:.1e}" + (" (loss)" if stage == "train step" else ""),
            )
            console.print(f"done: k={k} {stage}", style="dim")
    console.print(table)
    console.print(f"load average at the end {os.getloadavg()[0]:.1f}. tokens = prompt + response tokens of "
                  "every pair (as separate sequences); speed-up = packed tok/s / padded tok/s, measured in "
                  "this run; CPU-time ratio = padded / packed process CPU seconds (with one thread, the work itself, "
                  "less sensitive to other processes on a loaded machine). The train step is gvpo_backward + "
                  "clipping + AdamW. Peak RSS (and its rise over the RSS after building the model and a warm-up) "
                  "from one more process per path with glibc's mmap threshold at 64 KiB (run_one).")


if __name__ == "__main__":
    main()
