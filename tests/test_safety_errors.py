"""Issue 20, "tracebacks that must be one line": every failure a user can cause or meet (a bad input file,
an out-of-range option, a full disk, an unreadable folder, missing credentials) is one line naming the
file, line/row and field, exit 2 for bad input and 1 for OS errors, and leaves nothing half-written.
One test per class of failure; each example in it failed with a traceback (or a wrong message) before."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from cachefixture import STORIES
from conftest import REPO, write_jsonl

DATA = REPO / "sample_data"
TRAIN = ["--beta", "0.1", "--device", "cpu", "--groups-per-step", "2", "--lr", "1e-3"]


def one_line(res, code: int, *needles: str) -> None:
    """The CLI exited with ``code``, and its last stderr line, the only error line (progress lines may come
    before it; a traceback may not), holds every needle."""
    lines = [line for line in res.err.strip().splitlines() if line.strip()]
    assert res.code == code, res.err
    assert lines and lines[-1].startswith("error: "), res.err
    assert "Traceback" not in res.err and sum(line.startswith("error") for line in lines) == 1, res.err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture
def cache(workdir):
    """A private copy of conftest's stories260K cache (4 groups, train split), built once per module."""
    return workdir


# ---- 1. files the tool reads: wrong encoding, shape or types ------------------------------------------------


def test_a_non_utf8_config_file_is_one_line(run_cli, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"beta: 0.1\nworkdir: caf\xe9\n")
    one_line(run_cli("train", "--config", config), 2, str(config), "line 2", "not UTF-8")


METRIC = {"step": 1, "epoch": 0, "loss": 1.5, "log_ratio": -0.1, "log_ratio_per_token": -0.01,
          "implicit_reward_variance": 0.02, "implicit_reward_covariance": 0.05, "reward_variance": 2.0}


def _line(**changes) -> str:
    return json.dumps({**METRIC, **changes}) + "\n"


# metrics.jsonl contents -> what the error names (file and line are always named)
BAD_METRICS = {
    "empty": (b"", ["no training steps logged"]),
    "not JSON in the middle": ((_line() + "{oops\n" + _line(step=3)).encode(), ["line 2", "not JSON"]),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00" + b"\n" + _line().encode(), ["line 1", "not UTF-8"]),
    "a JSON list per line": ((_line() + "[1, 2]\n").encode(), ["line 2", "expected a JSON object, got a list"]),
    "a whole JSON array": (json.dumps([METRIC, METRIC]).encode() + b"\n", ["line 1", "got a list"]),
    "a number per line": (b"3\n", ["line 1", "got a number"]),
    "missing keys": ((_line() + json.dumps({"step": 2}) + "\n").encode(), ["line 2", "field 'loss'", "missing"]),
    "wrong types": ((_line() + _line(step=2, loss="abc")).encode(), ["line 2", "field 'loss'", "expected a number"]),
    "NaN strings": ((_line(loss="NaN")).encode(), ["line 1", "field 'loss'", '"NaN"']),
    "a boolean": ((_line(reward_variance=True)).encode(), ["field 'reward_variance'"]),
    "a step that is not an integer": ((_line(step="1")).encode(), ["field 'step'", "integer"]),
    "a later line without a term": ((_line() + json.dumps({**METRIC, "step": 2, "reward_variance": None}) + "\n")
                                    .encode(), ["line 2", "field 'reward_variance'"]),
}


