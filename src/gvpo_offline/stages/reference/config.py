"""``precompute-ref``'s options: :class:`PrecomputeConfig`. No torch here, so that a cache hit
(:mod:`.hit`) and ``--help`` stay fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gvpo_offline.data import DataConfig
from gvpo_offline.data.tokenize import TokenizeConfig
from gvpo_offline.runtime.errors import GvpoError

SHARD_MODEL_CHOICES = ("auto", "on", "off")  # --shard-model (model/sharded_scoring.py)

PACKING_CHOICES = ("auto", "on", "off")  # = model.packing.PACKING_CHOICES (tests/test_first_hour.py checks)


@dataclass(frozen=True)
class PrecomputeConfig:
    """Options of ``precompute-ref``.

    data: the training data (DATA...), read by data.load_groups.
    model: the reference model: a local folder (save_pretrained layout), a LoRA adapter folder, or a hub
        id org/name[@revision] resolved through the Hugging Face cache (manifest: model_id, model_revision).
    tokenize: the settings used by every stage; max_length is clamped to the model's context.
    eval_fraction: share of DATA's groups held out as 'eval', by a stable hash of the prompt; ignored
        (recorded as 0) when ``eval_data`` gives the held-out groups instead. 1.0 puts everything in eval.
    shard_groups: at most this many groups per shard file (a resumed run redoes at most one shard).
    shard_bytes: at most this much text per shard (UTF-8 bytes of each response with its prompt, Σ over the
        shard's responses, ~4 bytes per token), so that a Ctrl-C loses about a minute of work at most;
        None = :func:`auto_shard_bytes` of the model's weight size. A shard closes at whichever limit
        comes first (and holds at least one group).
    batch_tokens: padded tokens (rows × longest) per forward pass; None = 16384 on a GPU, 2048 on CPU
        (measured on CPU: small batches stay in cache and run ~25% faster than 16384).
    chunk_tokens: response positions per LM-head chunk; None = logprobs.logits_chunk_for(vocab).
    packing: 'on' computes each prompt once for all its responses, in rows packed without padding
        (packing.py; padded rows with a note where the model is not supported); 'off' pads separate
        sequences; 'auto' packs a shard when that saves ≥ packing.MIN_SHARED_FRACTION of its tokens. Recorded in the manifest (the values differ at float-rounding level); train and eval
        use the cache's setting by default.
    shard_model: under torchrun, 'on' shards the reference over the processes (FSDP forward passes,
        model/sharded_scoring.py), 'off' gives each process the whole model, 'auto' shards when its weights
        do not fit one device. Not part of the cache's inputs (the values agree to float rounding).
    overwrite: False refuses to replace a cache made from other inputs (``--no-overwrite``).
    require_*_fingerprint: refuse unless the model/tokenizer at ``model`` has this fingerprint
        (used by :func:`precompute_extra` to guarantee the same reference as the main cache).
    """

    data: DataConfig
    model: str
    workdir: Path = Path("gvpo-run")
    tokenize: TokenizeConfig = TokenizeConfig()
    eval_fraction: float = 0.1
    eval_data: tuple[str, ...] = ()
    shard_groups: int = 1000
    shard_bytes: int | None = None
    batch_tokens: int | None = None
    chunk_tokens: int | None = None
    packing: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    load_in_4bit: bool = False  # QLoRA: score with the weights in 4-bit NF4 (model/quantization.py), CUDA only
    shard_model: str = "auto"  # under torchrun: shard the reference over the processes (model/sharded_scoring.py)
    overwrite: bool = True
    progress: bool = True
    require_model_fingerprint: str | None = None
    require_tokenizer_fingerprint: str | None = None

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise GvpoError(f"--eval-fraction must be in [0, 1], got {self.eval_fraction}")
        if self.shard_groups < 1 or any(n is not None and n < 1
                                        for n in (self.batch_tokens, self.chunk_tokens, self.shard_bytes)):
            raise GvpoError("--shard-groups, --shard-bytes, --batch-tokens and chunk_tokens must be positive")
        if self.packing not in PACKING_CHOICES:
            raise GvpoError(f"--packing must be one of {', '.join(PACKING_CHOICES)}, got {self.packing!r}")
        if self.shard_model not in SHARD_MODEL_CHOICES:
            raise GvpoError(f"--shard-model must be one of {', '.join(SHARD_MODEL_CHOICES)}, got {self.shard_model!r}")


# Calibration of the automatic shard size: the CPU cost of scoring grows with tokens × weights. stories260K
# (1.04 MB of float32 weights) scores ~9,800 tok/s on one idle thread and ~460 on a busy 2-core machine
# (issue 22); 0.5 MB of text (~125k tokens) per shard is 13 s to 4.5 min there, and the product
# 0.5 MB × 1.04 MB sets the budget for other models, within [64 KB, 4 MB] (a 1B model in bf16 gets 64 KB,
# ~16k tokens per shard: minutes on a CPU, a second on a GPU; fewer, larger files are not worth more).
SHARD_BYTE_BUDGET = 5e5 * 1.04e6
SHARD_BYTES_RANGE = (64 * 1024, 4 * 1024 * 1024)


def auto_shard_bytes(weight_bytes: int) -> int:
    """Text bytes per shard for a model with ``weight_bytes`` of weights (see SHARD_BYTE_BUDGET)."""
    lo, hi = SHARD_BYTES_RANGE
    return int(min(hi, max(lo, SHARD_BYTE_BUDGET / max(weight_bytes, 1))))
