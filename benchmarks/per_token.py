"""Benchmark: gvpo-offline's tokens per CPU-second on the TRL-comparison workload, old vs new in one run.

    python benchmarks/per_token.py                  # k = 4, 3 rounds of old, before and new, ~3 CPU minutes
    python benchmarks/per_token.py --ks 4 8 --rounds 2

The workload and the measure are benchmarks/vs_trl.py's, imported from it (its model, groups, ``run_ours``:
precompute-ref + one epoch of train, CPU seconds after imports, fresh process each, one thread); only
gvpo-offline runs here. The variants:

  old     session 10's: GVPO_OFFLINE_LM_HEAD_KEEP_MIB=0 (the LM head recomputes its logits in backward) and
          GVPO_OFFLINE_MALLOC=default (glibc's own mmap/trim thresholds), LM-head chunks ≤ 30 MiB
  before  session 11's: exp(z − max) chunks kept for backward within lm_head.CPU_KEEP_BYTES, freed large
          blocks kept in the heap (runtime/memory.py), but LM-head chunks ≤ 30 MiB (245 rows at vocab 32k),
          backward's ∂L/∂z in a separate [rows, V] buffer, and a full gc.collect() when precompute-ref ends
  new     the defaults now: chunks ≤ 128 MiB (1,048 rows) where the heap keeps freed blocks, ∂L/∂z written
          into the kept chunk itself, no gc.collect() before the heap is trimmed

Rounds alternate old, new, old, new, ... so that both see the same machine load; per variant the table
shows the best (lowest) CPU time of the rounds and the median, and the ratio of the bests. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_prompt import spawn  # noqa: E402
from vs_trl import FULL, count_tokens, make_model, run_ours, write_groups  # noqa: E402

VARIANTS = {
    "old": {"GVPO_OFFLINE_LM_HEAD_KEEP_MIB": "0", "GVPO_OFFLINE_MALLOC": "default"},
    "before": {},
    "new": {},
}
SWITCHES = ("GVPO_OFFLINE_LM_HEAD_KEEP_MIB", "GVPO_OFFLINE_MALLOC")


def run_as(variant: str, model: str, data: str, workdir: str, threads: int) -> dict:
    """``run_ours`` in this (fresh) process, with ``variant``'s code as it was."""
    import gc

    from gvpo_offline.model import lm_head
    from gvpo_offline.runtime import memory

    if variant in ("old", "before"):
        lm_head.CPU_CHUNK_BYTES = lm_head.CPU_MMAP_CHUNK_BYTES
        lm_head._graph_kept = lambda: True  # backward into a separate buffer
        trim = memory.release_freed_memory
        memory.release_freed_memory = lambda: (gc.collect(), trim())[1]
    return run_ours(model, data, workdir, 1, threads)


def run_variant(variant: str, model: str, data: str, workdir: str, threads: int) -> dict:
    saved = {name: os.environ.pop(name, None) for name in SWITCHES}
    os.environ.update(VARIANTS[variant])
    try:
        return spawn(run_as, variant, model, data, workdir, threads)
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=FULL["groups"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    started, load = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()[0]
    lines = ["| k | variant | tokens | one-epoch CPU s, best (median) | precompute / train CPU s (best) "
             "| tokens per CPU-s (best) | peak RSS MB | old / this (CPU s) | before / this (CPU s) |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", FULL["hidden"], FULL["layers"], FULL["intermediate"], FULL["vocab"])
        tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        for k in args.ks:
            data = tmp / f"data-k{k}.jsonl"
            groups = write_groups(data, tokenizer, args.groups, k, FULL["prompt_tokens_min"],
                                  FULL["prompt_tokens_max"], FULL["response_words"])
            tokens = count_tokens(tokenizer, groups, [])[0]
            results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for r in range(args.rounds):
                for variant in VARIANTS:
                    out = run_variant(variant, str(tmp / "model"), str(data), str(tmp / f"{variant}-k{k}-{r}"),
                                      args.threads)
                    out["epoch"] = out["precompute"] + out["train"]
                    results[variant].append(out)
                    print(f"k = {k} round {r + 1} {variant}: {out['epoch']:.2f} CPU s (precompute {out['precompute']:.2f}, "
                          f"train {out['train']:.2f}), peak {out['peak_mb']:,.0f} MB", flush=True)
            best = {v: min(rs, key=lambda o: o["epoch"]) for v, rs in results.items()}
            for variant, rs in results.items():
                b = best[variant]
                ratio = " | ".join("—" if variant == base else f"**{best[base]['epoch'] / b['epoch']:.2f}×**"
                                   for base in ("old", "before"))
                lines.append(f"| {k} | {variant} | {tokens:,} | {b['epoch']:.2f} ({statistics.median(o['epoch'] for o in rs):.2f}) "
                             f"| {b['precompute']:.2f} / {b['train']:.2f} | {tokens / b['epoch']:,.0f} "
                             f"| {max(o['peak_mb'] for o in rs):,.0f} | {ratio} |")
    print(f"\n{started}: vs_trl workload (Llama d={FULL['hidden']} L={FULL['layers']} V={FULL['vocab']:,}, "
          f"{args.groups} groups, fp32, {args.threads} thread(s)), {args.rounds} rounds alternating; load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