@pytest.mark.parametrize("content, needles", BAD_METRICS.values(), ids=BAD_METRICS.keys())
def test_plot_refuses_odd_metrics_in_one_line_and_writes_nothing(run_cli, tmp_path, content, needles):
    pytest.importorskip("matplotlib")
    from gvpo_offline.runtime.workdir import claim

    claim(tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(content)
    one_line(run_cli("plot", tmp_path), 2, str(tmp_path / "metrics.jsonl"), *needles)
    assert not (tmp_path / "plots").exists()


def test_resume_drops_undecodable_metrics_lines_like_torn_ones(cache, run_cli):
    """train --resume cuts metrics.jsonl back to its checkpoint; a line that is not UTF-8 used to crash it."""
    args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "2", "--save-every", "1"]
    assert run_cli(*args).code == 0
    first = (cache / "metrics.jsonl").read_text().splitlines()[0]
    shutil.rmtree(cache / "checkpoints" / "step-2")
    with open(cache / "metrics.jsonl", "ab") as fh:
        fh.write(b"\xff\xfe garbage\n")
    res = run_cli(*args, "--resume")
    assert res.code == 0, res.err
    lines = (cache / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first and json.loads(lines[1])["step"] == 2


GOOD_REPORT = {
    "model": {"pairwise_accuracy": 0.7, "spearman": 0.4, "top1_agreement": 0.6, "gvpo_loss": 1.5},
    "reference": {"pairwise_accuracy": 0.5, "spearman": None, "top1_agreement": 0.3, "gvpo_loss": 2.0},
    "intervals": {"model": {"pairwise_accuracy": [0.6, 0.8]}, "delta": {"spearman": None}},
    "counts": {"groups": 3},
    "generation": {"prompts": 2, "samples_per_prompt": 2, "model_mean_reward": 1.0, "reference_mean_reward": 0.5,
                   "difference_interval": [0.1, 0.9], "model_rewards": [[1, 2], [0, 1]],
                   "reference_rewards": [[0, 1], [0, 0]]},
}


def _report(path: str, value) -> bytes:
    """GOOD_REPORT with the field at dotted ``path`` set to ``value``."""
    report = json.loads(json.dumps(GOOD_REPORT))
    *parents, last = path.split(".")
    node = report
    for key in parents:
        node = node[key]
    node[last] = value
    return json.dumps(report).encode()


BAD_REPORTS = {
    "binary": (b"\xff\xfe\x00garbage", ["not an eval JSON", "not UTF-8"]),
    "a list": (b"[1, 2]", ["not an eval JSON"]),
    "model is a list": (_report("model", [0.7]), ["field 'model'", "an object"]),
    "a metric string": (_report("model.spearman", "NaN"), ["field 'model.spearman'", "a number or null"]),
    "an interval of 3": (_report("intervals.model.pairwise_accuracy", [1, 2, 3]),
                         ["field 'intervals.model.pairwise_accuracy'", "[low, high]"]),
    "a delta interval string": (_report("intervals.delta.spearman", "wide"), ["field 'intervals.delta.spearman'"]),
    "intervals a string": (_report("intervals", "none"), ["field 'intervals'"]),
    "rewards not nested": (_report("generation.model_rewards", [1, 2]), ["field 'generation.model_rewards'"]),
    "rewards empty": (_report("generation.reference_rewards", [[]]), ["field 'generation.reference_rewards'"]),
    "a mean reward string": (_report("generation.model_mean_reward", "1.0"), ["field 'generation.model_mean_reward'"]),
    "generation a list": (_report("generation", []), ["field 'generation'"]),
}


@pytest.mark.parametrize("content, needles", BAD_REPORTS.values(), ids=BAD_REPORTS.keys())
def test_plot_refuses_an_odd_eval_json_in_one_line_and_writes_nothing(run_cli, tmp_path, content, needles):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    (tmp_path / "metrics.jsonl").write_text(_line() + _line(step=2))
    (tmp_path / "eval.json").write_bytes(content)
    one_line(run_cli("plot", tmp_path, "--out-dir", out), 2, str(tmp_path / "eval.json"), *needles)
    assert not out.exists()


def test_plot_skips_only_a_torn_last_line_and_plots_the_good_report(run_cli, tmp_path):
    """The reference point of the two tests above: a crash can cut the last line of metrics.jsonl (no
    newline after it), which is skipped; with the eval fields as eval writes them, plot succeeds."""
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text(_line() + _line(step=2) + '{"step": 3, "lo')
    (tmp_path / "eval.json").write_text(json.dumps(GOOD_REPORT))
    res = run_cli("plot", tmp_path, "--out-dir", tmp_path / "figures")
    assert res.code == 0, res.err
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["drift.png", "eval.png", "loss.png",
                                                                         "rewards.png"]


UF_ROW = {"instruction": "Say hi", "completions": [
    {"response": "hi", "overall_score": 5, "annotations": {"honesty": {"Rating": "4"}}},
    {"response": "hello", "overall_score": 3, "annotations": {"honesty": {"Rating": "2"}}},
]}


@pytest.mark.parametrize("source, row, options, needles", [
    ("ultrafeedback", {**UF_ROW, "completions": [{**UF_ROW["completions"][0], "annotations": [{"Rating": 1}]}]},
     ["--score-field", "honesty"], ["line 2", "field 'completions[0].annotations'", "got list"]),
    ("ultrafeedback", {**UF_ROW, "completions": [UF_ROW["completions"][0], {"response": "x", "annotations": "good"}]},
     ["--score-field", "helpfulness"], ["line 2", "field 'completions[1].annotations'", "got str"]),
    ("oasst", {"message_tree_id": "t", "prompt": {"message_id": "m", "role": "prompter", "text": "q", "replies": 5}},
     [], ["line 2", "replies", "expected a list"]),
])
def test_converted_rows_with_fields_of_another_type_are_one_line(run_cli, tmp_path, source, row, options, needles):
    good = UF_ROW if source == "ultrafeedback" else row | {"prompt": {**row["prompt"], "replies": []}}
    data = write_jsonl(tmp_path / "in.jsonl", [good, row])
    out = tmp_path / "out.jsonl"
    one_line(run_cli("convert", source, data, "-o", out, *options), 2, str(data), *needles)
    assert not out.exists()


@pytest.mark.parametrize("name, content, needles", [
    ("in.parquet", b"not a parquet file", ["not a Parquet file"]),
    ("in.jsonl.gz", b"\x1f\x8b\x08\x00garbage", ["corrupt gzip"]),
])
def test_corrupt_convert_inputs_are_one_line_not_an_interrupt(run_cli, tmp_path, name, content, needles):
    """A damaged .jsonl.gz used to end in EOFError, which click reports as "interrupted", exit 130."""
    data = tmp_path / name
    data.write_bytes(content)
    one_line(run_cli("convert", "ultrafeedback", data, "-o", tmp_path / "out.jsonl"), 2, str(data), *needles)
    assert not (tmp_path / "out.jsonl").exists()


# ---- 2. option values that are accepted, then fail later ----------------------------------------------------


@pytest.mark.parametrize("command, value, message", [
    ("train", "inf", "--lora-alpha must be a finite number > 0"),
    ("train", "nan", "--lora-alpha must be a finite number > 0"),
    ("sample", "inf", "--temperature must be a finite number >= 0"),
    ("sample", "nan", "--temperature must be a finite number >= 0"),
    ("convert", "helpfulness=inf", "--weights 'helpfulness=inf': expected attribute=number pairs (finite numbers)"),
])
def test_non_finite_option_values_are_refused_up_front(cache, run_cli, tmp_path, command, value, message):
    if command == "train":
        args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--lora-r", "2", "--lora-alpha", value]
    elif command == "convert":
        rows = [{"prompt": "p", "response": r, "helpfulness": 2, "correctness": 1, "coherence": 3, "complexity": 1,
                 "verbosity": 2} for r in ("a", "b")]
        args = ["convert", "helpsteer2", write_jsonl(tmp_path / "hs.jsonl", rows), "-o", tmp_path / "out.jsonl",
                "--weights", value]
    else:
        prompts = tmp_path / "p.txt"
        prompts.write_text("Once upon a time\n")
        args = ["sample", prompts, "--model", STORIES, "--k", "2", "--reward", f"{DATA / 'reward.py'}:kindness",
                "-o", tmp_path / "out.jsonl", "--device", "cpu", "--temperature", value]
    one_line(run_cli(*args), 2, message)
    assert not (cache / "metrics.jsonl").exists() and not (tmp_path / "out.jsonl").exists()


# ---- 3. a full disk while writing: one line, exit 1, nothing half-written ----------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("what", ["model", "lora adapter", "checkpoint"])
def test_disk_full_in_safetensors_is_one_line_and_leaves_nothing(cache, run_cli, monkeypatch, what):
    """safetensors reports a full disk as SafetensorError("... No space left on device (os error 28)"), not
    an OSError: it used to end in a traceback, with the temp folder of the model removed or not."""
    import peft.peft_model
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)  # what got written before the disk filled up
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    before = _tree(cache)
    extra = {"model": [], "lora adapter": ["--lora-r", "2"], "checkpoint": ["--save-every", "1", "--max-steps", "2"]}
    res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0", *extra[what])
    target = cache / ("checkpoints" if what == "checkpoint" else "model")
    one_line(res, 1, "No space left on device", str(target))
    after = _tree(cache)
    assert not [name for name in after if ".gvpo-tmp-" in name or ".gvpo-old-" in name]
    assert not [name for name in after if name.startswith(("model/", "checkpoints/"))]
    assert {name: after[name] for name in before} == before  # the cache is untouched


