"""Benchmark: our GVPO train step against a naive one, on two models.

    python benchmarks/train.py [--steps 3] [--groups-per-step 8] [--k 4] [--threads N] [--device cpu]
                               [--lora-r 16] [--only-lora]

ours:   step.gvpo_backward (length-bucketed micro-batches under --micro-batch-tokens, LM head only on
        response positions, chunked and checkpointed; exact split-group weights when a step does not fit)
        + gradient clipping + AdamW step: what one `gvpo-offline train` step does. Run twice: with the
        default --micro-batch-tokens 8192 (the step fits: one pass) and with --small-budget 1024 (every
        step is split: a no-grad pass for the weights, then forward/backward per micro-batch).
naive:  per group, one forward/backward: model(...).logits for every position [k, T, vocab],
        log_softmax over all of it, gather + sum the response tokens, gvpo_loss / G, backward; then the
        same clipping and AdamW step (what one writes first with plain transformers).
ours + LoRA: the same step as "ours" (default budget) on a peft LoRA adapter (rank --lora-r, all linear
        layers but the LM head, α = r) over the frozen float32 model: what `train --lora-r R` does; its
        rows also give time and step RSS as a ratio to full fine-tuning ("ours") on the same groups.
Models: sample_data/stories260K (vocab 512) and a random-init Llama with a 128,256-token vocabulary and a
small body (hidden 64, 2 layers, untied head), saved to a temp dir. Same synthetic token ids for both
(prompts 16..64 tokens, responses 32..192 tokens, k per group). Every (model, method) runs in a fresh
spawned process, so its peak RSS is its own: one warm-up step, then --steps timed steps.
tokens/s = prompt + response tokens per second (unpadded); peak RSS is the process high-water mark and
"step RSS" is that minus the RSS before the first step (what the train step itself adds). Not a test.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "sample_data" / "stories260K"


def make_wide_llama(path: Path, vocab: int = 128_256) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)


def make_batch(groups: int, k: int, seed: int):
    """A StepBatch of synthetic token ids < 512 (valid for both models)."""
    import torch

    from gvpo_offline.stages.train.step import StepBatch

    g = torch.Generator().manual_seed(seed)
    prompts, responses, gids = [], [], []
    for j in range(groups):
        prompt = torch.randint(3, 512, (int(torch.randint(16, 65, (1,), generator=g)),), generator=g).tolist()
        for _ in range(k):
            n = int(torch.randint(32, 193, (1,), generator=g))
            prompts.append(prompt)
            responses.append(torch.randint(3, 512, (n,), generator=g).tolist())
            gids.append(j)
    n = len(gids)
    return StepBatch(prompts, responses, rewards=torch.randn(n, generator=g, dtype=torch.float64),
                     ref_logps=-300 - 10 * torch.rand(n, generator=g, dtype=torch.float64),
                     group_index=torch.tensor(gids), n_groups=groups)


def naive_backward(model, batch, beta: float) -> float:
    """One forward/backward per group over the full logits; returns the step's loss."""
    import torch

    from gvpo_offline.math.loss import gvpo_loss

    device = next(model.parameters()).device
    total = 0.0
    for j in range(batch.n_groups):
        rows = (batch.group_index == j).nonzero().flatten().tolist()
        seqs = [batch.prompt_ids[i] + batch.response_ids[i] for i in rows]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # [k, T, vocab]
        seq_logps = []
        for b, i in enumerate(rows):
            p, r = len(batch.prompt_ids[i]), torch.tensor(batch.response_ids[i], device=device)
            seq_logps.append(logp[b, p - 1 : p - 1 + len(r)].gather(-1, r[:, None]).sum())
        ref, rew = batch.ref_logps[rows].to(device), batch.rewards[rows].to(device)
        loss = gvpo_loss(torch.stack(seq_logps), ref, rew, torch.zeros(len(rows), dtype=torch.long), beta)
        (loss / batch.n_groups).backward()
        total += loss.item() / batch.n_groups
    return total


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(model_path: str, method: str, args: dict) -> dict:
    """Runs in a fresh process: load, one warm-up step, ``steps`` timed steps."""
    import torch

    from gvpo_offline.model.loading import load_model
    from gvpo_offline.stages.train.recipe import _clip
    from gvpo_offline.stages.train.step import gvpo_backward

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    model = load_model(model_path, device, torch.float32)
    if args.get("lora_r"):
        from gvpo_offline.model.adapters import LoraSettings, add_lora

        model = add_lora(model, LoraSettings(r=args["lora_r"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    batches = [make_batch(args["groups"], args["k"], seed) for seed in range(args["steps"] + 1)]
    rss_before = _rss_now_mib()

    def step(batch) -> float:
        optimizer.zero_grad(set_to_none=True)
        if method.startswith("ours"):
            loss = gvpo_backward(model, batch, 0.1, args["micro_batch_tokens"], args["chunk_tokens"]).loss
        else:
            loss = naive_backward(model, batch, 0.1)
        _clip(params, 1.0)
        optimizer.step()
        return loss

    first_loss = step(batches[0])
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"trainable": sum(p.numel() for p in params), "tok_s": batches[1].tokens / seconds, "seconds": seconds, "tokens": batches[1].tokens,
            "peak_mib": peak, "step_mib": peak - rss_before, "first_loss": first_loss}


def run_fresh(model_path: str, method: str, args: dict) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, model_path, method, args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups-per-step", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="LM-head chunk (default: logprobs.logits_chunk_for(vocab))")
    parser.add_argument("--small-budget", type=int, default=1024, help="--micro-batch-tokens of the 3rd variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora-r", type=int, default=16, help="rank of the LoRA rows")
    parser.add_argument("--only-lora", action="store_true", help="only full fine-tuning ('ours') and LoRA rows")
    ns = parser.parse_args()
    args = {"steps": ns.steps, "groups": ns.groups_per_step, "k": ns.k, "micro_batch_tokens": ns.micro_batch_tokens,
            "chunk_tokens": ns.chunk_tokens, "threads": ns.threads, "device": ns.device}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GVPO train step: {ns.groups_per_step} groups × k={ns.k}, {ns.device}, "
                        f"threads={ns.threads or 'default'}, median of {ns.steps} steps")
    for col in ("model", "method", "trainable params", "tokens/step", "s/step", "tokens/s", "peak RSS MiB",
                "step RSS MiB", "speed ×", "step RSS ×", "s/step ÷ full FT", "step RSS ÷ full FT", "loss@0"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        wide = Path(tmp) / "wide-llama"
        make_wide_llama(wide)
        for name, path in (("stories260K (V=512)", STORIES), ("wide Llama (V=128,256)", wide)):
            res = {} if ns.only_lora else {"naive": run_fresh(str(path), "naive", args)}
            res["ours"] = run_fresh(str(path), "ours", args)
            if not ns.only_lora:
                res[f"ours, {ns.small_budget} tok"] = run_fresh(str(path), "ours", {**args, "micro_batch_tokens": ns.small_budget})
            res[f"ours + LoRA r={ns.lora_r}"] = run_fresh(str(path), "ours", {**args, "lora_r": ns.lora_r})
            full = res["ours"]
            for m, r in res.items():
                base = res.get("naive", full)
                lora = "LoRA" in m
                table.add_row(name, m, f"{r['trainable']:,}", f"{r['tokens']:,}", f"{r['seconds']:.3f}",
                              f"{r['tok_s']:,.0f}", f"{r['peak_mib']:,.0f}", f"{r['step_mib']:,.0f}",
                              f"{r['tok_s'] / base['tok_s']:.2f}", f"{r['step_mib'] / max(1.0, base['step_mib']):.2f}",
                              f"{r['seconds'] / full['seconds']:.2f}" if lora else "",
                              f"{r['step_mib'] / max(1.0, full['step_mib']):.2f}" if lora else "",
                              f"{r['first_loss']:.6g}")
    Console().print(table)


if __name__ == "__main__":
    main()
