"""Host RAM while loading the model to train under torchrun, three ways: every rank reads it (the oldest
path), rank 0 reads it and broadcasts it into the FSDP shards (rank0_load.py's broadcast, the previous
default, still used for adapter folders and .bin weights), and each rank reads only its own rows of the
safetensors files (sliced_load.py, what train does now).

    python benchmarks/rank0_load.py [--ranks 4] [--mb 400]

Builds a Llama of about ``--mb`` MB in fp32 (untied embeddings, random weights) from a config and saves it
in bfloat16, as published checkpoints are (train loads fp32 master weights, so every loading rank holds a
real fp32 copy, not pages of the file), into a temp folder. Then it launches ``torchrun --nproc_per_node
RANKS`` (gloo on CPU, OMP_NUM_THREADS=1, glibc's mmap threshold fixed at 64 KiB so that freed blocks go
back to the OS in both paths alike) once per path. Each rank measures its resident memory (VmRSS) after
imports and process-group setup, then the peak (ru_maxrss) once the model is loaded and sharded; the table
shows both and what loading added, with the ratio rank-0 path / every-rank path per rank, measured in the
same run. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1 << 20


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(path: str, mode: str) -> None:
    """One rank: load ``path`` as ``mode`` ("every-rank", "rank-0" or "sliced"), shard it, report memory."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before "before", in both paths)

    from gvpo_offline.model import distributed, rank0_load
    from gvpo_offline.model.loading import load_model

    torch.set_num_threads(1)
    ctx = distributed.context("cpu")
    distributed.barrier(ctx)
    before = _rss_bytes()
    if mode == "every-rank":
        model = distributed.shard_model(ctx, load_model(path, torch.device("cpu")))
    else:
        loaded = rank0_load.load_for_sharding(ctx, path, torch.float32, sliced=mode == "sliced")
        model = rank0_load.shard_and_broadcast(ctx, loaded)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    shard = sum(distributed.local_tensor(p).numel() * p.element_size() for p in model.parameters())
    rows = distributed.all_gather_objects(ctx, {"rank": ctx.rank, "before": before, "peak": peak, "shard": shard})
    if ctx.is_main:
        print("RESULT " + json.dumps(rows), flush=True)


def build_model(folder: Path, megabytes: float) -> int:
    """A random Llama of about ``megabytes`` MB in fp32 saved to ``folder``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, vocab = 512, 16000
    per_layer = 4 * hidden * hidden + 3 * hidden * 1408 + 2 * hidden
    layers = max(1, round((megabytes * 1e6 / 4 - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=1408, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def launch(folder: Path, mode: str, ranks: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), __file__, "--worker", str(folder), mode],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--mb", type=float, default=400.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(Path(tmp), args.mb)
        print(f"model: {params / 1e6:.1f}M parameters, {4 * params / MIB:.0f} MiB in fp32 (bf16 on disk); torchrun "
              f"--nproc_per_node {args.ranks}, gloo on CPU, OMP_NUM_THREADS=1, MALLOC_MMAP_THRESHOLD_=65536\n")
        results = {mode: launch(Path(tmp), mode, args.ranks) for mode in ("every-rank", "rank-0", "sliced")}
    print("| path | rank | RSS before loading | peak RSS | added by loading | its shards |")
    print("|---|---|---|---|---|---|")
    for mode, rows in results.items():
        for r in rows:
            print(f"| {mode} | {r['rank']} | {r['before'] / MIB:,.0f} MiB | {r['peak'] / MIB:,.0f} MiB | "
                  f"{(r['peak'] - r['before']) / MIB:,.0f} MiB | {r['shard'] / MIB:,.0f} MiB |")
    for old_mode in ("every-rank", "rank-0"):
        print(f"\nsliced (new) / {old_mode} (old), per rank:")
        for old, new in zip(results[old_mode], results["sliced"]):
            added = (new["peak"] - new["before"]) / max(1, old["peak"] - old["before"])
            print(f"  rank {old['rank']}: peak RSS x{new['peak'] / old['peak']:.2f}, added by loading x{added:.2f}")
    for mode in ("every-rank", "rank-0", "sliced"):
        node = sum(r["peak"] - r["before"] for r in results[mode])
        worst = max(r["peak"] - r["before"] for r in results[mode])
        print(f"{mode}: added by loading, the node (all ranks) {node / MIB:,.0f} MiB, the worst rank {worst / MIB:,.0f} MiB")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
