"""Experiment trackers as users know them: WANDB_* variables and --run-name honoured, report_to stored
split, eval metrics logged under eval/... at the model's final step, MLflow (a file store read back with
mlflow's own client) beside TensorBoard."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from cachefixture import STORY_GROUPS
from conftest import write_jsonl

from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.tracking import Tracker, eval_scalars, parse_report_to


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_parse_report_to_knows_mlflow():
    assert parse_report_to(["tensorboard,mlflow", "wandb"]) == ("tensorboard", "mlflow", "wandb")
    with pytest.raises(GvpoError, match="--report-to 'comet'"):
        parse_report_to(["comet"])


def test_wandb_environment_and_run_name(monkeypatch, tmp_path):
    """WANDB_PROJECT/ENTITY/NAME reach wandb.init (they were overridden by fixed arguments); --run-name wins
    over WANDB_NAME; the run id is kept so that eval logs into the same run."""
    calls, logged = [], []

    class Run:
        id = "abc123"

        def log(self, values, step):
            logged.append((values, step))

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.setenv("WANDB_ENTITY", "my-team")
    monkeypatch.setenv("WANDB_NAME", "from-env")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # credentials (tracking._require_wandb_login)
    with Tracker(("wandb",), tmp_path, {"beta": 0.1}, record_ids=True) as tracker:
        tracker({"step": 1, "loss": 0.5})
    with Tracker(("wandb",), tmp_path, {}, run_name="from-flag", continue_run=True) as tracker:
        tracker.log({"eval/spearman": 0.25}, 7)
    assert (calls[0]["project"], calls[0]["entity"], calls[0]["name"]) == ("my-project", "my-team", "from-env")
    assert calls[0]["id"] is None and calls[1]["id"] == "abc123" and calls[1]["resume"] == "allow"
    assert calls[1]["name"] == "from-flag"
    assert logged == [({"train/loss": 0.5}, 1), ({"eval/spearman": 0.25}, 7)]
    monkeypatch.delenv("WANDB_PROJECT")
    monkeypatch.delenv("WANDB_NAME")
    Tracker(("wandb",), tmp_path / "wd", {})({"step": 1, "loss": 0.5})
    assert (calls[2]["project"], calls[2]["name"]) == ("gvpo-offline", "wd")


def test_eval_scalars_names_and_skips_undefined():
    report = {"model": {"spearman": 0.5, "top1_agreement": None}, "delta": {"spearman": 0.5},
              "generation": {"model_mean_reward": 2.0, "reference_mean_reward": 1.5, "mean_reward_difference": 0.5}}
    assert eval_scalars(report) == {"eval/spearman": 0.5, "eval/delta/spearman": 0.5,
                                    "eval/generation/model_mean_reward": 2.0,
                                    "eval/generation/reference_mean_reward": 1.5,
                                    "eval/generation/mean_reward_difference": 0.5}


def test_train_and_eval_report_to_mlflow_and_tensorboard(workdir, tmp_path, run_cli, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_cli("train", "--workdir", workdir, "--beta", 0.5, "--groups-per-step", 2, "--max-steps", 3,
                     "--lr", 1e-3, "--save-every", 0, "--device", "cpu", "--report-to", "tensorboard,mlflow",
                     "--run-name", "beta-0.5")
    assert result.code == 0, result.err
    resolved = json.loads((workdir / "train_config.json").read_text())
    assert resolved["report_to"] == ["tensorboard", "mlflow"] and resolved["run_name"] == "beta-0.5"
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": p, "responses": r, "rewards": w}
                                                       for p, r, w in STORY_GROUPS[:2]])
    report_json = tmp_path / "eval.json"
    result = run_cli("eval", "--workdir", workdir, "--data", heldout, "--device", "cpu", "--bootstrap", 0,
                     "--json", report_json, "--report-to", "mlflow", "--report-to", "tensorboard")
    assert result.code == 0, result.err
    report = json.loads(report_json.read_text())

    client = MlflowClient(tracking_uri=(workdir / "mlruns").resolve().as_uri())  # read back by mlflow itself
    experiment = client.get_experiment_by_name("gvpo-offline")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "beta-0.5" and json.loads(run.data.params["beta"]) == 0.5
    first = _metrics(workdir)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(m["step"], pytest.approx(m["loss"])) for m in first]
    accuracy = client.get_metric_history(run.info.run_id, "eval/pairwise_accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(3, pytest.approx(report["model"]["pairwise_accuracy"]))]
    delta = client.get_metric_history(run.info.run_id, "eval/delta/gvpo_loss")
    assert delta[0].value == pytest.approx(report["delta"]["gvpo_loss"])

    events = EventAccumulator(str(workdir / "tb"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3]
    (spearman,) = events.Scalars("eval/spearman")
    assert spearman.step == 3 and spearman.value == pytest.approx(report["model"]["spearman"], rel=1e-6)
