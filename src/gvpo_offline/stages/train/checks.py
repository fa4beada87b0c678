"""``train``'s checks, before and after the recipe's work: the cache and the model we train from
(:func:`check_start`), the weights dtype against the cache's, the output folders, finite weights and the
vocabulary. Each raises one GvpoError line."""

from __future__ import annotations

from pathlib import Path

import torch

from gvpo_offline.data.tokenize import tokenizer_fingerprint
from gvpo_offline.model import adapters, distributed
from gvpo_offline.model.hub import resolve_model
from gvpo_offline.model.loading import load_tokenizer, model_fingerprint, resolve_dtype
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages import reference
from gvpo_offline.stages.train.checkpoints import CHECKPOINTS, FINAL_MODEL, MERGED_MODEL, METRICS, written_by_train
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.step import CachedGroups

# ---- 1. the cache and the model we train from -----------------------------------------------------


def check_start(manifest: reference.Manifest, init_model: str | None, trust_remote_code: bool):
    """Refuse a start whose reference cache does not match the model/tokenizer being trained.

    Returns (init path, tokenizer, notes). Raises GvpoError naming the mismatch.
    """
    notes: list[str] = []
    ref_path = Path(manifest.model_path)
    if not ref_path.is_dir() and manifest.model_id:  # a hub snapshot that left the cache: fetch it again
        ref_path = resolve_model(f"{manifest.model_id}@{manifest.model_revision}").path
    if init_model is None:
        if not any((ref_path / name).is_file() for name in ("config.json", adapters.ADAPTER_CONFIG)):
            raise GvpoError(f"the reference model at {ref_path} (from the manifest) is missing; pass --init-model")
        if model_fingerprint(ref_path) != manifest.model_fingerprint:
            raise GvpoError(
                f"the reference model at {ref_path} changed since precompute-ref "
                "(its weights/config fingerprint differs from the manifest's); rerun precompute-ref"
            )
        init_path = ref_path
    else:
        init_path = resolve_model(init_model).path
        if model_fingerprint(init_path) != manifest.model_fingerprint:
            notes.append(
                f"--init-model {init_path} is not the reference model ({ref_path}): "
                "the policy starts away from πref, so ℓ ≠ 0 and the loss ≠ 0 at step 0"
            )
    tokenizer = load_tokenizer(init_path, trust_remote_code=trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != manifest.tokenizer_fingerprint:
        raise GvpoError(
            f"the tokenizer at {init_path} differs from the one precompute-ref used for the cache "
            f"(reference {ref_path}); the cached token ids would mean something else"
        )
    return init_path, tokenizer, notes


# ---- safety checks ---------------------------------------------------------------------------------


def check_weights_dtype(manifest: reference.Manifest, cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The weights dtype the policy runs in: the one the cache's reference log-probs were computed with
    (precompute-ref --dtype), so that ℓ = 0 at step 0 to rounding. An explicit ``--dtype`` (or, with LoRA,
    ``--base-dtype``) naming another is refused in one line."""
    cached = str(manifest.dtype).removeprefix("torch.")
    for flag, value in (("--dtype", cfg.dtype), ("--base-dtype", cfg.base_dtype)):
        if value not in (None, "auto") and str(resolve_dtype(value, device)).removeprefix("torch.") != cached:
            raise GvpoError(f"{flag} {value}: the reference log-probs in {cfg.workdir} were computed with {cached} "
                            f"weights and the policy must run in the same weights dtype; drop {flag}, or rerun "
                            f"precompute-ref --dtype {value}")
    dtype = resolve_dtype(cached, device)
    if dtype == torch.float16:
        raise GvpoError("float16 weights are not supported for training: precompute-ref --dtype bfloat16 or float32")
    return dtype



def check_outputs(workdir: Path, manifest: reference.Manifest, init_path: Path, cfg: TrainConfig) -> None:
    """Refuse a run that would destroy a model or an earlier run: the reference or --init-model must not
    live where train writes (WORKDIR/model, WORKDIR/checkpoints), and an earlier run's model/ and
    metrics.jsonl are only replaced with ``overwrite`` (or continued with ``resume``)."""
    outputs = [(workdir / name).resolve() for name in (FINAL_MODEL, MERGED_MODEL, CHECKPOINTS)]
    for label, path in (("the reference model (from the manifest)", Path(manifest.model_path)),
                        ("--init-model", init_path)):
        resolved = path.resolve()
        for out in outputs:
            if resolved == out or out in resolved.parents:
                raise GvpoError(
                    f"{label} {path} is inside {out}, which train would overwrite; for another round, "
                    "precompute-ref with that model into a new --workdir"
                )
    for name in (FINAL_MODEL, MERGED_MODEL):
        folder = workdir / name
        if (folder.exists() or folder.is_symlink()) and not written_by_train(folder):
            raise GvpoError(
                f"{folder}: not a model folder written by gvpo-offline train (no train_config.json of a run); "
                "the tool never replaces a folder of yours, not even with --overwrite: move it out of the workdir"
            )
    earlier = [p for p in (workdir / FINAL_MODEL, workdir / MERGED_MODEL, workdir / METRICS) if p.exists()]
    if earlier and not (cfg.overwrite or cfg.resume):
        raise GvpoError(
            f"{workdir} holds an earlier training run ({', '.join(p.name for p in earlier)}); pass --overwrite "
            "to replace it, --resume to continue it, or train a named run beside it (--run NAME)"
        )


def check_finite_parameters(model, where: str, last_good: str | None,
                            ctx: distributed.Dist = distributed.Dist()) -> None:
    """Raise GvpoError (nothing saved) when a parameter is NaN or ±inf. One fused reduction per tensor.
    Sharded: each rank checks its shards and the ranks agree (all stop, or none)."""
    bad = [name for name, param in model.named_parameters()
           if not bool(torch.isfinite(distributed.local_tensor(param)).all())]
    distributed.agree(ctx, GvpoError(
        f"{where}: parameter {bad[0]} is not finite; not saving this model (last good checkpoint: "
        f"{last_good or 'none'}). Lower --lr") if bad else None)


def check_vocabulary(model, groups: CachedGroups, model_path: Path) -> None:
    """The cached token ids must exist in the model's embedding (an --init-model with a smaller vocab)."""
    import pyarrow.compute as pc

    vocab = model.get_input_embeddings().weight.shape[0]
    top = max(pc.max(pc.list_flatten(groups.table[col])).as_py() or 0 for col in ("prompt_ids", "response_ids"))
    if top >= vocab:
        raise GvpoError(f"{model_path}: vocabulary of {vocab} tokens, but the cached token ids go up to {top}")
