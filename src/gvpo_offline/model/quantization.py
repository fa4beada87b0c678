"""QLoRA's frozen base: the model's linear layers in 4-bit NF4 (bitsandbytes), CUDA only.

``precompute-ref --load-in-4bit`` and ``train --lora-r R --load-in-4bit`` load the base with the one
setting below (:func:`load_4bit`), so the reference log-probs come from the same quantised weights the
LoRA policy sits on: B = 0 at step 0, hence ℓ = 0 at step 0, exactly as with an unquantised base. The
manifest records ``load_in_4bit`` (in its inputs, so it is part of the cache key) and train refuses a
cache made the other way (:func:`check_same_base`).

The setting: NF4 with double quantisation (Dettmers et al. 2023, QLoRA), matmuls in bfloat16, every
other weight (embeddings, norms, LM head) in bfloat16. bitsandbytes is an optional extra
(``pip install 'gvpo-offline[qlora]'``); without CUDA or without it, one line says so.

Not yet run on a GPU (the project's machines have none): the refusals are tested on CPU; the
acceptance script (benchmarks/gpu_acceptance.py) runs a QLoRA step when bitsandbytes is installed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gvpo_offline.runtime.errors import GvpoError

INSTALL = "pip install 'gvpo-offline[qlora]'"
NON_QUANTISED_DTYPE = torch.bfloat16  # embeddings, norms and LM head of a 4-bit model


def require_cuda(device: torch.device) -> None:
    """Refuse --load-in-4bit anywhere but on a CUDA device, and without bitsandbytes (one line each)."""
    if device.type != "cuda":
        where = "this machine has none" if not torch.cuda.is_available() else f"--device is {device}"
        raise GvpoError(f"--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit weights); {where}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise GvpoError(f"--load-in-4bit needs bitsandbytes: {INSTALL}") from None


def nf4_config():
    """The one 4-bit setting of both stages (transformers' BitsAndBytesConfig)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_4bit(path: str | Path, device: torch.device, trust_remote_code: bool = False):
    """The model at ``path`` (a model folder or hub id; not an adapter folder) with its linear layers in
    NF4 on ``device`` (CUDA), the other weights in bfloat16, in eval mode."""
    from transformers import AutoModelForCausalLM

    from gvpo_offline.model.loading import is_adapter, model_folder

    require_cuda(device)
    folder = model_folder(path)
    if is_adapter(folder):
        raise GvpoError(f"{folder}: --load-in-4bit needs a full model folder, not a LoRA adapter folder "
                        "(merge the adapter first: train --merge writes model-merged/)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4_config(), dtype=NON_QUANTISED_DTYPE,
                                                 device_map={"": index}, trust_remote_code=trust_remote_code)
    return model.eval()


def check_same_base(cache_4bit: bool, train_4bit: bool) -> None:
    """Train's LoRA base must be quantised exactly when the reference's was (ℓ = 0 at step 0)."""
    if cache_4bit and not train_4bit:
        raise GvpoError("the reference log-probs were computed from the 4-bit base (precompute-ref --load-in-4bit): "
                        "train with --lora-r R --load-in-4bit too, or precompute-ref without it into a new --workdir")
    if train_4bit and not cache_4bit:
        raise GvpoError("--load-in-4bit: the reference log-probs were computed from the unquantised base, so ℓ would "
                        "not be 0 at step 0; run precompute-ref --load-in-4bit into a new --workdir first")
