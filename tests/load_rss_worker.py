"""Run under ``torchrun --nproc_per_node 4`` by test_sliced_load.py: each rank loads two models the way train
loads them (rank0_load.load_for_sharding + shard_and_broadcast; sliced_load.py for safetensors folders) and
reports its resident memory.

    python -m torch.distributed.run --nproc_per_node 4 tests/load_rss_worker.py TINY BIG OUT.json

TINY first (its added peak is the fixed overhead of loading: the model objects, FSDP's setup), then BIG;
then TINY's parameters, gathered, are compared bit for bit with a plain load on rank 0. Rank 0 writes
{"ranks": [{"before", "tiny_peak", "big_peak", "shard"}...], "tiny_equal": bool} to OUT.json."""

import json
import resource
import sys
from pathlib import Path

import torch

from gvpo_offline.model import distributed, rank0_load
from gvpo_offline.model.loading import load_model


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def load(path):
    return rank0_load.shard_and_broadcast(ctx, rank0_load.load_for_sharding(ctx, path, torch.float32))


tiny, big, out = sys.argv[1:4]
torch.set_num_threads(1)
ctx = distributed.context("cpu")
import transformers.models.llama.modeling_llama  # noqa: E402,F401  (imported before "before")

distributed.barrier(ctx)
row = {"before": rss()}
small = load(tiny)
row["tiny_peak"] = peak()
large = load(big)
row["big_peak"] = peak()
row["shard"] = sum(distributed.local_tensor(p).numel() * p.element_size() for p in large.parameters())
del large
gathered = {name: p.full_tensor() for name, p in small.named_parameters()}
rows = distributed.all_gather_objects(ctx, row)
if ctx.is_main:
    plain = dict(load_model(tiny, torch.device("cpu")).named_parameters())
    equal = plain.keys() == gathered.keys() and all(
        plain[n].dtype == gathered[n].dtype and torch.equal(plain[n], gathered[n]) for n in plain)
    Path(out).write_text(json.dumps({"ranks": rows, "tiny_equal": equal}))
distributed.finish()
