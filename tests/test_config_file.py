"""`--config FILE`: options from YAML/TOML, command line wins, unknown keys refused, the resolved train
config reusable as --config; the shipped example configs parse against the real CLI; TensorBoard and
wandb (offline) receive the per-step metrics of metrics.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer.main
import yaml
from cachefixture import STORIES, STORY_GROUPS
from conftest import REPO, write_jsonl

from gvpo_offline import cli
from gvpo_offline.runtime import config_file

EXAMPLES = sorted((REPO / "examples" / "configs").glob("*.yaml"))


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_from_yaml_cli_overrides_and_round_trip(story_cache, tmp_path, run_cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir = tmp_path / "run"
    shutil.copytree(story_cache, workdir)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "workdir": str(workdir),
        "model": "ignored/by/train",  # a precompute-ref/eval option: train leaves it alone
        "precompute-ref": {"model": str(STORIES)},
        "train": {"beta": 0.5, "groups-per-step": 2, "max_steps": 3, "lr": 1e-3, "save_every": 0,
                  "device": "cpu", "report_to": "tensorboard"},
    }))
    result = run_cli("train", "--config", cfg, "--lr", "2e-3")  # --beta (required) comes from the file
    assert result.code == 0, result.err
    resolved = json.loads((workdir / "train_config.json").read_text())
    assert resolved["beta"] == 0.5 and resolved["groups_per_step"] == 2 and resolved["max_steps"] == 3
    assert resolved["lr"] == 2e-3  # the command line wins over the file
    assert resolved["warmup_ratio"] == 0.1 and resolved["report_to"] == ["tensorboard"]  # defaults filled in
    saved = json.loads((workdir / "model" / "train_config.json").read_text())  # what training really used
    assert (saved["beta"], saved["lr"], saved["groups_per_step"], saved["max_steps"]) == (0.5, 2e-3, 2, 3)
    first = _metrics(workdir)
    assert [m["step"] for m in first] == [1, 2, 3]
    for m in first:  # the eq. 17 terms logged per step recombine to the step's loss
        terms = m["implicit_reward_variance"] - 2 * m["implicit_reward_covariance"] + m["reward_variance"]
        assert terms == pytest.approx(m["loss"], rel=1e-9, abs=1e-12)

    events = EventAccumulator(str(workdir / "tb"))  # TensorBoard: read the event files back
    events.Reload()
    for tag in ("loss", "grad_norm", "lr", "log_ratio_per_token", "implicit_reward_covariance"):
        scalars = events.Scalars(f"train/{tag}")
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([m[tag] for m in first], rel=1e-6, abs=1e-9)
    tok_s = [s.value for s in events.Scalars("train/tokens_per_second")]
    assert tok_s == pytest.approx([m["tokens"] / m["seconds"] for m in first], rel=1e-6)

    # the resolved config repeats the run exactly
    again = tmp_path / "again.json"
    shutil.copy(workdir / "train_config.json", again)
    shutil.rmtree(workdir / "model")
    shutil.rmtree(workdir / "tb")
    (workdir / "metrics.jsonl").unlink()
    result = run_cli("train", "--config", again)
    assert result.code == 0, result.err
    assert json.loads((workdir / "train_config.json").read_text()) == resolved
    assert [m["loss"] for m in _metrics(workdir)] == [m["loss"] for m in first]


def test_inspect_from_yaml_and_toml(tmp_path, run_cli):
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0]}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {data}\nbeta: 0.1\ninspect:\n  json: true\ntrain:\n  beta: 2\n")
    result = run_cli("inspect", "--config", cfg)  # DATA (a required argument) from the file
    assert result.code == 0, result.err
    assert json.loads(result.out)["stats"]["n_groups"] == 1
    toml = tmp_path / "c.toml"
    toml.write_text(f'[inspect]\ndata = ["{data}"]\nlayout = "flat"\n')
    result = run_cli("inspect", "--config", toml)
    assert result.code == 2 and "flat" in result.err  # the file's --layout flat reached the data layer
    result = run_cli("inspect", "--config", toml, "--layout", "grouped", "--json")
    assert result.code == 0 and json.loads(result.out)["stats"]["n_groups"] == 1


def test_precompute_ref_model_and_data_from_the_file(tmp_path, run_cli):
    from gvpo_offline.stages import reference

    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "responses": r, "rewards": w} for p, r, w in STORY_GROUPS[:2]])
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(yaml.safe_dump({"workdir": str(tmp_path / "run"), "precompute-ref": {
        "data": str(data), "model": str(STORIES), "eval-fraction": 0.0, "max_length": 64, "max_prompt_length": 32,
        "device": "cpu"}}))
    result = run_cli("precompute-ref", "--config", cfg)  # DATA and the required --model from the file
    assert result.code == 0, result.err
    manifest = reference.read_manifest(tmp_path / "run")
    assert Path(manifest.model_path) == STORIES and manifest.counts["train"].groups == 2
    assert manifest.tokenize_config.max_length == 64


@pytest.mark.parametrize("text, message", [
    ("bta: 1\n", "unknown key 'bta' (did you mean 'beta'?)"),
    ("inspect:\n  jsn: true\n", "unknown key 'jsn' in section 'inspect' (did you mean 'json'?)"),
    ("layout: [unclosed\n", "not valid yaml"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_config_is_one_line(tmp_path, run_cli, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    result = run_cli("inspect", "x.jsonl", "--config", cfg)
    assert result.code == 2
    assert message in result.err and str(cfg) in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    result = run_cli("inspect", "x.jsonl", "--config", tmp_path / "missing.yaml")
    assert result.code == 2 and "missing.yaml: no such file" in result.err


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_parse_against_the_cli(path):
    group = typer.main.get_command(cli.app)
    data = config_file.load_file(path)
    sections = [name for name, value in data.items() if isinstance(value, dict)]
    assert sections and set(sections) <= set(group.commands)
    for name in sections:
        command = group.commands[name]
        known = set(config_file._command_keys(command))
        unknown = {k.replace("-", "_") for k in data[name]} - known
        assert not unknown, f"{path.name} [{name}]: unknown keys {unknown}"
        parent = group.make_context("gvpo-offline", [name, "--config", str(path)], resilient_parsing=True)
        with command.make_context(name, ["--config", str(path)], parent=parent) as ctx:
            for key, value in data[name].items():  # every value converts to the option's type
                param = config_file._command_keys(command)[key.replace("-", "_")]
                got = ctx.params[param.name]
                want = value if not isinstance(value, list) else tuple(value)
                assert got == want or (isinstance(got, list) and tuple(got) == want), (name, key, got, value)
            assert ctx.params.get("workdir") in (None, data.get("workdir"))


def test_wandb_offline_run_gets_metrics_and_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from gvpo_offline.runtime.tracking import Tracker, parse_report_to

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = [{"step": s, "epoch": 0, "loss": 1.0 / s + 0.123456789, "grad_norm": 2.5 * s + 0.25, "lr": 1e-4,
                "tokens": 1000, "seconds": 0.5} for s in (1, 2)]
    with Tracker(parse_report_to(["none,wandb"]), tmp_path / "run", {"beta": 0.375, "lr": 1e-4}) as tracker:
        for record in records:
            tracker(record)
    import wandb

    wandb.teardown()  # stop wandb's background service: the run file is complete after it
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    log = run_file.read_bytes()  # protobuf records: keys and JSON values are stored as plain strings
    for record in records:
        assert json.dumps(record["loss"]).encode() in log and json.dumps(record["grad_norm"]).encode() in log
    assert b"train/loss" in log and b"train/tokens_per_second" in log and b"2000" in log  # 1000 tokens / 0.5 s
    assert b"beta" in log and b"0.375" in log


def test_report_to_parsing_and_missing_package(monkeypatch):
    import builtins

    from gvpo_offline.runtime.errors import GvpoError
    from gvpo_offline.runtime.tracking import Tracker, parse_report_to

    assert parse_report_to(["tensorboard,wandb", "none", "tensorboard"]) == ("tensorboard", "wandb")
    assert parse_report_to(None) == () and parse_report_to(["none"]) == ()
    with pytest.raises(GvpoError, match="--report-to 'comet'"):
        parse_report_to(["comet"])
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(GvpoError, match=r"pip install 'gvpo-offline\[wandb\]'"):
        Tracker(("wandb",), Path("."), {})
