"""A ``precompute-ref`` cache hit without torch or transformers (issue 23: 0.3 s instead of 3–5 s).

The cache key (``Manifest.key``) hashes what decides the content, some of it known only after loading
the tokenizer (its fingerprint) and torch (the dtype "auto" resolves to). A finished cache also records
``request_key``: a hash of the options *as given* plus file fingerprints that need neither,

    tool version, data and --eval-data file contents, layout, columns, model fingerprint (config.json and
    weights), the model folder's other files (tokenizer files, chat template...), the tokenize options
    before clamping to the model's context (config.json decides the clamp), the dtype, the eval
    fraction, the shard limits and the packing setting.

The same request key again means the same key, so the cache is a hit and no model library is imported.
Anything else (another request key, an older manifest without one, a dtype that needs torch to resolve:
``auto`` where a GPU may be visible, a LoRA adapter folder without its own tokenizer files, torchrun)
goes the full way in :mod:`.compute`, which decides by the key itself: a conservative shortcut, never a
different answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console

from gvpo_offline import __version__
from gvpo_offline.data import FileInfo, input_files
from gvpo_offline.data.tokenize import RESPONSE_RULE
from gvpo_offline.model import hub, loading
from gvpo_offline.runtime import workdir as workdirs
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.files import atomic_write_json, sha256_file
from gvpo_offline.stages.reference.cache import MANIFEST, Manifest, _read_any_manifest, bad_shards, cache_summary
from gvpo_offline.stages.reference.config import PrecomputeConfig

# Files of a model folder that never decide token ids or log-probs: the card, our training record.
_NOT_MODEL_INPUTS = ("README.md", loading.TRAIN_CONFIG)


def dtype_without_torch(device: str, dtype: str) -> str | None:
    """The weights dtype ``resolve_dtype`` would give, when it is known without torch: an explicit one,
    or ``auto`` on the CPU (float32) where no GPU is visible; None otherwise (ask torch)."""
    if dtype in ("float32", "bfloat16", "float16"):
        return dtype
    if dtype != "auto" or device not in ("auto", "cpu"):
        return None
    gpu_visible = any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()  # NVIDIA, ROCm
    return "float32" if device == "cpu" or not gpu_visible else None


def model_files_fingerprint(folder: Path) -> str | None:
    """sha256 over the model folder's files other than config.json and the weights (which the model
    fingerprint covers): the tokenizer files and chat template. None for an adapter folder without its
    own tokenizer (its base model's is used)."""
    if loading.is_adapter(folder) and not (folder / "tokenizer_config.json").is_file():
        return None
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.name not in _NOT_MODEL_INPUTS
                and path.name != "config.json" and path.suffix not in loading.WEIGHT_SUFFIXES):
            h.update(path.name.encode())
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def request_key(config: PrecomputeConfig, model_path: Path, data_files: list[FileInfo],
                eval_files: list[FileInfo], model_fingerprint: str | None = None) -> str | None:
    """The hash of the options as given (see the module docstring), or None when it needs torch.
    ``model_fingerprint``: the model's, when the caller has it already (else computed here)."""
    dtype = dtype_without_torch(config.device, config.dtype)
    tokenizer_files = model_files_fingerprint(model_path)
    if dtype is None or tokenizer_files is None:
        return None
    request = {
        "tool_version": __version__,
        "data_files": [f.sha256 for f in data_files],
        "eval_data_files": [f.sha256 for f in eval_files],
        "layout": config.data.layout,
        "columns": asdict(config.data.columns),
        "model_fingerprint": model_fingerprint or loading.model_fingerprint(model_path),
        "model_files": tokenizer_files,
        "tokenize": config.tokenize.to_json(),
        "dtype": dtype,
        "eval_fraction": 0.0 if config.eval_data else float(config.eval_fraction),
        "shard_groups": config.shard_groups,
        "shard_bytes": config.shard_bytes,  # None: from the weights' size, which the model fingerprint covers
        "packing": config.packing,
        "response_rule": RESPONSE_RULE,
        "load_in_4bit": config.load_in_4bit,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def cache_hit(config: PrecomputeConfig, console: Console) -> Manifest | None:
    """The workdir's complete manifest when it was made from this very request and its shards are intact
    (then the manifest is updated with where the inputs are now, and the hit reported on ``console``);
    None when the full stage must decide (:func:`.compute.precompute`)."""
    workdir = Path(config.workdir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not workdirs.is_marked(workdir):
        return None
    try:
        workdirs.check_layout(workdir)
    except GvpoError:
        return None  # the full stage says why
    old = _read_any_manifest(workdir)
    if old is None or not old.complete or not old.request_key:
        return None
    source = hub.resolve_model(config.model)
    model_path = source.path.resolve()
    if not model_path.is_dir():
        return None
    data_files, eval_files = input_files(config.data.paths), input_files(config.eval_data)
    if any(workdirs.inside_workdir(Path(f.path).parent) for f in data_files + eval_files):
        return None  # the full stage refuses data inside a workdir, with its message
    if request_key(config, model_path, data_files, eval_files) != old.request_key:
        return None
    with workdirs.stage_locks(workdir, "precompute"):
        old = _read_any_manifest(workdir)  # as it is now that we hold the lock
        if old is None or not old.complete or bad_shards(workdir, old):
            return None
        moved = replace(old, model_path=str(model_path), model_id=source.hub_id, model_revision=source.revision,
                        data_files=[_file_dict(f) for f in data_files],
                        eval_data_files=[_file_dict(f) for f in eval_files])
        if moved != old:  # the same content at other paths: record where it is now
            atomic_write_json(workdir / MANIFEST, moved.to_json())
    console.print(f"cache hit: {workdir / MANIFEST} matches the data, model, tokenizer and settings; nothing to "
                  f"compute (no model loaded). {cache_summary(moved)}", soft_wrap=True, highlight=False, markup=False)
    return moved


def _file_dict(f: FileInfo) -> dict:
    """A data file's fingerprint as the manifest records it (absolute path)."""
    return {**asdict(f), "path": str(Path(f.path).resolve())}
