"""``train``'s settings (:class:`TrainConfig`, validated on construction) and what it returns."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gvpo_offline.math.loss import OBJECTIVES
from gvpo_offline.model import adapters, packing
from gvpo_offline.model.adapters import LoraSettings
from gvpo_offline.runtime.errors import GvpoError


@dataclass
class TrainConfig:
    """Everything `gvpo-offline train` needs. Units: learning rate per step, tokens = token ids."""

    workdir: Path = Path("gvpo-run")
    beta: float = 0.1
    loss: str = "gvpo"  # the objective, a key of loss.OBJECTIVES: gvpo, dpo, ipo, ipo-trl, rebel, sft-best
    init_model: str | None = None  # None = the reference model recorded in the manifest
    groups_per_step: int = 8  # whole groups (prompts) per optimizer step
    micro_batch_tokens: int | None = None  # padded tokens (rows × longest) per pass; None = 8192 GPU, 2048 CPU
    lr: float = 1e-6  # peak AdamW lr (≈ per-weight update size); verl's (m/(2n))× loss scale: AdamW mostly cancels it
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1  # fraction of the steps with linear warmup, then cosine to 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    epochs: int = 1
    max_steps: int | None = None  # when set, overrides epochs (epochs keep cycling until it)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # weights dtype of the policy's forward: auto = the cache's (the only one accepted)
    gradient_checkpointing: bool = False
    cpu_offload: bool = False  # under torchrun on GPUs: FSDP keeps shards, grads and AdamW state in CPU RAM
    hsdp: str = "auto"  # under torchrun: shard within a node, replicate across nodes; auto = when on several nodes
    save_every: int = 500  # steps between checkpoints; 0 = never
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False  # replace an earlier run's model/ and metrics.jsonl
    trust_remote_code: bool = False
    logits_chunk_tokens: int | None = None  # positions per LM-head chunk; None = logprobs.logits_chunk_for
    packing: str | None = None  # auto|on|off (packing.py); None = the reference cache's, so both use one path
    progress: bool = True  # live progress on stderr
    lora: LoraSettings | None = None  # train a LoRA adapter on the frozen model (gvpo_offline.adapters)
    base_dtype: str | None = None  # with LoRA: dtype of the frozen base weights; None = the cache's (the only one accepted)
    merge: bool = False  # with LoRA: also write WORKDIR/model-merged/, the adapter merged into the weights
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA), as precompute-ref's
    run: str | None = None  # a named run: outputs in WORKDIR/runs/RUN/ (run_dir), sharing WORKDIR's cache

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        if not 0 < self.beta < math.inf:
            raise GvpoError(f"--beta must be a finite number > 0, got {self.beta}")
        if self.loss not in OBJECTIVES:
            raise GvpoError(f"--loss must be one of {', '.join(OBJECTIVES)}, got {self.loss!r}")
        for name in ("groups_per_step", "micro_batch_tokens", "epochs", "keep_checkpoints", "logits_chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise GvpoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hsdp not in ("auto", "on", "off"):
            raise GvpoError(f"--hsdp must be one of auto, on, off, got {self.hsdp!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise GvpoError(f"--max-steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise GvpoError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.lr < math.inf:
            raise GvpoError(f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            if not 0 <= getattr(self, name) < math.inf:
                raise GvpoError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(self, name)}")
        if self.save_every < 0:
            raise GvpoError("--save-every must be >= 0")
        if self.packing is not None and self.packing not in packing.PACKING_CHOICES:
            raise GvpoError(f"--packing must be one of {', '.join(packing.PACKING_CHOICES)}, got {self.packing!r}")
        if self.base_dtype is not None:
            adapters.base_dtype(self.base_dtype)
        if self.lora is None and (self.merge or self.base_dtype is not None or self.load_in_4bit):
            raise GvpoError("--merge, --base-dtype and --load-in-4bit apply to LoRA training: add --lora-r")
        if self.load_in_4bit and self.merge:
            raise GvpoError("--merge with --load-in-4bit: the adapter cannot be merged into 4-bit weights without "
                            "dequantising them; drop --merge and load WORKDIR/model (the adapter) onto the "
                            "unquantised base, or merge it there with peft's merge_and_unload")
        check_run_name(self.run)

    @property
    def run_dir(self) -> Path:
        """Where this run's checkpoints/, metrics.jsonl, model/ and train_config.json go: WORKDIR, or
        WORKDIR/runs/RUN/ for a named run (``--run``); the reference cache is always WORKDIR's."""
        return run_dir(self.workdir, self.run)

    def to_json(self) -> dict:
        """The settings as JSON would give them back (tuples as lists)."""
        return json.loads(json.dumps({**asdict(self), "workdir": str(self.workdir)}))


RUNS = "runs"  # WORKDIR/runs/NAME/: the named runs over the workdir's cache
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(name: str | None) -> None:
    """A run name is one folder name: letters, digits, ``.``, ``_``, ``-`` (not starting with . _ -)."""
    if name is not None and not _RUN_NAME.fullmatch(name):
        raise GvpoError(f"--run {name!r}: use letters, digits, '.', '_' and '-' (one folder name, e.g. beta-0.1)")


def run_dir(workdir: str | Path, run: str | None) -> Path:
    """WORKDIR for the unnamed run, WORKDIR/runs/RUN for a named one."""
    check_run_name(run)
    return Path(workdir) / RUNS / run if run else Path(workdir)


@dataclass
class TrainResult:
    model_dir: Path  # WORKDIR/model
    steps: int  # optimizer steps done in total (including those before a resume)
    resumed_from: int | None  # checkpoint step, or None
    final_loss: float | None  # loss of the last step, None when no step ran in this call
    metrics_path: Path
    notes: list[str] = field(default_factory=list)
    steps_run: int = 0  # optimizer steps done by this call
    clipped_steps: int = 0  # of those, steps whose gradient norm exceeded max_grad_norm (and was clipped)
    seconds: float = 0.0  # wall time of this call's steps
