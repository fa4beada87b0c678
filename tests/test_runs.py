"""Several named runs over one cache (issue 22.3): `train --run NAME` writes WORKDIR/runs/NAME/ and shares
the workdir's cache; eval and plot take --run; plot overlays several runs; locks per run; nothing is
overwritten without --overwrite."""

from __future__ import annotations

import json

import pytest
from cachefixture import STORY_GROUPS
from conftest import write_jsonl

from gvpo_offline.runtime import workdir as workdirs

TRAIN = ("--groups-per-step", 2, "--max-steps", 2, "--lr", 1e-3, "--save-every", 0, "--device", "cpu")


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_named_runs_share_the_cache_and_stay_apart(workdir, tmp_path, run_cli):
    for name, beta in (("beta-0.5", 0.5), ("beta-2", 2.0)):
        result = run_cli("train", "--workdir", workdir, "--run", name, "--beta", beta, *TRAIN)
        assert result.code == 0, result.err
    a, b = workdir / "runs" / "beta-0.5", workdir / "runs" / "beta-2"
    for folder, beta in ((a, 0.5), (b, 2.0)):
        assert json.loads((folder / "model" / "train_config.json").read_text())["beta"] == beta
        assert json.loads((folder / "train_config.json").read_text())["run"] == folder.name
        assert [m["step"] for m in _metrics(folder)] == [1, 2]
        assert not (folder / "manifest.json").exists()  # the cache is the workdir's, not copied
    assert not (workdir / "model").exists() and not (workdir / "metrics.jsonl").exists()
    assert _metrics(a)[1]["loss"] != _metrics(b)[1]["loss"]

    before = (a / "model" / "model.safetensors").read_bytes()
    result = run_cli("train", "--workdir", workdir, "--run", "beta-0.5", "--beta", 1.0, *TRAIN)
    assert result.code == 2 and "holds an earlier training run" in result.err
    assert (a / "model" / "model.safetensors").read_bytes() == before  # nothing overwritten
    result = run_cli("train", "--workdir", workdir, "--run", "../escape", "--beta", 1.0, *TRAIN)
    assert result.code == 2 and "--run '../escape'" in result.err

    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": p, "responses": r, "rewards": w}
                                                    for p, r, w in STORY_GROUPS[:2]])
    report = tmp_path / "eval.json"
    result = run_cli("eval", "--workdir", workdir, "--run", "beta-2", "--data", other, "--bootstrap", 0,
                     "--device", "cpu", "--json", report)
    assert result.code == 0, result.err
    meta = json.loads(report.read_text())["meta"]
    assert meta["model_path"] == str(b / "model") and meta["beta"] == 2.0
    result = run_cli("eval", "--workdir", workdir, "--run", "nope", "--data", other, "--device", "cpu")
    assert result.code == 2 and "train --workdir" in result.err and "--run nope" in result.err

    pytest.importorskip("matplotlib")
    result = run_cli("plot", workdir, "--run", "beta-0.5", "--run", "beta-2")
    assert result.code == 0, result.err
    assert (workdir / "plots" / "runs_loss.png").is_file() and (workdir / "plots" / "runs_drift.png").is_file()
    result = run_cli("plot", workdir, "--run", "beta-2")
    assert result.code == 0, result.err
    assert (b / "plots" / "loss.png").is_file()


def test_locks_are_per_run(workdir, run_cli):
    (workdir / "runs" / "a").mkdir(parents=True)
    with workdirs.lock(workdir / "runs" / "a", "train"):  # a train of run a is going on
        result = run_cli("train", "--workdir", workdir, "--run", "a", "--beta", 1.0, *TRAIN)
        assert result.code == 2 and "another gvpo-offline process" in result.err
        result = run_cli("train", "--workdir", workdir, "--run", "b", "--beta", 1.0, *TRAIN)
        assert result.code == 0, result.err  # another run over the same cache is not blocked
    with workdirs.lock(workdir / "runs" / "b", "train"):  # eval of run b's model waits for its train
        data = workdir.parent / "x.jsonl"  # a real file: a missing one is refused before any lock is taken
        data.write_text(json.dumps({"prompt": "a", "responses": ["b", "c"], "rewards": [1, 0]}) + "\n")
        result = run_cli("eval", "--workdir", workdir, "--run", "b", "--device", "cpu", "--data", data)
        assert result.code == 2 and "another gvpo-offline process" in result.err
    assert workdirs.run_folder(workdir / "runs" / "b" / "model") == workdir / "runs" / "b"
    assert workdirs.run_folder(workdir / "model") == workdir


def test_round2_example_uses_real_options():
    """examples/round2.sh (not run by the suite: a minute of CPU) names only options its commands have."""
    import shlex

    import typer.main

    from conftest import REPO
    from gvpo_offline import cli

    commands = typer.main.get_command(cli.app).commands
    script = (REPO / "examples" / "round2.sh").read_text().replace("\\\n", " ")
    lines = [line.split(">")[0] for line in script.splitlines() if line.strip().startswith("gvpo-offline ")]
    assert len(lines) == 6  # precompute-ref and train twice, sample, eval
    for line in lines:
        words = shlex.split(line)
        command = commands[words[1]]
        known = {opt for param in command.params for opt in param.opts}
        assert {w for w in words if w.startswith("--")} <= known, line
