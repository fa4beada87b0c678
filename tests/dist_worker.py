"""Run under ``torchrun --nproc_per_node 2`` by test_distributed.py; one launch does three things:

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT.pt STEP_CACHE MICRO_TOKENS \
        DATA.jsonl REF_WORKDIR POLICY_MODEL TRAIN_WORKDIR [train options...]

1. one GVPO step on FSDP2 shards: every rank computes its token-balanced share of STEP_CACHE's train
   groups (step.gvpo_backward with a distributed.StepShare, MICRO_TOKENS per pass); then the same step
   with --loss dpo, and with packed rows;
2. precompute-ref of DATA.jsonl into REF_WORKDIR (every rank scores a share of each shard);
3. eval of POLICY_MODEL on REF_WORKDIR's eval split (β = 1, 200 bootstrap resamples);
4. ``gvpo-offline train --workdir TRAIN_WORKDIR [train options...]`` (an uninterrupted sharded run);
5. LoRA: the step of 1. on a sharded peft model (its A and B set by cachefixture.set_lora_weights: every LoRA weight gets a
   gradient), its adapter saved (OUT.pt's folder / lora-step) beside its log-probs of the step's rows; then
   ``train --lora-r 4 --merge`` (LORA_TRAIN_ARGS) into TRAIN_WORKDIR-lora, and the same run resumed from its
   step-2 checkpoint into TRAIN_WORKDIR-lora-resumed;
6. rank0_load (each rank reads its shards' rows, sliced_load.py; for an adapter folder rank 0 reads the weights,
   rank 1 builds on meta, broadcast into the shards): every parameter
   (gathered) and every rank's buffers of stories260K, of a LoRA model on a bfloat16 base (against rank 0's
   values before sharding) and of the merged adapter folder of 5. (as --init-model); the stories260K one with
   --gradient-checkpointing runs the step of 1.; and a model whose weights rank 0 cannot read stops both ranks.
Rank 0 saves the gathered full gradients, the step's loss, each rank's groups and the eval report to OUT.pt.
"""

import shutil
import sys
from pathlib import Path

import torch
from cachefixture import set_lora_weights
from rich.console import Console

from gvpo_offline import cli
from gvpo_offline.data import DataConfig
from gvpo_offline.data.tokenize import TokenizeConfig
from gvpo_offline.math.loss import OBJECTIVES
from gvpo_offline.model import adapters, distributed, rank0_load, sliced_load
from gvpo_offline.model.loading import load_model
from gvpo_offline.model.logprobs import sequence_logps
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.evaluate.heldout import EvalConfig, evaluate
from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute
from gvpo_offline.stages.train.checkpoints import save_final
from gvpo_offline.stages.train.recipe import enable_gradient_checkpointing
from gvpo_offline.stages.train.step import gvpo_backward, load_train_groups, make_batch

STORIES = Path(__file__).resolve().parents[1] / "sample_data" / "stories260K"
LORA_TRAIN_ARGS = ["--beta", "1", "--lr", "1e-3", "--groups-per-step", "3", "--max-steps", "4", "--save-every", "2",
                   "--micro-batch-tokens", "60", "--device", "cpu", "--seed", "1", "--lora-r", "4", "--merge"]


def count_calls(layer) -> list[int]:
    """[n]: how often ``layer`` ran on this rank (inside a checkpointed decoder layer: forward and recomputation)."""
    calls = [0]
    layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


out, step_cache, micro_tokens, data, ref_workdir, policy, train_workdir = sys.argv[1:8]
torch.set_num_threads(1)
ctx = distributed.context("cpu")

groups = load_train_groups(Path(step_cache))
batch = make_batch(groups, list(range(groups.n_groups)))
model = distributed.shard_model(ctx, load_model(STORIES, torch.device("cpu")))
share = distributed.step_share(ctx, batch.group_tokens)
layer_calls = count_calls(model.model.layers[0].mlp)
stats = gvpo_backward(model, batch, 1.0, int(micro_tokens), share=share)
plain_calls = layer_calls[0]
grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
model.zero_grad(set_to_none=True)  # the same step with another objective (its 1/C is the whole step's too)
dpo_loss = gvpo_backward(model, batch, 1.0, int(micro_tokens), objective=OBJECTIVES["dpo"], share=share).loss
dpo_grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
model.zero_grad(set_to_none=True)  # and GVPO with packed rows (each prompt once, through FSDP's hooks too)
gvpo_backward(model, batch, 1.0, int(micro_tokens), packed=True, share=share)
packed_grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
rank_groups = distributed.all_gather_objects(ctx, share.groups)

