"""Logs without a terminal: plain progress lines, the train setting and summary, timestamps in metrics."""

from __future__ import annotations

import io
import json
import re
import shutil
import time

from cachefixture import STORIES
from rich.console import Console

from gvpo_offline import cli
from gvpo_offline.runtime.progress import duration, plural, progress


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=100), buffer  # a file, not a terminal


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setenv("GVPO_LOG_EVERY", "0")  # a line after every update
    console, buffer = plain_console()
    assert not console.is_terminal
    describe = lambda fields, elapsed: f"loss {fields['loss']:.3f}"  # noqa: E731
    with progress(console, "train", 4, unit="step", describe=describe) as update:
        assert buffer.getvalue() == ""  # nothing before the first step (no "loss nan")
        for step in range(1, 5):
            update(completed=step, loss=1.0 / step)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 4  # one per update; the end adds none when the last state was printed
    assert lines[0].startswith("train: step 1/4 (25%)  loss 1.000  elapsed 0:00:00  ETA ")
    assert lines[-1].startswith("train: step 4/4 (100%)  loss 0.250")
    assert "ETA" not in lines[-1]


def test_plain_lines_are_rate_limited_and_the_end_is_always_printed(monkeypatch):
    monkeypatch.setenv("GVPO_LOG_EVERY", "3600")
    console, buffer = plain_console()
    with progress(console, "sampling", 10, unit="responses") as update:
        for _ in range(10):
            update(advance=1)
    assert buffer.getvalue().splitlines() == ["sampling: responses 10/10 (100%)  elapsed 0:00:00"]


def test_nothing_when_disabled_or_nothing_done(monkeypatch):
    monkeypatch.setenv("GVPO_LOG_EVERY", "0")
    console, buffer = plain_console()
    with progress(console, "x", 3, enabled=False) as update:
        update(advance=3)
    with progress(console, "y", 3):
        pass
    assert buffer.getvalue() == ""


def test_terminal_bar_shows_no_nan_before_the_first_step():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with progress(console, "train", 5, unit="step", describe=lambda f, e: f"loss {f['loss']:.4g}") as update:
        console.print("started")  # the bar is drawn at least once around this print
        update(completed=1, loss=0.5)
    text = buffer.getvalue()
    assert "nan" not in text and "loss 0.5" in text


def test_helpers():
    assert duration(3725.2) == "1:02:05"
    assert plural(1, "step") == "1 step" and plural(2, "step") == "2 steps" and plural(0, "step") == "0 steps"


# ---- train without a terminal --------------------------------------------------------------------


def test_train_log_without_a_terminal(story_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GVPO_LOG_EVERY", "0")
    workdir = tmp_path / "run"
    shutil.copytree(story_cache, workdir)
    before = time.time()
    cli.main(["train", "--workdir", str(workdir), "--beta", "1", "--lr", "1e-3", "--groups-per-step", "2",
              "--max-steps", "3", "--save-every", "0", "--device", "cpu"])  # returns: exit code 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    setting = next(line for line in lines if line.startswith("train: cpu"))
    assert "float32" in setting and "260,032 trainable parameters" in setting
    assert "4 groups (14 responses), 2 groups per step" in setting and "3 steps" in setting
    steps = [line for line in lines if re.match(r"train: step \d/3 ", line)]
    assert [s.split()[2] for s in steps] == ["1/3", "2/3", "3/3"]
    assert all(k in steps[0] for k in ("loss ", "|g| ", "lr ", "tok/s", "ETA "))
    assert "nan" not in err
    summary = next(line for line in lines if line.startswith("train done: "))
    assert summary.startswith("train done: 3 steps in 0:00:")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    clipped = sum(r["grad_norm"] > 1.0 for r in records)
    norms = [r["grad_norm"] for r in records]
    clip = next(line for line in lines if line.startswith("gradient clipped"))
    assert clip.startswith(f"gradient clipped to 1 on {clipped} of 3 steps ({clipped / 3:.0%}) "
                           f"(|g| before clipping {min(norms):.3g}–{max(norms):.3g})")
    assert ("Under AdamW this is expected" in clip) == (clipped > 0)  # explained, not alarming
    assert lines[-1].startswith("choosing lr and β:") and "drift" in lines[-1] and "eq. 17" in lines[-1]
    assert f"final loss {records[-1]['loss']:.4g}" in summary and str(workdir / "model") in summary
    loss_note = json.loads((workdir / "model" / "train_config.json").read_text())["loss_formula"]
    assert "(m/(2n)) × this per optimizer step" in loss_note and "½" not in loss_note
    assert before <= records[0]["time"] <= records[-1]["time"] <= time.time()
    assert 0 < records[0]["elapsed"] < records[1]["elapsed"] < records[2]["elapsed"]


def test_summary_grammar_after_one_step(story_cache, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(story_cache, workdir)
    cli.main(["train", "--workdir", str(workdir), "--beta", "1", "--max-steps", "1", "--save-every", "0",
              "--device", "cpu"])
    err = capsys.readouterr().err
    assert "train done: 1 step in" in err and "1 steps" not in err


def test_precompute_ref_prints_plain_progress_without_a_terminal(tmp_path, monkeypatch, run_cli):
    from conftest import write_jsonl

    monkeypatch.setenv("GVPO_LOG_EVERY", "0")
    rows = [{"prompt": f"Story {g}", "responses": ["A dog ran.", "A cat sat down."], "rewards": [0, 1]}
            for g in range(3)]
    result = run_cli("precompute-ref", write_jsonl(tmp_path / "d.jsonl", rows), "--model", STORIES,
                     "--workdir", tmp_path / "w", "--device", "cpu")
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("reference log-probs: responses")]
    assert lines and lines[-1].startswith("reference log-probs: responses 6/6 (100%)") and "tok/s" in lines[-1]