@pytest.mark.parametrize("writer", ["sample", "train metrics"])
def test_disk_full_while_appending_leaves_the_file_as_it_was(cache, run_cli, tmp_path, monkeypatch, writer):
    """The appending writers (sample's output, train's metrics.jsonl) cut the file back to its last complete
    record when a write or fsync fails, instead of leaving lines of unknown state after it."""
    real_fsync = os.fsync

    def full(fd):
        if os.fstat(fd).st_size > size_before:  # the append, not the atomic writes elsewhere
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    if writer == "sample":
        prompts = tmp_path / "p.txt"
        prompts.write_text("Once upon a time\nThe dog\n")
        out = tmp_path / "out.jsonl"
        out.write_text('{"id": "0", "note": "mine, kept"}\n')
        args = ["sample", prompts, "--model", STORIES, "--k", "2", "--reward", f"{DATA / 'reward.py'}:kindness",
                "-o", out, "--device", "cpu", "--max-new-tokens", "4"]
    else:
        out = cache / "metrics.jsonl"
        args = ["train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0"]
    before = out.read_bytes() if out.exists() else b""
    size_before = len(before)
    monkeypatch.setattr(os, "fsync", full)
    res = run_cli(*args)
    assert res.code == 1 and "No space left on device" in res.err and "Traceback" not in res.err, res.err
    assert (out.read_bytes() if out.exists() else b"") == before


