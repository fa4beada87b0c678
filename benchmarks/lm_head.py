"""Benchmark: the LM-head path of a train step, old (checkpointed log-softmax) vs recompute vs narrow vs new.

    python benchmarks/lm_head.py [--vocab 32000] [--hidden 384] [--steps 3] [--groups 4] [--k 4] [--threads 1]

One train step = step.gvpo_backward (padded micro-batches, one pass) + AdamW, on a random-init Llama (2 layers,
untied head, --hidden, --vocab) and synthetic groups (prompts 16..64 tokens, responses 32..192, k per group;
benchmarks/train.make_batch). Each variant runs in its own spawned process (one warm-up step, then --steps
timed steps), so its peak RSS and CPU times are its own:

old:       what the code did before: per chunk of 32M logits (1048 rows at vocab 32k), log_softmax(lm_head(h))
           then gather, under activation checkpointing (the chunk recomputed in backward, then log-softmax's backward).
recompute: lm_head.target_logps with GVPO_OFFLINE_LM_HEAD_KEEP_MIB=0: target logit − logsumexp in one reused
           buffer of ≤ 30 MiB, backward recomputes the chunk's logits (one matmul) and forms softmax − one-hot in place.
narrow:    kept exp(z − max) chunks as below, but in chunks of ≤ 30 MiB (245 rows at vocab 32k) and with backward
           writing ∂L/∂z into a separate [rows, V] buffer (the defaults before chunks were widened).
new:       lm_head.target_logps as it runs by default in the stages: the forward's exp(z − max) chunks kept for
           backward within lm_head.CPU_KEEP_BYTES (no logits matmul in backward), chunks of ≤ 128 MiB (1,048 rows
           at vocab 32k) since the heap keeps freed blocks, and backward writing ∂L/∂z into the kept chunk itself.

Every variant runs after runtime/memory.keep_freed_memory(), as the train stage does.

Prints per variant: seconds per step (wall), CPU seconds per step (user + system, and each), peak RSS; then new/old
and new/recompute ratios. Also checks that all give the same log-probs and gradients (max relative difference).
Not a test.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("old", "recompute", "narrow", "new")


def old_target_logps(hidden, weight, bias, targets, transform, chunk=None):
    """The pre-lmhead path, kept here for comparison: checkpointed log-softmax per 32M-logit chunk."""
    import torch
    from torch.utils.checkpoint import checkpoint

    chunk = max(1, min(4096, (1 << 25) // weight.shape[0]))

    def piece(h, t):
        logits = torch.nn.functional.linear(h, weight, bias).float() * transform.scale
        if transform.softcap:
            logits = torch.tanh(logits / transform.softcap) * transform.softcap
        return torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1)

    out = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        grad = torch.is_grad_enabled() and h.requires_grad
        out.append(checkpoint(piece, h, t, use_reentrant=False) if grad else piece(h, t))
    return torch.cat(out)


def run(variant: str, model_dir: str, args: dict) -> dict:
    import torch

    torch.set_num_threads(args["threads"])
    from train import make_batch
    from transformers import LlamaForCausalLM

    from gvpo_offline.model import lm_head, logprobs
    from gvpo_offline.stages.train.step import gvpo_backward

    if variant == "old":
        logprobs.target_logps = old_target_logps
    from gvpo_offline.runtime import memory

    memory.keep_freed_memory()
    if variant == "recompute":
        os.environ[lm_head.KEEP_ENV] = "0"
    if variant in ("old", "recompute", "narrow"):
        lm_head.CPU_CHUNK_BYTES = lm_head.CPU_MMAP_CHUNK_BYTES
    if variant == "narrow":
        lm_head._graph_kept = lambda: True  # backward into a separate buffer, as before
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = make_batch(args["groups"], args["k"], seed=0)

    def step():
        gvpo_backward(model, batch, 0.1, 1 << 20)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # same values: log-probs and the gradients of Σ w·log π (before any optimizer step)
    prompts, responses = batch.prompt_ids[:4], batch.response_ids[:4]
    logps = logprobs.sequence_logps(model, prompts, responses)
    (logps * torch.tensor([0.5, -1.0, 0.3, 0.8])).sum().backward()
    head_grad = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    step()  # warm-up
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args["steps"]):
        step()
    wall, usage = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    n = args["steps"]
    return {"variant": variant, "s/step": wall / n, "user/step": (usage.ru_utime - usage0.ru_utime) / n,
            "sys/step": (usage.ru_stime - usage0.ru_stime) / n, "peak RSS MiB": usage.ru_maxrss / 1024,
            "logps": logps.detach(), "head_grad": head_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = vars(parser.parse_args())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        h = args["hidden"]
        cfg = LlamaConfig(vocab_size=args["vocab"], hidden_size=h, intermediate_size=int(h * 8 / 3), num_hidden_layers=2,
                          num_attention_heads=h // 64, num_key_value_heads=h // 64, max_position_embeddings=512,
                          tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        rows = []
        for variant in VARIANTS * 2:  # alternated, twice: drift on a shared machine shows
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                rows.append(pool.submit(run, variant, tmp, args).result())
    print(f"vocab {args['vocab']}, hidden {h}, 2 layers, {args['groups']} groups × k={args['k']}, "
          f"{args['threads']} thread(s), {args['steps']} timed steps")
    for r in rows:
        r["CPU/step"] = r["user/step"] + r["sys/step"]  # the headline: wall time is noisy on a shared machine
    keys = ("s/step", "CPU/step", "user/step", "sys/step", "peak RSS MiB")
    print(f"{'variant':8}" + "".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(f"{r['variant']:8}" + "".join(f"{r[k]:14.3f}" for k in keys))
    best = {v: {k: min(r[k] for r in rows if r["variant"] == v) for k in keys} for v in VARIANTS}
    for base in ("old", "recompute", "narrow"):
        print(f"new/{base} (best of 2)".ljust(8) + "".join(f"{best['new'][k] / best[base][k]:14.3f}" for k in keys))
    old = rows[0]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    for r in rows[1 : len(VARIANTS)]:
        print(f"same values, {r['variant']} vs old: log-probs max rel diff {rel(r['logps'], old['logps']):.2e}, "
              f"LM-head weight gradient max rel diff {rel(r['head_grad'], old['head_grad']):.2e}")


if __name__ == "__main__":
    main()