quiet = Console(quiet=True)
tokenize = TokenizeConfig(max_length=128, max_prompt_length=64)
precompute(PrecomputeConfig(DataConfig((data,)), str(STORIES), Path(ref_workdir), tokenize, eval_fraction=0.5,
                            shard_groups=3, device="cpu", progress=False), quiet)
report = evaluate(EvalConfig(workdir=ref_workdir, model_path=policy, beta=1.0, bootstrap=200, device="cpu"), quiet)
cli.main(["train", "--workdir", train_workdir, *sys.argv[8:]])

lora = adapters.add_lora(load_model(STORIES, torch.device("cpu")), adapters.LoraSettings(r=4))
set_lora_weights(lora)
lora = distributed.shard_model(ctx, lora)
lora_stats = gvpo_backward(lora, batch, 1.0, int(micro_tokens), share=share)
lora_grads = {name: p.grad.full_tensor() for name, p in lora.named_parameters() if p.requires_grad}
with torch.no_grad():
    lora_logps = sequence_logps(lora, batch.prompt_ids, batch.response_ids)
adapter_state = distributed.full_state_dict(lora)
if ctx.is_main:
    save_final(Path(out).parent, lora, None, None, adapter_state, name="lora-step")
distributed.barrier(ctx)
lora_workdir, resumed = Path(train_workdir + "-lora"), Path(train_workdir + "-lora-resumed")
if ctx.is_main:
    shutil.copytree(step_cache, lora_workdir)
distributed.barrier(ctx)
cli.main(["train", "--workdir", str(lora_workdir), *LORA_TRAIN_ARGS])
if ctx.is_main:  # the same run, as if stopped after its step-2 checkpoint
    shutil.copytree(lora_workdir, resumed, ignore=shutil.ignore_patterns("model", "model-merged", "step-4"))
distributed.barrier(ctx)
cli.main(["train", "--workdir", str(resumed), *LORA_TRAIN_ARGS, "--resume"])


def broadcast_loaded(path, dtype=torch.float32, lora=False, checkpointing=False):
    """The model at ``path`` through rank0_load, as train loads it: what every rank holds afterwards."""
    model = rank0_load.load_for_sharding(ctx, path, dtype)
    empty = sum(p.is_meta or sliced_load.is_placeholder(p) for p in model.parameters())  # weights not read yet
    if lora:
        model = adapters.add_lora(model, adapters.LoraSettings(r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()} if ctx.is_main else None
    if checkpointing:
        enable_gradient_checkpointing(model)
    model = rank0_load.shard_and_broadcast(ctx, model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model, {"params": {n: p.full_tensor() for n, p in model.named_parameters()},  # every rank's shards
                   "buffers": distributed.all_gather_objects(ctx, {n: b.clone() for n, b in model.named_buffers()}),
                   "empty": distributed.all_gather_objects(ctx, empty), "tied": distributed.all_gather_objects(ctx, tied),
                   "before": before}


checkpointed, loaded = broadcast_loaded(STORIES, checkpointing=True)
layer_calls = count_calls(checkpointed.model.layers[0].mlp)
checkpointed_stats = gvpo_backward(checkpointed, batch, 1.0, int(micro_tokens), share=share)
checkpointed_grads = {name: p.grad.full_tensor() for name, p in checkpointed.named_parameters()}
loaded_lora = broadcast_loaded(STORIES, torch.bfloat16, lora=True)[1]
loaded_merged = broadcast_loaded(Path(out).parent / "lora-step")[1]
corrupt = Path(out).parent / "corrupt"  # weights only rank 0 reads, and cannot: every rank must stop at once
if ctx.is_main:
    shutil.copytree(STORIES, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
distributed.barrier(ctx)
try:
    rank0_load.load_for_sharding(ctx, corrupt, torch.float32)
    load_error = None
except GvpoError as err:
    load_error = str(err)
load_errors = distributed.all_gather_objects(ctx, load_error)
if ctx.is_main:
    torch.save({"grads": grads, "loss": stats.loss, "dpo_grads": dpo_grads, "packed_grads": packed_grads, "dpo_loss": dpo_loss, "rank_groups": rank_groups, "eval": report.to_json(),
                "lora_grads": lora_grads, "lora_loss": lora_stats.loss, "lora_logps": lora_logps,
                "checkpointed_grads": checkpointed_grads, "checkpointed_loss": checkpointed_stats.loss,
                "layer_calls": (plain_calls, layer_calls[0]),
                "loaded": loaded, "loaded_lora": loaded_lora, "loaded_merged": loaded_merged,
                "load_errors": load_errors}, out)
distributed.barrier(ctx)  # rank 1 waits for rank 0's save: both shut their process group down together