# ---- 4. missing credentials are found before step 1 ---------------------------------------------------------


class _FakeWandb:
    """What train uses of wandb; ``init`` fails as the real one does without an API key and no terminal."""

    def __init__(self):
        self.runs = []

    def init(self, **kwargs):
        import os

        if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline"
                or (Path(os.environ["HOME"]) / ".netrc").is_file()):
            raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
        run = type("Run", (), {"id": "fake-run", "log": lambda self, values, step: None, "finish": lambda self: None})()
        self.runs.append(kwargs)
        return run


@pytest.mark.parametrize("setup, accepted", [("nothing", False), ("offline", True), ("netrc", True)])
def test_report_to_wandb_needs_credentials_before_the_first_step(cache, run_cli, tmp_path, monkeypatch, setup,
                                                                   accepted):
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for name in [k for k in os.environ if k.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    if setup == "offline":
        monkeypatch.setenv("WANDB_MODE", "offline")
    if setup == "netrc":
        (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
        (home / ".netrc").chmod(0o600)
    res = run_cli("train", "--workdir", cache, *TRAIN, "--max-steps", "1", "--save-every", "0", "--report-to", "wandb")
    if accepted:
        assert res.code == 0 and len(fake.runs) == 1, res.err
    else:
        one_line(res, 2, "--report-to wandb", "WANDB_API_KEY", "WANDB_MODE=offline")
        assert not (cache / "metrics.jsonl").exists() and not (cache / "model").exists()


# ---- 5. what the user may not read is "permission denied", not "empty" or "no such file" -------------------


def _deny(monkeypatch, folder: Path) -> None:
    """Act as if ``folder`` had mode 0o000 for a non-root user: listing it, or looking at anything inside,
    fails with EACCES (the suite runs as root, which chmod does not stop)."""
    real_stat, real_scandir, real_listdir = os.stat, os.scandir, os.listdir

    def denied(path) -> bool:
        return Path(os.fsdecode(path)).is_relative_to(folder) and Path(os.fsdecode(path)) != folder

    def fake_stat(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and denied(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_stat(path, *args, **kwargs)

    def fake_list(real):
        def listing(path="."):
            if Path(os.fsdecode(path)) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real(path)
        return listing

    monkeypatch.setattr(os, "stat", fake_stat)
    monkeypatch.setattr(os, "scandir", fake_list(real_scandir))
    monkeypatch.setattr(os, "listdir", fake_list(real_listdir))


@pytest.mark.parametrize("which", ["the folder", "a file in it", "a glob in it"])
def test_unreadable_data_is_permission_denied(run_cli, tmp_path, monkeypatch, which):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0]}])
    arg = {"the folder": folder, "a file in it": folder / "train.jsonl", "a glob in it": folder / "*.jsonl"}[which]
    _deny(monkeypatch, folder)
    one_line(run_cli("inspect", arg), 1, "Permission denied", str(folder))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every folder")
