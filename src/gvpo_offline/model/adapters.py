"""LoRA adapters (peft): the trainable policy, the adapter folder train writes, loading one back.

``train --lora-r R`` wraps the frozen model (the reference, or ``--init-model``) with peft LoRA layers.
The reference log-probs are already cached, so no second model and no adapter switching is needed.

- **ℓ = 0 at step 0**: peft initialises B = 0, so the wrapped model computes exactly the base model's
  function; the policy stays in eval mode. ``lora_dropout > 0`` puts only the LoRA dropout layers in
  training mode (:func:`train_dropout`): ℓ is still 0 at step 0 (B = 0), later steps' log-probs and
  gradients are random draws (the default 0 keeps them deterministic).
- **Precision**: the base weights are in the cache's weights dtype (``precompute-ref --dtype``: the
  reference ran the same weights, so ℓ = 0 at step 0; bfloat16 halves their memory on a GPU); the
  adapter weights and their AdamW state are always float32 (peft's ``autocast_adapter_dtype``).
- **Folder**: ``save_pretrained`` of the peft model = ``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable with ``peft.AutoPeftModelForCausalLM.from_pretrained``;
  ``base_model_name_or_path`` is the base's hub id (with its commit in ``revision``) when it has one
  (also when it was given as its snapshot folder in the HF cache), else its absolute folder (the one
  local path, without which the adapter could not be loaded). ``train_config.json`` beside it records the
  base model's content fingerprint, which :func:`load_merged` checks, so an adapter is never applied to
  another base.
- **Options** (:class:`LoraSettings`): target layers by names, regex or all-linear; dropout; rsLoRA;
  DoRA; modules trained in full (``modules_to_save``). QLoRA's 4-bit base: model/quantization.py.
- **Merged** (``train --merge``): peft's ``merge_and_unload`` folds B·A into the base weights, giving a
  plain transformers model, saved in the base checkpoint's own dtype (:func:`in_checkpoint_dtype`);
  :func:`load_merged` does the same for eval and sample. A 4-bit base is never merged into.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gvpo_offline.model.loading import ADAPTER_CONFIG, BASE_FINGERPRINT, TRAIN_CONFIG  # noqa: F401 (re-exported)
from gvpo_offline.runtime.errors import GvpoError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


_NAMES = re.compile(r"^[\w.]+(,[\w.]+)*$")  # "q_proj,v_proj": module names (suffix match); else a regex


@dataclass(frozen=True)
class LoraSettings:
    r"""``train --lora-*``. alpha None = r (scale α/r = 1; rsLoRA: α/√r).

    target_modules (``--lora-target``): "all-linear" (every linear layer but the LM head), comma-separated
    module names such as "q_proj,v_proj" (a module is targeted when its name ends with one of them), or
    any other text: a regular expression the whole module name must match (peft's rule), e.g.
    ``.*layers\.[0-3]\..*(q|v)_proj``. use_rslora: scale α/√r instead of α/r (Kalajdzievski 2023).
    use_dora: weight-decomposed LoRA (Liu et al. 2024; B = 0 still starts at the base's function, to
    rounding). modules_to_save: modules trained in full and saved in the adapter (e.g. lm_head)."""

    r: int
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        if self.r < 1:
            raise GvpoError(f"--lora-r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise GvpoError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.alpha is not None and not 0 < self.alpha < math.inf:
            raise GvpoError(f"--lora-alpha must be a finite number > 0, got {self.alpha}")
        targets = self.target_modules.strip()
        if not targets.strip(" ,"):
            raise GvpoError("--lora-target is empty")
        if targets != "all-linear" and not _NAMES.match(targets.replace(" ", "")):
            try:
                re.compile(targets)
            except re.error as err:
                raise GvpoError(f"--lora-target {targets!r}: neither module names nor a valid regular "
                                f"expression ({err})") from None
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))

    @property
    def targets(self) -> str | list[str]:
        """What peft's ``target_modules`` gets: "all-linear", a list of names, or a regex string."""
        targets = self.target_modules.strip()
        if targets == "all-linear" or not _NAMES.match(targets.replace(" ", "")):
            return targets
        return [m.strip() for m in targets.split(",") if m.strip()]

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha or self.r, lora_dropout=self.dropout,
                          target_modules=self.targets, use_rslora=self.use_rslora, use_dora=self.use_dora,
                          modules_to_save=list(self.modules_to_save) or None, bias="none", task_type="CAUSAL_LM")

    @classmethod
    def from_json(cls, obj: dict) -> LoraSettings:
        """The settings as ``asdict`` wrote them (train_config.json, a checkpoint's trainer_state.json)."""
        return cls(**{**obj, "modules_to_save": tuple(obj.get("modules_to_save") or ())})


