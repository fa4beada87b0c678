"""Benchmark: what the per-step failure agreement (distributed.agree) adds to a 2-process train step.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/agree.py [--steps 20]
                                    [--groups-per-step 8] [--k 4]

Under torchrun every train step ends its gradient with ``distributed.agree(ctx, failure)``: one all-reduce
of a one-element flag (a gather of the messages only when a rank failed). This times, on the same FSDP2
model (sample_data/stories260K, float32, gloo on CPU, OMP_NUM_THREADS as given) and the same synthetic
groups (prompts 16..64 tokens, responses 32..192 tokens), the train step of train.py (step.gvpo_backward
with the rank's distributed.StepShare + clip + AdamW) without and with the agreement, alternating the two
variants step by step after two warm-up steps; it prints the median step time of each and their ratio,
and the median time of agree() alone. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gvpo_offline.model import distributed
from gvpo_offline.model.loading import load_model
from gvpo_offline.stages.train.step import StepBatch, gvpo_backward

STORIES = Path(__file__).resolve().parents[1] / "sample_data" / "stories260K"


def synthetic_batch(groups: int, k: int, seed: int = 0) -> StepBatch:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 500, (n,), generator=g).tolist()

    prompts, responses, index = [], [], []
    for j in range(groups):
        prompt = ids(int(torch.randint(16, 65, (1,), generator=g)))
        for _ in range(k):
            prompts.append(prompt)
            responses.append(ids(int(torch.randint(32, 193, (1,), generator=g))))
            index.append(j)
    n = len(responses)
    return StepBatch(prompts, responses, torch.randn(n, generator=g, dtype=torch.float64),
                     -torch.rand(n, generator=g, dtype=torch.float64) * 300, torch.tensor(index), groups)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--groups-per-step", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    ctx = distributed.context("cpu")
    model = distributed.shard_model(ctx, load_model(STORIES, torch.device("cpu")))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    batch = synthetic_batch(args.groups_per_step, args.k)

    def step(with_agree: bool) -> float:
        distributed.barrier(ctx)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        share = distributed.step_share(ctx, batch.group_tokens)
        gvpo_backward(model, batch, 0.1, 2048, share=share)
        if with_agree:
            distributed.agree(ctx, None)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    for i in range(2 * args.steps):
        times[i % 2 == 1].append(step(i % 2 == 1))
    agree_alone = []
    for _ in range(200):
        start = time.perf_counter()
        distributed.agree(ctx, None)
        agree_alone.append(time.perf_counter() - start)
    if ctx.is_main:
        base, new = statistics.median(times[False]), statistics.median(times[True])
        print(f"2-process CPU train step ({args.groups_per_step} groups × k {args.k}, {args.steps} steps each, "
              f"torch threads {torch.get_num_threads()}): without agree {base * 1e3:.1f} ms, with agree "
              f"{new * 1e3:.1f} ms, ratio {new / base:.3f}; agree() alone {statistics.median(agree_alone) * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