def test_unreadable_data_is_permission_denied_for_real(run_cli, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0]}])
    folder.chmod(0)
    try:
        one_line(run_cli("inspect", folder), 1, "Permission denied")
        one_line(run_cli("inspect", folder / "train.jsonl"), 1, "Permission denied")
    finally:
        folder.chmod(0o755)


# ---- 6. errors found after loading still name the file and line ---------------------------------------------


CHAT = [{"role": "user", "content": "Tell me a story"}]


@pytest.mark.parametrize("command", ["precompute-ref", "inspect", "inspect parquet", "sample"])
def test_chat_prompts_without_a_template_name_the_first_chat_row(run_cli, tmp_path, command):
    """stories260K has no chat template: the error names the file and line (row) of the first chat prompt."""
    rows = [{"prompt": "Once upon a time", "responses": ["a", "b"], "rewards": [1, 0]},
            {"prompt": "The dog", "responses": ["c", "d"], "rewards": [0, 1]},
            {"prompt": CHAT, "responses": ["e", "f"], "rewards": [1, 0]}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    where = f"{data}: line 3"
    if command == "precompute-ref":
        args = ["precompute-ref", data, "--model", STORIES, "--workdir", tmp_path / "run", "--device", "cpu",
                "--eval-fraction", "0"]
    elif command.startswith("inspect"):
        if command == "inspect parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            data = tmp_path / "data.parquet"
            pq.write_table(pa.Table.from_pylist([{**row, "prompt": CHAT} for row in rows]), data)  # one type a column
            where = f"{data}: row 0"
        args = ["inspect", data, "--model", STORIES]
    else:
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Once"}, {"prompt": "Then"}, {"prompt": CHAT}])
        where = f"{prompts}: line 3"
        args = ["sample", prompts, "--model", STORIES, "--k", "2", "--reward", f"{DATA / 'reward.py'}:kindness",
                "-o", tmp_path / "out.jsonl", "--device", "cpu", "--max-new-tokens", "2", "--batch-size", "2"]
    one_line(run_cli(*args), 2, where, "no chat template", "--prompt-template")


@pytest.mark.parametrize("beta, options, needles", [
    ("abc", ["--beta", "0.1"], None),  # --beta wins over a bad recorded β: no crash comparing the two
    (float("inf"), [], ["train_config.json", "field 'beta'", "finite number > 0"]),
    ([0.1], [], ["train_config.json", "field 'beta'"]),
])
def test_a_model_train_config_of_another_shape_is_one_line(cache, run_cli, tmp_path, beta, options, needles):
    model = tmp_path / "model"
    shutil.copytree(STORIES, model)
    (model / "train_config.json").write_text(json.dumps({"beta": beta, "loss": ["gvpo"]}))
    res = run_cli("eval", "--workdir", cache, "--model", model, "--device", "cpu", "--bootstrap", "0",
                  "--data", write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Once", "responses": ["a", "b"],
                                                                "rewards": [1, 0]}]), *options)
    if needles is None:
        assert res.code == 0, res.err
    else:
        one_line(res, 2, *needles)


@pytest.mark.parametrize("damage", ["cut short", "not safetensors"])
def test_a_damaged_weights_file_is_one_line(run_cli, tmp_path, damage):
    """A model.safetensors cut short (a full disk, an interrupted copy) or overwritten raised safetensors'
    SafetensorError with a traceback when the model was loaded."""
    model = tmp_path / "model"
    shutil.copytree(STORIES, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000] if damage == "cut short" else b"garbage")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    res = run_cli("sample", prompts, "--model", model, "--k", "2", "--reward", f"{DATA / 'reward.py'}:kindness",
                  "-o", tmp_path / "out.jsonl", "--device", "cpu")
    one_line(res, 2, str(model), "damaged or incomplete weights file")
    assert not (tmp_path / "out.jsonl").exists()
