"""Run under ``torchrun --nproc_per_node 2`` by test_distributed.py: one GVPO step's gradient on FSDP2 shards.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py WORKDIR MICRO_BATCH_TOKENS OUT.pt

Every rank computes its token-balanced share of the step's groups (train.gvpo_backward with a
distributed.StepShare); rank 0 saves the full (gathered) gradients, the step's loss and each rank's
pass counts to OUT.pt.
"""

import sys
from pathlib import Path

import torch

from gvpo_offline import distributed
from gvpo_offline.modeling import load_model
from gvpo_offline.train import gvpo_backward, load_train_groups, make_batch

workdir, micro_batch_tokens, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
torch.set_num_threads(1)
ctx = distributed.context("cpu")
groups = load_train_groups(workdir)
batch = make_batch(groups, list(range(groups.n_groups)))
model = distributed.shard_model(ctx, load_model(Path(__file__).parents[1] / "sample_data" / "stories260K",
                                                torch.device("cpu")))
share = distributed.step_share(ctx, batch.group_tokens)
stats = gvpo_backward(model, batch, 1.0, micro_batch_tokens, share=share)
grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
passes = distributed.all_gather_objects(ctx, (share.groups, stats.micro_batches))
if ctx.is_main:
    torch.save({"grads": grads, "loss": stats.loss, "passes": passes}, out)
