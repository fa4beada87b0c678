"""The `train` stage: GVPO (or, with ``--loss``, a baseline objective) on the cached `train` split,
readable top to bottom.

``train(TrainConfig) -> TrainResult`` does, in order (a named run, ``run``, reads WORKDIR's cache and writes
everything below that says WORKDIR into WORKDIR/runs/RUN/ instead, under its own train lock):

1. **Check** the workdir's reference cache (complete manifest) against the model we train from: the
   reference model must be unchanged since precompute-ref, the tokenizer must be the cached one.
2. **Set up** the policy in the cache's weights dtype (the reference's regime: ℓ = 0 at step 0; in
   bf16, full fine-tuning gives AdamW fp32 master weights, master.py), AdamW and a linear-warmup +
   cosine schedule; with ``resume`` reload all of it from the latest complete checkpoint.
3. **Loop**: a step takes ``groups_per_step`` whole groups in the epoch's seeded shuffle order, computes
   the exact GVPO gradient (one pass, or micro-batch by micro-batch with :func:`loss.gvpo_grad_weights`
   when the step does not fit in ``micro_batch_tokens``), clips, steps, writes a line of
   ``metrics.jsonl`` and every ``save_every`` steps an atomic checkpoint.
4. **Save** ``WORKDIR/model/`` atomically: the model (or, with ``lora``, the PEFT adapter; ``merge`` adds
   ``WORKDIR/model-merged/``), tokenizer, generation_config.json, ``train_config.json`` and the README.md
   card (modelcard.py).

Where the parts live: the step's groups and its gradient (:func:`step.gvpo_backward`) in step.py;
checkpoints, ``metrics.jsonl`` and the final model folder in checkpoints.py. This module keeps the
checks and the recipe (:func:`train`); its settings and result are in config.py.

LoRA (``lora``, adapters.py): the same recipe on a peft model over the frozen base; only the adapter
is trained, checkpointed and resumed.

Model mode: the policy stays in **eval mode** (no dropout) while it trains. Gradients flow the same,
and the policy's log-probs are the same function as the reference's, so at step 0 ℓ = 0 exactly (up to
float rounding; dropout would make ℓ random) and the first loss is the rewards' within-group variance.
With ``gradient_checkpointing`` only the decoder-layer wrappers are flagged as training (that is what
makes HF recompute them); their dropouts stay off.

Other objectives (``--loss dpo|ipo|rebel|sft-best``, :data:`loss.OBJECTIVES`) run through the same
data, micro-batching, checkpoints and final model; only the per-group loss differs. GVPO's gradient
path is the closed form above; the others get the split-group weights ∂L/∂log πθ by autograd.

Loss scale: our loss is paper eq. 16 averaged over the step's G groups (gradient 2β·c_i/((k−1)·G)).
A measured comparison with the authors' verl code shows that their effective objective per optimizer
step is (m/(2n)) × ours (m = ppo_micro_batch_size_per_gpu, n = responses per prompt; ×2 for their
shipped script). Under AdamW a constant factor on the loss mostly cancels (the update is normalised by
the gradient's running RMS; only epsilon and clipping see the scale), so their learning rates carry over.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
import transformers
from torch import Tensor

from gvpo_offline.math.loss import OBJECTIVES
from gvpo_offline.model import adapters, distributed, loading, memory_plan, modelcard, packing, quantization, rank0_load
from gvpo_offline.model.loading import (
    DamagedWeights,
    load_model,
    resolve_device,
)
from gvpo_offline.runtime import interrupts, launcher, memory
from gvpo_offline.runtime import workdir as workdirs
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.files import remove_stale, write_errors_as_os_errors
from gvpo_offline.runtime.progress import progress
from gvpo_offline.stages import reference
from gvpo_offline.stages.train.checkpoints import (
    CHECKPOINTS,
    FINAL_MODEL,
    MERGED_MODEL,
    METRICS,
    TrainState,
    _check_checkpoint_files,
    _check_resume_config,
    append_metrics,
    checkpoint_dirs,
    has_dcp_state,
    is_sharded_checkpoint,
    load_checkpoint,
    load_checkpoint_sharded,
    load_master_checkpoint,
    load_single_into_sharded,
    remove_output,
    save_checkpoint,
    save_checkpoint_sharded,
    save_final,
    saved_world_size,
    truncate_metrics,
)
from gvpo_offline.stages.train.checks import (
    check_finite_parameters,
    check_outputs,
    check_start,
    check_vocabulary,
    check_weights_dtype,
)
from gvpo_offline.stages.train.config import TrainConfig, TrainResult
from gvpo_offline.stages.train.master import MASTER_WEIGHTS, MasterWeights
from gvpo_offline.stages.train.optimizer import adamw, keep_implementation
from gvpo_offline.stages.train.report import describe_step, setting_line, summary_line
from gvpo_offline.stages.train.step import (
    NonFiniteError,
    epoch_order,
    gvpo_backward,
    load_train_groups,
    make_batch,
)

# ---- learning-rate schedule ------------------------------------------------------------------------


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for step s (0-based): (s+1)/warmup during warmup, then cosine from 1 towards 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---- what the log says -----------------------------------------------------------------------------


# ---- the recipe ------------------------------------------------------------------------------------


def train(config: TrainConfig, log: Callable[[str], None] = print,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the policy with GVPO (or ``config.loss``) on WORKDIR's cached train split; see the module docstring.
    ``on_step`` gets each metrics.jsonl record once it is written (tracking.Tracker). The workdir must be
    one made by precompute-ref; it is locked for the run (one train at a time, no precompute-ref under it)."""
    ctx = distributed.context(config.device)  # one process, or one rank under torchrun (distributed.py)
    workdirs.require(config.workdir)
    if config.run and ctx.is_main:
        config.run_dir.mkdir(parents=True, exist_ok=True)
    locks = workdirs.stage_locks(config.workdir, "train", run_dir=config.run_dir)  # one train per run
    with distributed.main_only(ctx, locks):  # rank 0 locks for all
        return _train(config, ctx, log, on_step)


