"""gvpo-offline: offline GVPO post-training for Hugging Face causal language models.

Layers, bottom to top (a module imports only from its own layer or those below; tests/test_layout.py):

    math/       the GVPO loss and the held-out metrics: pure, no I/O
    runtime/    errors, atomic files, progress, signals, workdir locks, config files, trackers
    model/      loading, log-probs, packed rows, LoRA, torch.distributed, the model folder
    data/       read, validate, group; tokenize; reward callables
    stages/     what a user runs: reference (precompute-ref) -> train -> evaluate; sample, convert, plot
    cli.py      the typer command line

``gvpo_loss`` is imported lazily, so that ``import gvpo_offline`` (and ``--help``) does not import torch.
"""

__version__ = "0.1.0"
__all__ = ["gvpo_loss", "__version__"]


def __getattr__(name: str):
    if name == "gvpo_loss":
        from gvpo_offline.math.loss import gvpo_loss

        return gvpo_loss
    raise AttributeError(f"module 'gvpo_offline' has no attribute {name!r}")
