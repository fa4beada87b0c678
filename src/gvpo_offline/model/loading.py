"""Models in and out of folders: device/dtype choice, loading a model folder, hub id or LoRA adapter
folder (merged onto its base), and content fingerprints.

Log-probs: :mod:`gvpo_offline.model.logprobs`; training LoRA adapters: :mod:`gvpo_offline.model.adapters`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gvpo_offline.runtime.errors import GvpoError

if TYPE_CHECKING:  # torch is imported where a function needs it: fingerprints and folders need no torch
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
ADAPTER_CONFIG = "adapter_config.json"
TRAIN_CONFIG = "train_config.json"
BASE_FINGERPRINT = "base_model_fingerprint"  # key in an adapter's train_config.json


# ---- device, dtype, loading ----------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (device in ("cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise GvpoError(f"unknown --device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GvpoError(f"--device {device} was asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU that supports it, float32 otherwise."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise GvpoError(f"unknown --dtype {dtype!r}: use auto, float32 or bfloat16")
    return table[dtype]


def model_folder(spec: str | Path) -> Path:
    """The local folder of ``spec``: a model folder, a LoRA adapter folder (``adapter_config.json``), or a
    hub id ``org/name[@revision]`` resolved through the Hugging Face cache (gvpo_offline.model.hub)."""
    from gvpo_offline.model.hub import resolve_model

    path = resolve_model(spec).path
    if not path.is_dir():
        raise GvpoError(f"{path}: not a folder (expected a model folder or a hub id org/name[@revision])")
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise GvpoError(f"{path}: not a model folder (no config.json, no adapter_config.json)")
    return path


def is_adapter(path: Path) -> bool:
    """A PEFT adapter folder (adapter_config.json) rather than a full model."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model folder, adapter folder or hub id; a one-line GvpoError when it cannot be
    loaded. An adapter folder without tokenizer files uses its base model's."""
    from transformers import AutoTokenizer

    folder = model_folder(path)
    if is_adapter(folder) and not (folder / "tokenizer_config.json").is_file():
        folder = model_folder(base_spec(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a usable tokenizer folder"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GvpoError(f"{folder}: cannot load a tokenizer from this folder ({reason})") from None
    # We tokenize whole texts and truncate them ourselves (and report how many): transformers' "Token
    # indices sequence length is longer than the specified maximum" warning is expected, so mark it as given.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def context_length(path: str | Path, trust_remote_code: bool = False) -> int | None:
    """The model's context (``max_position_embeddings`` of its config.json; a LoRA adapter's is its base
    model's), None when it does not say."""
    from transformers import AutoConfig

    folder = model_folder(path)
    if is_adapter(folder):
        folder = model_folder(base_spec(folder))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return getattr(config, "max_position_embeddings", None)


def load_model(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """AutoModelForCausalLM from a model folder or hub id, on ``device``, in eval mode (no dropout), its
    weights in ``dtype`` (None: float32). An adapter folder gives its base model with the adapter merged
    in (gvpo_offline.adapters)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    folder = model_folder(path)
    if is_adapter(folder):
        return load_merged(folder, device, dtype, trust_remote_code)
    with damaged_weights_named(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


class DamagedWeights(GvpoError):
    """A weights file that cannot be read: one line for the user; a damaged checkpoint is skipped by
    ``train --resume`` like any other corrupt checkpoint."""


@contextlib.contextmanager
def damaged_weights_named(folder: Path) -> Iterator[None]:
    """A weights file safetensors cannot read (cut short by a full disk, overwritten, not safetensors)
    raises SafetensorError, a plain Exception: turn it into one line naming the folder."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # safetensors too old to export it
        yield
        return
    try:
        yield
    except SafetensorError as err:
        detail = " ".join(str(err).split())[:200]
        raise DamagedWeights(f"{folder}: a damaged or incomplete weights file (safetensors: {detail})") from None


# ---- fingerprints --------------------------------------------------------------------------------


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the model folder's config.json and weight files (content, not names' paths or dates).

    Weight hashes come from gvpo_offline.model.hub.file_sha256: read off the blob name in a hub snapshot, else
    hashed once and cached on disk by (size, mtime, ctime, inode), so a 15 GB model is not re-read by
    every command. An adapter folder's fingerprint covers its config, its weights and its base model's
    fingerprint (gvpo_offline.model.loading.adapter_fingerprint)."""
    from gvpo_offline.model.hub import file_sha256

    path = model_folder(path)
    if is_adapter(path):
        return adapter_fingerprint(path)
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise GvpoError(f"{path}: no weight files (*.safetensors, *.bin) in the model folder")
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for weight in weights:
        h.update(weight.name.encode())
        h.update(file_sha256(weight).encode())
    return h.hexdigest()


def unwrap_peft(model):
    """The transformers model a peft model wraps, its LoRA layers injected (others: the model itself).
    The log-prob functions call ``model.base_model`` for hidden states, which on a peft model is not the
    transformers body."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---- adapter folders (what peft's save_pretrained writes) ----------------------------------------


def _adapter_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise GvpoError(f"{folder / ADAPTER_CONFIG}: unreadable ({err})") from None


def base_spec(folder: Path) -> str:
    """The adapter's base model as a --model spec: a folder, or ``org/name@commit`` for a hub id."""
    config = _adapter_config(folder)
    name = config.get("base_model_name_or_path")
    if not name:
        raise GvpoError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path")
    revision = config.get("revision")
    if revision and not Path(name).exists():
        return f"{name}@{revision}"
    return name


def _recorded_base_fingerprint(folder: Path) -> str | None:
    path = Path(folder) / TRAIN_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get(BASE_FINGERPRINT)
    except (OSError, ValueError, AttributeError):
        return None


def check_base(folder: Path) -> str:
    """The adapter's base spec, after checking (when train recorded it) that the base model there has
    the content it was trained on; a GvpoError names the mismatch."""
    spec = base_spec(folder)
    recorded = _recorded_base_fingerprint(folder)
    if recorded is not None and model_fingerprint(spec) != recorded:
        raise GvpoError(f"{folder}: the adapter was trained on another base model than the one at {spec} "
                        "(its content fingerprint differs from train_config.json's)")
    return spec


def load_merged(folder: Path, device: torch.device, dtype: torch.dtype | None = None,
                trust_remote_code: bool = False):
    """The base model with the adapter at ``folder`` merged in: a plain transformers model in eval mode."""
    from peft import PeftModel

    base = load_model(check_base(folder), device, dtype, trust_remote_code)
    with damaged_weights_named(folder):
        model = PeftModel.from_pretrained(base, folder)
    return model.merge_and_unload().to(device).eval()


def adapter_fingerprint(folder: Path) -> str:
    """sha256 over the adapter's config (minus where its base lives), its weights and its base model's
    content fingerprint."""
    from gvpo_offline.model.hub import file_sha256

    config = {k: v for k, v in _adapter_config(folder).items()
              if k not in ("base_model_name_or_path", "revision", "peft_version")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weights = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise GvpoError(f"{folder}: no adapter weights (adapter_model.safetensors)")
    for weight in weights:
        h.update(weight.name.encode())
        h.update(file_sha256(weight).encode())
    h.update(model_fingerprint(base_spec(folder)).encode())
    return h.hexdigest()
