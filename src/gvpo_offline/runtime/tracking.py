"""Experiment tracking for `train --report-to`: TensorBoard and/or Weights & Biases, both optional.

Each metrics.jsonl record (stages/train/recipe.py) is also sent, as scalars at its ``step``, to:

    tensorboard  WORKDIR/tb/ (``tensorboard --logdir WORKDIR/tb``); a resumed run purges the events at
                 and after its first step, so a step redone after a crash is not drawn twice.
    wandb        a run in WORKDIR (``WORKDIR/wandb/``), config = the resolved command options; works offline
                 with ``WANDB_MODE=offline`` (sync later with ``wandb sync``).

Scalars: every numeric field of the record except ``step``/``epoch`` (loss, grad_norm, lr, log_ratio,
log_ratio_per_token, implicit_reward_variance/covariance, reward_variance, ...) plus ``tokens_per_second``
of the step. Missing packages are a one-line error before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gvpo_offline.runtime.errors import GvpoError

BACKENDS = ("none", "tensorboard", "wandb")
TB_DIR = "tb"
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> pip extra of gvpo-offline


def parse_report_to(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``--report-to`` values (repeatable, comma lists allowed) -> the backends, without 'none'."""
    chosen: list[str] = []
    for value in values or ():
        for name in (v.strip().lower() for v in value.split(",")):
            if name not in BACKENDS:
                raise GvpoError(f"--report-to {name!r}: expected one of {', '.join(BACKENDS)}")
            if name != "none" and name not in chosen:
                chosen.append(name)
    return tuple(chosen)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record (minus step/epoch) and the step's tokens per second."""
    out = {k: float(v) for k, v in record.items()
           if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if record.get("seconds"):
        out["tokens_per_second"] = record["tokens"] / record["seconds"]
    return out


class Tracker:
    """Sends metrics records to the chosen backends; ``tracker(record)`` is train()'s ``on_step``."""

    def __init__(self, backends: tuple[str, ...], workdir: Path, config: dict[str, Any]):
        self.backends, self.workdir, self.config = backends, Path(workdir), config
        self._tb = None
        self._wandb_run = None
        for name in backends:  # fail before training, not at step 1
            _require(name)
        if "wandb" in backends:
            _require_wandb_login()

    def __call__(self, record: dict[str, Any]) -> None:
        values, step = scalars(record), int(record["step"])
        if "tensorboard" in self.backends:
            if self._tb is None:  # created at the first step so a resume purges what it redoes
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / TB_DIR), purge_step=step)
            for name, value in values.items():
                self._tb.add_scalar(f"train/{name}", value, step)
        if "wandb" in self.backends:
            if self._wandb_run is None:
                import wandb

                try:
                    self._wandb_run = wandb.init(project="gvpo-offline", dir=str(self.workdir), config=self.config,
                                                 name=self.workdir.name)
                except Exception as err:  # noqa: BLE001 - wandb's errors (login, network) have no common base
                    detail = " ".join(str(err).split())[:300]
                    raise GvpoError(f"--report-to wandb: could not start a run ({type(err).__name__}: {detail}); "
                                    f"metrics.jsonl has every step so far. {_WANDB_HELP}") from None
            self._wandb_run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _require(backend: str) -> None:
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[backend]
    try:
        __import__(module)
    except ImportError:
        raise GvpoError(f"--report-to {backend} needs the {module} package: "
                        f"pip install 'gvpo-offline[{EXTRA[backend]}]'") from None


_WANDB_HELP = "Set WANDB_API_KEY, run `wandb login`, or set WANDB_MODE=offline (sync later with `wandb sync`)"
_WANDB_OFF = ("offline", "dryrun", "disabled")


def wandb_credentials() -> str | None:
    """Where W&B would find credentials without asking: "WANDB_MODE=offline" (none needed), the
    WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE variables, the netrc entry ``wandb login`` writes for the
    host (WANDB_BASE_URL, default api.wandb.ai), or the api_key of wandb's settings file; None when none."""
    import netrc
    import os
    from configparser import ConfigParser
    from urllib.parse import urlparse

    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in _WANDB_OFF or os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return f"WANDB_MODE={mode or 'disabled'}"
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(name):
            return name
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc_path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        if netrc.netrc(str(netrc_path)).authenticators(host):
            return str(netrc_path)
    except (OSError, netrc.NetrcParseError):
        pass
    settings = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings"
    parser = ConfigParser()
    try:
        parser.read(settings)
        if parser.get("default", "api_key", fallback=None):
            return str(settings)
    except Exception:  # noqa: BLE001 - an unreadable settings file is no credential
        pass
    return None


def _require_wandb_login() -> None:
    """W&B credentials (or offline mode) must be there before step 1: without them wandb.init fails
    (or waits for a key typed at a prompt) once the first step has been logged."""
    if wandb_credentials() is None:
        raise GvpoError(f"--report-to wandb: no W&B credentials found and WANDB_MODE is not offline. {_WANDB_HELP}")