def parse_modules(text: str | None) -> tuple[str, ...]:
    """``--modules-to-save lm_head,embed_tokens`` -> ("lm_head", "embed_tokens")."""
    return tuple(m.strip() for m in (text or "").split(",") if m.strip())


def base_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise GvpoError(f"unknown --base-dtype {name!r}: use float32 or bfloat16")
    return table[name]


def lora_param_count(base, settings: LoraSettings) -> int:
    """Trainable parameters the adapter will have, from the shapes of ``base``'s layers, without
    allocating it: r·(in + out) for each targeted linear layer (``torch.nn.Linear``, or transformers'
    Conv1D with its (in, out) weight). "all-linear" targets every linear layer but the output embedding
    (peft's rule); names match a module's name or its last dotted part."""
    targets = settings.target_modules.strip()
    names = None if targets == "all-linear" else {m.strip() for m in targets.split(",") if m.strip()}
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    total = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_in, fan_out = module.in_features, module.out_features
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            fan_in, fan_out = module.weight.shape
        else:
            continue
        if names is None and module is head:
            continue
        if names is not None and name not in names and name.rsplit(".", 1)[-1] not in names:
            continue
        total += settings.r * (fan_in + fan_out)
    return total


def add_lora(base, settings: LoraSettings, checkpoint: Path | None = None):
    """The peft model to train: fresh LoRA layers (B = 0: the base's function exactly) or, with
    ``checkpoint``, the adapter saved there (trainable, for --resume). Eval mode; adapter in float32."""
    from peft import PeftModel, get_peft_model

    try:
        if checkpoint is not None:
            model = PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
        else:
            model = get_peft_model(base, settings.peft_config())
    except ValueError as err:  # e.g. target modules not found in the model
        raise GvpoError(f"LoRA: {str(err).splitlines()[0]}") from None
    return model.eval()


def train_dropout(model) -> int:
    """Put the LoRA dropout layers (``lora_dropout``) in training mode, the rest of the model staying in
    eval mode, so that ``--lora-dropout`` acts while the policy trains (in eval mode it is a no-op).
    Returns how many there are. ℓ = 0 at step 0 still (B = 0 zeroes the dropped LoRA branch)."""
    layers = [m for name, m in model.named_modules() if ".lora_dropout." in f".{name}."
              and isinstance(m, torch.nn.Dropout)]
    for layer in layers:
        layer.train()
    return len(layers)


def set_base_name(model, name: str, revision: str | None) -> None:
    """What adapter_config.json and the README.md card peft writes with it (checkpoints) will call the
    base model: a hub id and commit, or a folder (never a hub snapshot's local folder)."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = name
        config.revision = revision
    base = model.get_base_model()  # peft's card takes base_model and its base_model:adapter tag from these
    base.config._name_or_path = base.name_or_path = name


def in_checkpoint_dtype(model, base_folder: Path):
    """``model`` (a merged LoRA model) cast to the dtype its base checkpoint was saved in (config.json's
    ``dtype``), so model-merged/ is the size of the base and not, say, float32 for a bf16 base trained with
    a float32 --base-dtype. Unchanged when the base's config names no floating dtype."""
    import json

    try:
        config = json.loads((Path(base_folder) / "config.json").read_text())
    except (OSError, ValueError):
        return model
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return model
    return model.to(dtype)
