"""Experiment tracking for ``train``/``eval --report-to``: TensorBoard, Weights & Biases, MLflow, all optional.

Each metrics.jsonl record (stages/train/recipe.py) is also sent, as scalars at its ``step``, to:

    tensorboard  WORKDIR/tb/ (``tensorboard --logdir WORKDIR/tb``); a resumed run purges the events at
                 and after its first step, so a step redone after a crash is not drawn twice.
    wandb        a run in WORKDIR (``WORKDIR/wandb/``), config = the resolved command options; works offline
                 with ``WANDB_MODE=offline`` (sync later with ``wandb sync``). ``WANDB_PROJECT`` (default
                 gvpo-offline), ``WANDB_ENTITY`` and ``WANDB_NAME`` are honoured as wandb users know them.
    mlflow       a run of experiment ``MLFLOW_EXPERIMENT_NAME`` (default gvpo-offline) in the store of
                 ``MLFLOW_TRACKING_URI``, by default a file store in WORKDIR/mlruns (``mlflow ui
                 --backend-store-uri WORKDIR/mlruns``); params = the resolved command options.

Run name: ``--run-name``, else ``WANDB_NAME`` (wandb), else the workdir's folder name. The ids of the
wandb and MLflow runs that ``train`` made are kept in WORKDIR/tracking.json, so ``eval --report-to`` of a
model in that workdir logs into the same runs (and a resumed ``train`` continues them).

Tags: training scalars are ``train/<field>`` for every numeric field of the record except ``step``/``epoch``
(train/loss, train/grad_norm, train/lr, train/log_ratio, train/log_ratio_per_token,
train/implicit_reward_variance, ..., train/tokens_per_second of the step); eval scalars are
``eval/<metric>`` (the model's value), ``eval/delta/<metric>`` (model − reference) and
``eval/generation/<key>`` (mean rewards), at the evaluated model's final training step (:func:`eval_scalars`).
Missing packages are a one-line error before any model work.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from gvpo_offline.runtime.errors import GvpoError

BACKENDS = ("none", "tensorboard", "wandb", "mlflow")
TB_DIR = "tb"
MLFLOW_DIR = "mlruns"
RUN_IDS = "tracking.json"  # WORKDIR/tracking.json: {"wandb": run id, "mlflow": run id} of the train run
PROJECT = "gvpo-offline"  # wandb project / MLflow experiment unless the environment names another
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # backend -> pip extra
MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # backend -> import name


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


def eval_scalars(report: dict[str, Any]) -> dict[str, float]:
    """An eval report (EvalReport.to_json()) as tracker tags: ``eval/<metric>`` (model),
    ``eval/delta/<metric>`` and ``eval/generation/<mean reward key>``; undefined values (None, NaN) left out."""
    out: dict[str, Any] = {}
    out.update({f"eval/{k}": v for k, v in report.get("model", {}).items()})
    out.update({f"eval/delta/{k}": v for k, v in report.get("delta", {}).items()})
    generation = report.get("generation") or {}
    for key in ("model_mean_reward", "reference_mean_reward", "mean_reward_difference"):
        out[f"eval/generation/{key}"] = generation.get(key)
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class Tracker:
    """Sends metrics to the chosen backends; ``tracker(record)`` is train()'s ``on_step``, :meth:`log`
    sends already-named scalars (eval).

    backends: from :func:`parse_report_to`. workdir: where tb/, wandb/, mlruns/ and tracking.json go.
    config: the resolved command options (wandb config, MLflow params). run_name: ``--run-name``.
    continue_run: log into the runs recorded in WORKDIR/tracking.json (eval of that workdir's model,
    a resumed train) instead of starting new ones; ``train`` records its runs there.
    """

    def __init__(self, backends: tuple[str, ...], workdir: Path, config: dict[str, Any],
                 run_name: str | None = None, continue_run: bool = False, record_ids: bool = False):
        self.backends, self.workdir, self.config = backends, Path(workdir), config
        self.run_name, self.continue_run, self.record_ids = run_name, continue_run, record_ids
        self._tb = None
        self._wandb_run = None
        self._mlflow = None  # (MlflowClient, run id)
        for name in backends:  # fail before any model work, not at step 1
            _require(name)
        if "wandb" in backends:
            _require_wandb_login()

    def __call__(self, record: dict[str, Any]) -> None:
        self.log({f"train/{k}": v for k, v in scalars(record).items()}, int(record["step"]), purge=True)

    def log(self, values: dict[str, float], step: int, purge: bool = False) -> None:
        """Send ``values`` (tag -> number) at ``step``. ``purge``: a new TensorBoard writer drops the
        events at and after ``step`` (train: a resumed run redoes them)."""
        if "tensorboard" in self.backends:
            if self._tb is None:  # created at the first step so a resume purges what it redoes
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / TB_DIR), purge_step=step if purge else None)
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
        if "wandb" in self.backends:
            if self._wandb_run is None:
                self._wandb_run = self._start_wandb()
            self._wandb_run.log(dict(values), step=step)
        if "mlflow" in self.backends:
            if self._mlflow is None:
                self._mlflow = self._start_mlflow()
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            import time

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
            for i in range(0, len(metrics), 1000):  # MLflow's batch limit
                client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def _name(self, env: str | None = None) -> str:
        return self.run_name or (os.environ.get(env) if env else None) or self.workdir.resolve().name

    def _start_wandb(self):
        import wandb

        previous = _read_ids(self.workdir).get("wandb") if self.continue_run else None
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT,
                             entity=os.environ.get("WANDB_ENTITY") or None, name=self._name("WANDB_NAME"),
                             dir=str(self.workdir), config=self.config, id=previous,
                             resume="allow" if previous else None)
        except Exception as err:  # noqa: BLE001 - wandb's errors (login, network) have no common base
            detail = " ".join(str(err).split())[:300]
            raise GvpoError(f"--report-to wandb: could not start a run ({type(err).__name__}: {detail}); "
                            f"metrics.jsonl has every step so far. {_WANDB_HELP}") from None
        self._record("wandb", run.id)
        return run

    def _start_mlflow(self):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the file store MLflow 3 keeps in maintenance mode: allowed explicitly for this default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (self.workdir / MLFLOW_DIR).resolve().as_uri()
        client = MlflowClient(tracking_uri=uri)
        previous = _read_ids(self.workdir).get("mlflow") if self.continue_run else None
        if previous:
            client.update_run(previous, status="RUNNING")
            return client, previous
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run_id = client.create_run(experiment_id, run_name=self._name()).info.run_id
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v)[:6000]) for k, v in sorted(self.config.items())]
        for i in range(0, len(params), 100):  # MLflow's batch limit for params
            client.log_batch(run_id, params=params[i:i + 100])
        self._record("mlflow", run_id)
        return client, run_id

    def _record(self, backend: str, run_id: str) -> None:
        if self.record_ids:
            from gvpo_offline.runtime.files import atomic_write_json

            atomic_write_json(self.workdir / RUN_IDS, {**_read_ids(self.workdir), backend: run_id})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id)
            self._mlflow = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_ids(workdir: Path) -> dict[str, str]:
    try:
        ids = json.loads((Path(workdir) / RUN_IDS).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _require(backend: str) -> None:
    module = MODULE[backend]
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