def _train(config: TrainConfig, ctx: distributed.Dist, log: Callable[[str], None],
           on_step: Callable[[dict], None] | None) -> TrainResult:
    cfg, workdir, out = config, config.workdir, config.run_dir  # reads the cache in workdir, writes in out
    if not ctx.is_main:  # only rank 0 prints and writes metrics.jsonl (it also holds the workdir's locks)
        log, on_step = _quiet, None

    # 1. check the cache against the model we train from
    manifest = reference.read_manifest(workdir)
    quantization.check_same_base(bool(manifest.inputs.get("load_in_4bit")), cfg.load_in_4bit)
    init_path, tokenizer, notes = check_start(manifest, cfg.init_model, cfg.trust_remote_code)
    check_outputs(out, manifest, init_path, cfg)
    base_name = modelcard.base_model_name(manifest, cfg.init_model, init_path)
    if cfg.lora is not None and (init_path / adapters.ADAPTER_CONFIG).is_file():
        raise GvpoError(f"the model to train from, {init_path}, is a LoRA adapter: a new adapter needs a full "
                        "base model (use its --merge folder, model-merged/), or train without --lora-r")
    groups = load_train_groups(workdir)
    device = resolve_device(distributed.stage_device(ctx, cfg.device))
    weights_dtype = check_weights_dtype(manifest, cfg, device)
    if cfg.load_in_4bit:  # QLoRA: one CUDA process
        quantization.require_cuda(device)
        if ctx.enabled:
            raise GvpoError("--load-in-4bit trains on one GPU: launch without torchrun")
    micro_batch_tokens = cfg.micro_batch_tokens or (8192 if device.type == "cuda" else 2048)
    for note in notes:
        log(f"note: {note}")

    # 2. plan the steps; find the checkpoint to resume from
    steps_per_epoch = math.ceil(groups.n_groups / cfg.groups_per_step)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    checkpoints = checkpoint_dirs(out)
    if checkpoints and not cfg.resume:
        raise GvpoError(f"{out / CHECKPOINTS} holds checkpoints of an earlier run: pass --resume to "
                        "continue it, or delete that folder to start over")
    if cfg.resume and not checkpoints:
        log(f"note: --resume: no checkpoint in {out / CHECKPOINTS}, starting from step 0")
    if ctx.is_main:
        remove_stale(out / CHECKPOINTS)  # left by a crash mid-save
        remove_stale(out)

    # 3. the policy (in the cache's weights dtype, eval mode = no dropout), optimizer, schedule, state
    torch.manual_seed(cfg.seed)
    transformers.utils.logging.disable_progress_bar()  # our own progress bar is the one on stderr
    memory.keep_freed_memory()  # each step's freed gradients and temporaries reused (runtime/memory.py)

    def setup(checkpoint: Path | None):
        # several processes: each rank builds the model and reads its own shards' rows (sliced_load.py), or
        # rank 0 reads it and broadcasts (rank0_load.py); a checkpoint's state is loaded after that. A
        # checkpoint resumes on any number of processes (checkpoints.py): DCP ones (sharded, or a one-process
        # bf16 run's fp32 master weights) are resharded, another single-process one is read by rank 0 and
        # broadcast into the shards. Sharded full fine-tuning: FSDP keeps fp32 shards (the master weights) and
        # gathers them in weights_dtype for the forward.
        dtype = torch.float32 if ctx.enabled and cfg.lora is None else weights_dtype
        sharded_checkpoint = checkpoint is not None and is_sharded_checkpoint(checkpoint)
        dcp_checkpoint = checkpoint is not None and has_dcp_state(checkpoint)
        plain_checkpoint = None if checkpoint is None or sharded_checkpoint else checkpoint  # HF weights inside

        def build(on: torch.device, lora_from: Path | None):  # the run's model, unsharded (1 -> N resume)
            model = load_model(plain_checkpoint if plain_checkpoint and cfg.lora is None else init_path, on, dtype,
                               cfg.trust_remote_code)
            if cfg.lora is not None:
                model = adapters.add_lora(model, cfg.lora, lora_from)
                adapters.set_base_name(model, *base_name)
            return model

        if ctx.enabled:
            model = rank0_load.load_for_sharding(ctx, init_path, dtype, cfg.trust_remote_code)
        elif cfg.load_in_4bit:  # the same 4-bit base the reference log-probs came from
            model = quantization.load_4bit(init_path, device, cfg.trust_remote_code)
        else:
            model = load_model(plain_checkpoint if plain_checkpoint and cfg.lora is None else init_path, device, dtype,
                               cfg.trust_remote_code)
        if cfg.lora is not None:  # frozen base + float32 LoRA layers (B = 0: the base's function)
            memory_plan.check_adapter_fits(ctx, adapters.lora_param_count(model, cfg.lora), device, cfg.cpu_offload,
                                           adapter_shard)
            model = adapters.add_lora(model, cfg.lora, None if ctx.enabled else plain_checkpoint)  # sharded: below
            adapters.set_base_name(model, *base_name)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.lora is not None and cfg.lora.dropout > 0:  # only the LoRA dropout trains; the rest stays eval
            adapters.train_dropout(model)
        if ctx.enabled:
            hsdp = distributed.use_hsdp(ctx, cfg.hsdp)  # several nodes: shard within each, replicate across
            if hsdp:
                log(f"HSDP: {'×'.join(map(str, distributed.nodes(ctx)))} (nodes × processes per node): the model "
                    "is sharded within a node and replicated across nodes")
            model = rank0_load.shard_and_broadcast(ctx, model, cfg.cpu_offload, weights_dtype, hsdp)
        elif cfg.cpu_offload:
            raise GvpoError("--cpu-offload shards the training state over processes: launch with torchrun on GPUs")
        params = [p for p in model.parameters() if p.requires_grad]
        # one process, trainable weights in bf16 (full fine-tuning): AdamW steps fp32 copies of them
        master = None if ctx.enabled or all(p.dtype == torch.float32 for p in params) else MasterWeights(params)
        if master is not None:
            params = master.master
            if plain_checkpoint is not None and not dcp_checkpoint:  # an older checkpoint: master_weights.pt
                master.load(torch.load(plain_checkpoint / MASTER_WEIGHTS, weights_only=True))
        optimizer = adamw(params, cfg.lr, cfg.weight_decay, sharded=ctx.enabled)  # fused in one process
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
        if checkpoint is None:
            state = TrainState()
        elif dcp_checkpoint and master is not None:  # one process in bf16: the fp32 masters by name, resharded
            state = load_master_checkpoint(checkpoint, model, master, optimizer, scheduler)
        elif dcp_checkpoint:  # any number of processes now, one included
            state = load_checkpoint_sharded(ctx, checkpoint, model, optimizer, scheduler)
        elif ctx.enabled:  # 1 -> N processes
            state = load_single_into_sharded(ctx, checkpoint, model, optimizer, scheduler,
                                             lambda: build(torch.device("cpu"), checkpoint))
        else:
            state = load_checkpoint(checkpoint, optimizer, scheduler)
        keep_implementation(optimizer)  # not the saving run's fused/foreach flags
        return model, params, optimizer, scheduler, state, master

    # the memory plan, from config.json before any weight is read: a run that cannot fit stops here
    adapter_shard = distributed.nodes(ctx)[1] if distributed.use_hsdp(ctx, cfg.hsdp) else None  # HSDP: a node's
    plan = memory_plan.plan_from_config(init_path, torch.float32 if ctx.enabled and cfg.lora is None else weights_dtype,
                                        cfg.lora, run_shape(cfg, ctx, device, micro_batch_tokens), cfg.trust_remote_code,
                                        device=device, check_adapter=lambda n: memory_plan.check_adapter_fits(
                                            ctx, n, device, cfg.cpu_offload, adapter_shard))
    log(plan.describe())
    memory_plan.check_fits(ctx, plan)

    resume_from = None
    for step, path in reversed(checkpoints):  # newest first; a corrupt one falls back to the one before
        try:
            _check_resume_config(path, cfg, manifest.key)  # GvpoError: the user's settings differ
            _check_checkpoint_files(path)
            model, params, optimizer, scheduler, state, master = setup(path)
        except GvpoError as err:
            if not isinstance(err, DamagedWeights):  # the user's settings or data: say so
                raise
            log(f"warning: checkpoint {path} is unusable ({err}); trying the one before it")
            continue
        except Exception as err:  # noqa: BLE001 - truncated weights, missing files, bad pickles: all "corrupt"
            if launcher.lost_peer_message(err, ctx.rank, ctx.world_size):  # another rank died: not the checkpoint
                raise
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            log(f"warning: checkpoint {path} is unusable ({reason}); trying the one before it")
            continue
        resume_from = (step, path)
        written_by = saved_world_size(path)
        other = f"; written by {written_by} process(es), resharded to {ctx.world_size}" \
            if written_by != ctx.world_size else ""
        log(f"resuming from {path} (step {state.step}/{total_steps}{other})")
        break
    if checkpoints and resume_from is None:
        raise GvpoError(f"--resume: no usable checkpoint in {out / CHECKPOINTS} (all are incomplete or "
                        "corrupt); delete that folder to start over")
    if resume_from is None:
        model, params, optimizer, scheduler, state, master = setup(None)
    check_vocabulary(model, groups, init_path if resume_from is None else resume_from[1])
    packing_mode, packing_note = packing.resolve(cfg.packing or manifest.inputs.get("packing", "off"), model.config,
                                                model)
    if packing_note:
        log(f"note: {packing_note}")
    log(setting_line(device, weights_dtype, sum(p.numel() for p in params), groups, cfg, total_steps, warmup_steps,
                     micro_batch_tokens))
    metrics_path = out / METRICS
    if ctx.is_main:
        truncate_metrics(metrics_path, keep_through_step=state.step)

    # 4. the loop (a signal stops it at the next step boundary, after a checkpoint)
    last_loss = None
    last_good = str(resume_from[1]) if resume_from else None
    started, tokens_seen, first_step, clipped = time.perf_counter(), 0, state.step, 0
    grad_norms: tuple[float, float] | None = None  # the smallest and largest |g| of this run's steps
    with progress(None, "train", total_steps, completed=state.step, unit="step", describe=describe_step,
                  enabled=cfg.progress and ctx.is_main) as update, interrupts.deferred() as stop_requested:
        while state.step < total_steps:
            if state.position >= groups.n_groups:
                state.epoch, state.position = state.epoch + 1, 0
            order = epoch_order(groups.n_groups, cfg.seed, state.epoch)
            chosen = order[state.position : state.position + cfg.groups_per_step]
            batch = make_batch(groups, chosen)

            step_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            where = f"step {state.step + 1} (epoch {state.epoch})"
            stop = f"stopped without updating the model; last good checkpoint: {last_good or 'none yet'}"
            failure = None
            try:
                share = distributed.step_share(ctx, batch.group_tokens)  # None with one process
                stats = gvpo_backward(model, batch, cfg.beta, micro_batch_tokens, cfg.logits_chunk_tokens,
                                      OBJECTIVES[cfg.loss],
                                      packing.use_packing(packing_mode, batch.prompt_ids, batch.response_ids), share)
            except NonFiniteError as err:  # under torchrun: after the step's passes, on the ranks whose groups failed
                failure = GvpoError(f"{where}: {err}; {stop}. {err.hint}")
            distributed.agree(ctx, failure)  # every rank stops here with the first failure, or none does
            grad_norm = _clip(params, cfg.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise GvpoError(f"{where}: the gradient is not finite (norm {grad_norm}); {stop}. Lower --lr")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # free the gradients now, not at the next step: a checkpoint
            if master is not None:                 # saved below never has them beside its copies
                master.to_model()
            scheduler.step()
            state.step += 1
            state.position += len(chosen)
            now = time.perf_counter()
            seconds = now - step_start
            clipped += cfg.max_grad_norm > 0 and grad_norm > cfg.max_grad_norm
            grad_norms = (min(grad_norm, grad_norms[0]), max(grad_norm, grad_norms[1])) if grad_norms else (grad_norm, grad_norm)

            record = {
                "step": state.step, "epoch": state.epoch, "objective": cfg.loss, "loss": stats.loss,
                "implicit_reward": stats.implicit_reward, "log_ratio": stats.log_ratio,
                "log_ratio_absmax": stats.log_ratio_absmax, "grad_norm": grad_norm, "lr": lr,
                "groups": batch.n_groups, "responses": len(batch.response_ids), "tokens": stats.tokens,
                "micro_batches": stats.micro_batches, "seconds": seconds,
                "log_ratio_per_token": stats.log_ratio_per_token, **stats.terms,
                "time": time.time(), "elapsed": now - started,
            }
            if ctx.is_main:
                append_metrics(metrics_path, record)
            if on_step is not None:
                on_step(record)
            last_loss, tokens_seen = stats.loss, tokens_seen + stats.tokens
            update(completed=state.step, loss=stats.loss, grad_norm=grad_norm, lr=lr, tokens=tokens_seen)
            signum = distributed.all_reduce_max(ctx, [stop_requested() or 0])[0] or None  # all ranks stop together
            if (cfg.save_every and state.step % cfg.save_every == 0) or signum:
                check_finite_parameters(model, f"after step {state.step}", last_good, ctx)
                with write_errors_as_os_errors(out / CHECKPOINTS):
                    if ctx.enabled:
                        last_good = str(save_checkpoint_sharded(ctx, out, model, optimizer, scheduler, state, cfg,
                                                                manifest.key))
                    else:
                        last_good = str(save_checkpoint(out, model, optimizer, scheduler, state, cfg,
                                                        manifest.key, tokenizer, master))
            if signum:
                run_flag = f" --run {cfg.run}" if cfg.run else ""
                log(f"interrupted after step {state.step}/{total_steps}; checkpoint saved to {last_good}. "
                    f"Continue with: gvpo-offline train --workdir {workdir}{run_flag} --resume (same options)")
                raise interrupts.Interrupted(signum)

    # 5. the final model (never a non-finite one)
    check_finite_parameters(model, f"after step {state.step}", last_good, ctx)
    train_config = modelcard.portable({  # no local paths in the folder a user uploads
        **cfg.to_json(), "total_steps": total_steps, "warmup_steps": warmup_steps,
        "reference_model_fingerprint": manifest.model_fingerprint,
        "tokenizer_fingerprint": manifest.tokenizer_fingerprint, "cache_key": manifest.key,
        "weights_dtype": str(weights_dtype).removeprefix("torch."),
        "base_dtype": str(weights_dtype).removeprefix("torch.") if cfg.lora is not None else None,
        "loss_formula": OBJECTIVES[cfg.loss].formula,  # "loss" (the --loss name) comes with cfg
        **modelcard.provenance(manifest, init_path, base_name, groups.n_groups, groups.table.num_rows),
    }, base_name)
    # sharded: gathered on every rank (a collective); a full fine-tuning's fp32 shards saved in the weights dtype
    saved_dtype = weights_dtype if cfg.lora is None else None
    full_weights = distributed.full_state_dict(model, saved_dtype)
    model_dir = out / FINAL_MODEL
    if ctx.is_main:
        remove_output(out, MERGED_MODEL)  # an earlier run's merge never stays beside this run's model
        with write_errors_as_os_errors(out / FINAL_MODEL):
            save_final(out, model, tokenizer, train_config, full_weights, dtype=saved_dtype)
    distributed.barrier(ctx)
    with distributed.together(ctx):  # rank 0 merges; its GvpoError (e.g. the base changed) stops every rank
        if cfg.merge and ctx.is_main:  # last: merging folds the LoRA layers into the base weights in place
            merged_model = (loading.load_merged(model_dir, torch.device("cpu"), weights_dtype,
                                                 cfg.trust_remote_code) if ctx.enabled else model.merge_and_unload())
            merged_model = adapters.in_checkpoint_dtype(merged_model, init_path)  # the base's own dtype
            with write_errors_as_os_errors(out / MERGED_MODEL):
                merged = save_final(out, merged_model, tokenizer, {**train_config, "merged": True},
                                    name=MERGED_MODEL)
            log(f"saved the merged model to {merged}")
    steps_run, seconds = state.step - first_step, time.perf_counter() - started
    log(summary_line(model_dir, state.step, steps_run, seconds, last_loss, clipped, cfg.max_grad_norm, grad_norms))
    return TrainResult(model_dir, state.step, resume_from[0] if resume_from else None, last_loss, metrics_path, notes,
                       steps_run, clipped, seconds)


def run_shape(cfg: TrainConfig, ctx: distributed.Dist, device: torch.device, micro_batch_tokens: int,
              world_size: int | None = None, local_world_size: int | None = None) -> memory_plan.RunShape:
    """What the memory plan needs of this run's settings (``world_size``: this launch's unless given; HSDP
    as ``--hsdp`` chooses it for that many processes, ``local_world_size`` per node)."""
    world = world_size or ctx.world_size
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return memory_plan.RunShape(world, local, device.type == "cuda", cfg.cpu_offload, micro_batch_tokens,
                                cfg.logits_chunk_tokens, cfg.gradient_checkpointing,
                                distributed.hsdp_for(cfg.hsdp, world, local))


def _quiet(_message: str) -> None:
    pass


def _clip(params: list[Tensor], max_norm: float) -> float:
    """Clip the gradient to ``max_norm`` (0 = don't clip); return its norm before clipping. Sharded
    (DTensor) gradients: the norm of the whole gradient, reduced over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0 or hasattr(grads[0], "full_tensor"):
        return distributed.to_float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def enable_gradient_checkpointing(model) -> None:
    """HF activation checkpointing while the model stays in eval mode (no dropout).

    HF only recomputes a decoder layer when that layer is in training mode, so only the layer wrappers
    get ``training = True``; their submodules (attention, MLP, dropout) stay in eval mode.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.eval()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True
