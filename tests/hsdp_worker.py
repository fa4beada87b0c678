"""Run as 2 "nodes" × 2 processes by test_scale.py (two ``torchrun --nnodes 2 --node_rank N --nproc_per_node 2``
launches on localhost, so LOCAL_WORLD_SIZE=2 and WORLD_SIZE=4):

    hsdp_worker.py OUT.pt STEP_CACHE MICRO_TOKENS [COMMANDS.json]

One GVPO step of STEP_CACHE's train groups on an HSDP model (--hsdp auto: on, since the job spans 2 nodes):
every rank computes its token-balanced share of the groups. Rank 0 saves the mesh's shape and names, each
parameter's placements, the gathered full gradients and the step's loss to OUT.pt. Then, in the same launch,
the gvpo-offline commands of COMMANDS.json (cli_worker.py), e.g. a whole ``train --hsdp on`` run."""

import json
import sys
from pathlib import Path

import torch
from cli_worker import run_commands

from gvpo_offline.model import distributed, rank0_load
from gvpo_offline.stages.train.step import gvpo_backward, load_train_groups, make_batch

STORIES = Path(__file__).resolve().parents[1] / "sample_data" / "stories260K"

out, step_cache, micro_tokens = sys.argv[1:4]
torch.set_num_threads(1)
ctx = distributed.context("cpu")
hsdp = distributed.use_hsdp(ctx, "auto")
groups = load_train_groups(Path(step_cache))
batch = make_batch(groups, list(range(groups.n_groups)))
model = rank0_load.shard_and_broadcast(ctx, rank0_load.load_for_sharding(ctx, STORIES, torch.float32), hsdp=hsdp)
share = distributed.step_share(ctx, batch.group_tokens)
stats = gvpo_backward(model, batch, 1.0, int(micro_tokens), share=share)
grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
weight = model.model.layers[0].mlp.up_proj.weight
if ctx.is_main:
    torch.save({"hsdp": hsdp, "nodes": distributed.nodes(ctx), "mesh": tuple(weight.device_mesh.shape),
                "mesh_names": weight.device_mesh.mesh_dim_names, "placements": [str(p) for p in weight.placements],
                "local_rows": weight.to_local().shape[0], "grads": grads, "loss": stats.loss}, out)
distributed.barrier(ctx)
if len(sys.argv) > 4:
    del model, weight, grads  # the commands load their own models
    with open(sys.argv[4]) as f:
        run_commands(ctx, json.load(f))
