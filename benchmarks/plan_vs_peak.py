"""The memory plan against the measured peak RSS of real `train` runs on CPU, for 1, 2 and 4 processes.

    python benchmarks/plan_vs_peak.py [--layers 4] [--steps 1] [--micro-batch-tokens 2048]

Builds a random Llama (stories260K's tokenizer, vocab 512; hidden 512, 4 layers: 13.2M parameters) in a
temp folder, runs precompute-ref once on sample_data/groups.jsonl (60 groups), then `train` with 1 process
and under `torchrun --nproc_per_node 2` and `4` (gloo, OMP_NUM_THREADS=1), each for --steps steps. Every
process measures its resident memory after its imports (VmRSS) and its peak at the end (ru_maxrss); the
table shows the plan per process (memory_plan.plan_from_config, what train prints) beside the largest
measured peak minus the RSS before loading, both with glibc's default malloc and with
MALLOC_MMAP_THRESHOLD_=65536 (large blocks given back to the OS when freed, not kept for reuse). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "sample_data" / "stories260K"
MIB = 1 << 20


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def worker(out: str, args: list[str]) -> None:
    """One process: `train ARGS` (cli.main), its RSS before and its peak written to OUT-RANK.json."""
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from gvpo_offline import cli
    from gvpo_offline.stages.train import recipe  # noqa: F401

    before = rss_bytes()
    try:
        cli.main(args)
    except SystemExit as exc:
        if exc.code:
            raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(f"{out}-{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"before": before, "peak": peak}))


def build(folder: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / name, folder / name)


def run(workdir: Path, processes: int, train_args: list[str], malloc: dict) -> dict:
    out = workdir / "rss"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **malloc,
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if processes == 1:
        command = [sys.executable, __file__, "--worker", str(out), *train_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   __file__, "--worker", str(out), *train_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    plan_line = next(line for line in done.stderr.splitlines() if line.startswith("memory plan:"))
    ranks = [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(processes)]
    return {"plan_line": plan_line, "added": max(r["peak"] - r["before"] for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    args = parser.parse_args()
    import torch

    from gvpo_offline.model import memory_plan

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "model", args.layers)
        data = tmp / "data.jsonl"
        data.write_text("".join((REPO / "sample_data" / "groups.jsonl").read_text().splitlines(True)[:60]))
        subprocess.run([sys.executable, "-m", "gvpo_offline", "precompute-ref", str(data), "--model", str(tmp / "model"),
                        "--workdir", str(tmp / "ref"), "--device", "cpu", "--eval-fraction", "0"],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"model: random Llama, {args.layers} layers, hidden 512; train {args.steps} steps of 8 groups, "
              f"--micro-batch-tokens {args.micro_batch_tokens}, CPU, gloo, OMP_NUM_THREADS=1\n")
        print("| processes | malloc | plan per process | measured: peak RSS − RSS before (worst rank) | measured / plan |")
        print("|---|---|---|---|---|")
        for processes in (1, 2, 4):
            run_shape = memory_plan.RunShape(world_size=processes, local_world_size=processes,
                                             micro_batch_tokens=args.micro_batch_tokens)
            plan = memory_plan.plan_from_config(tmp / "model", torch.float32, None, run_shape, capacity_bytes=None,
                                                where="CPU")
            for label, malloc in (("default", {}), ("MMAP_THRESHOLD 64K", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
                workdir = tmp / f"run-{processes}-{len(malloc)}"
                shutil.copytree(tmp / "ref", workdir)
                got = run(workdir, processes, ["train", "--workdir", str(workdir), "--beta", "0.1", "--max-steps",
                                               str(args.steps), "--micro-batch-tokens", str(args.micro_batch_tokens),
                                               "--device", "cpu", "--save-every", "0"], malloc)
                print(f"| {processes} | {label} | {plan.peak_bytes / MIB:,.0f} MiB | {got['added'] / MIB:,.0f} MiB | "
                      f"{got['added'] / plan.peak_bytes:.2f} |", flush=True)
        print(f"\nthe plan train printed (4 processes): {got['plan_line']}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
