"""A user's first hour (issue 22) and fixed costs per command (issue 23): checks before work, CLI
habits (aliases, key=value overrides, --version, help on every option), and what --help imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, write_jsonl

STORIES = REPO / "sample_data" / "stories260K"
ROWS = [{"prompt": f"p{i // 2}", "response": f"r{i}", "reward": i % 2} for i in range(8)]


def _no_model_work(monkeypatch):
    """Make any model or tokenizer loading fail loudly: a check that runs first never reaches them."""
    import gvpo_offline.stages.evaluate.heldout  # noqa: F401 - imported first, so that the stages bind the real
    import gvpo_offline.stages.reference.compute  # noqa: F401   functions by name, not the patched ones (the
    import gvpo_offline.stages.train.recipe  # noqa: F401        patch is undone after the test; their names stay)
    from gvpo_offline.model import hub, loading

    def refuse(*_args, **_kwargs):
        raise AssertionError("model work started before the data was checked")

    for module, name in ((hub, "resolve_model"), (loading, "load_tokenizer"), (loading, "load_model")):
        monkeypatch.setattr(module, name, refuse)


# ---- 22.8: checks before work ------------------------------------------------------------------


def test_precompute_reports_bad_data_before_any_model_work(tmp_path, run_cli, monkeypatch):
    _no_model_work(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    res = run_cli("precompute-ref", tmp_path / "nope.jsonl", "--model", STORIES, "--workdir", tmp_path / "w")
    assert res.code == 2 and "nope.jsonl: no such file or directory" in res.err, res.err
    res = run_cli("precompute-ref", data, "--model", STORIES, "--workdir", tmp_path / "w", "--reward-col", "score")
    assert res.code == 2 and "missing column 'score' (--reward-col maps the reward" in res.err, res.err
    res = run_cli("precompute-ref", data, "--model", STORIES, "--workdir", tmp_path / "w",
                  "--eval-data", tmp_path / "held.jsonl")
    assert res.code == 2 and "held.jsonl: no such file or directory" in res.err, res.err
    assert not (tmp_path / "w").exists()  # nothing written


def test_eval_reports_bad_data_before_any_model_work(workdir, tmp_path, run_cli, monkeypatch):
    _no_model_work(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    res = run_cli("eval", "--workdir", workdir, "--beta", "1", "--model", STORIES, "--data", data,
                  "--group-col", "conv_id")
    assert res.code == 2 and "missing column 'conv_id' (--group-col" in res.err, res.err
    res = run_cli("eval", "--workdir", workdir, "--beta", "1", "--model", STORIES, "--data", tmp_path / "x.jsonl")
    assert res.code == 2 and "x.jsonl: no such file or directory" in res.err, res.err


def test_inspect_with_a_model_reports_bad_data_before_the_tokenizer(tmp_path, run_cli, monkeypatch):
    _no_model_work(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    res = run_cli("inspect", data, "--model", STORIES, "--prompt-col", "question")
    assert res.code == 2 and "missing column 'question' (--prompt-col maps the prompt" in res.err, res.err


# ---- 22.7: habits ------------------------------------------------------------------------------


def _commands():
    import typer

    from gvpo_offline.cli import app

    group = typer.main.get_command(app)
    return group, group.commands


def _parse(command: str, args: list[str]) -> dict:
    """The values a command would run with (click parses, nothing runs), config file and overrides applied."""
    group, commands = _commands()
    parent = type(group.context_class(group))(group, info_name="gvpo-offline")
    with commands[command].make_context(command, [str(a) for a in args], parent=parent) as ctx:
        return dict(ctx.params)


def test_every_option_of_every_command_has_help():
    group, commands = _commands()
    missing = [f"{name} {p.opts[0]}" for name, cmd in [("gvpo-offline", group), *commands.items()]
               for p in cmd.params if p.param_type_name == "option" and not (p.help or "").strip()]
    assert missing == []


def test_version(run_cli):
    from gvpo_offline import __version__

    res = run_cli("--version")
    assert res.code == 0 and res.out.strip() == f"gvpo-offline {__version__}"


def test_hf_trl_names_are_aliases():
    from gvpo_offline.cli import _hyphenated

    assert _hyphenated(["train", "--learning_rate=1e-5", "--num_train_epochs", "3", "--", "--a_b"]) == [
        "train", "--learning-rate=1e-5", "--num-train-epochs", "3", "--", "--a_b"]
    values = _parse("train", ["--beta", "1", "--learning-rate", "3e-4", "--num-train-epochs", "2"])
    assert (values["lr"], values["epochs"]) == (3e-4, 2)
    assert _parse("plot", ["w", "--out-dir", "figs"])["out_dir"] == "figs"  # the old spelling still works
    assert _parse("plot", ["w", "--output-dir", "figs"])["out_dir"] == "figs"
    assert _parse("eval", ["-o", "e.json"])["json_path"] == "e.json"


def test_unknown_options_get_a_did_you_mean_or_the_equivalent(run_cli):
    res = run_cli("train", "--beta", "1", "--learnin-rate", "1e-5")
    assert res.code == 2 and "No such option: --learnin-rate (did you mean --learning-rate?)" in res.err
    res = run_cli("train", "--beta", "1", "--per_device_train_batch_size", "8")
    assert res.code == 2 and "--per-device-train-batch-size (HF/TRL name; here: --groups-per-step" in res.err


def test_key_value_overrides_after_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("workdir: from-file\ntrain:\n  beta: 0.5\n  lr: 0.001\n  seed: 3\n  report_to: [tensorboard]\n")
    values = _parse("train", ["--config", config, "lr=2e-5", "beta=0.25", "resume=true", "report_to=none,wandb"])
    assert (values["lr"], values["beta"], values["resume"], values["report_to"]) == (2e-5, 0.25, True, ["none", "wandb"])
    assert (values["workdir"], values["seed"]) == ("from-file", 3)  # the rest from the file
    # aliases as keys, and the command line wins over an override
    values = _parse("train", ["learning_rate=7e-4", "--config", config, "--lr", "1e-3", "num_train_epochs=4"])
    assert (values["lr"], values["epochs"], values["beta"]) == (1e-3, 4, 0.5)
    # an option's value is never an override; DATA arguments that are files stay files
    weird = tmp_path / "a=b.jsonl"
    weird.write_text("")
    values = _parse("precompute-ref", [weird, "--model", "m", "--prompt-template", "x=y", "workdir=w"])
    assert (values["data"], values["prompt_template"], values["workdir"]) == ([str(weird)], "x=y", "w")


def test_an_unknown_override_is_an_error(run_cli):
    res = run_cli("train", "--beta", "1", "lrr=1e-5")
    assert res.code == 2 and "'lrr=1e-5': `train` has no option 'lrr' to set (did you mean 'lr=1e-5'?)" in res.err


# ---- 23.2: fixed cost per command --------------------------------------------------------------


def _imports_in_subprocess(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (other tests' imports do not count) -> which heavy libraries
    it imported, and what it printed."""
    probe = (f"import sys, json\n{code}\n"
             "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'datasets')}))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_cli_and_every_help_import_no_torch():
    code = ("from gvpo_offline import cli\n"
            "import contextlib, io\n"
            "for command in ([], ['sample'], ['precompute-ref'], ['train'], ['eval'], ['inspect'], ['convert'], ['plot']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            cli.main([*command, '--help'])\n"
            "        except SystemExit as exc:\n"
            "            assert exc.code == 0, (command, exc.code)")
    assert _imports_in_subprocess(code) == {"torch": False, "transformers": False, "datasets": False}


def test_a_cache_hit_imports_no_torch(tmp_path, run_cli):
    from gvpo_offline.model.packing import PACKING_CHOICES
    from gvpo_offline.stages.reference import config, read_manifest

    assert config.PACKING_CHOICES == PACKING_CHOICES
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = ["precompute-ref", str(data), "--model", str(STORIES), "--workdir", str(tmp_path / "w"), "--device", "cpu"]
    assert run_cli(*args).code == 0
    manifest = read_manifest(tmp_path / "w")
    assert manifest.request_key and manifest.complete
    code = (f"from gvpo_offline import cli\ntry:\n    cli.main({args!r})\nexcept SystemExit as exc:\n"
            "    assert not exc.code, exc.code")
    assert _imports_in_subprocess(code) == {"torch": False, "transformers": False, "datasets": False}
    # another request goes the full way, which decides by the cache key itself: here a recompute
    res = run_cli(*args, "--max-prompt-length", "64")
    assert res.code == 0 and "recomputing the reference cache" in res.err, res.err
    assert read_manifest(tmp_path / "w").request_key not in (None, manifest.request_key)


def test_the_request_key_covers_the_tokenizer_files(tmp_path):
    import shutil

    from gvpo_offline.stages.reference.hit import model_files_fingerprint

    copy = tmp_path / "m"
    shutil.copytree(STORIES, copy)
    before = model_files_fingerprint(copy)
    (copy / "README.md").write_text("a card eval rewrote\n")  # not a model input
    assert model_files_fingerprint(copy) == before
    tok = next(p for p in copy.iterdir() if p.name.startswith("tokenizer"))
    tok.write_bytes(tok.read_bytes() + b" ")
    assert model_files_fingerprint(copy) != before


# ---- 22.2: threads -----------------------------------------------------------------------------


def test_the_thread_rule(monkeypatch):
    from gvpo_offline.model.threads import resolve_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads(None, on_cpu=True) == 1  # the CPU default
    assert resolve_threads(None, on_cpu=False) is None  # a GPU run: torch's default
    assert resolve_threads(3, on_cpu=True) == 3 and resolve_threads(0, on_cpu=True) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_threads(None, on_cpu=True) == 2 and resolve_threads(4, on_cpu=True) == 4


def test_threads_option_sets_torch_threads_and_reruns_are_bit_identical(story_cache, tmp_path, run_cli,
                                                                         monkeypatch):
    import shutil

    import torch
    from safetensors.torch import load_file

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    models = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        shutil.copytree(story_cache, workdir)
        res = run_cli("train", "--workdir", workdir, "--beta", "1", "--lr", "1e-3", "--groups-per-step", "2",
                      "--max-steps", "2", "--save-every", "0", "--device", "cpu")
        assert res.code == 0, res.err
        assert torch.get_num_threads() == 1  # the CPU default, whatever torch had
        models.append(load_file(workdir / "model" / "model.safetensors"))
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])  # the same settings: the same bits
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert "threads" in saved  # the rerun file repeats it
    res = run_cli("train", "--workdir", tmp_path / "nowhere", "--beta", "1", "--threads", "2", "--device", "cpu")
    assert res.code == 2 and torch.get_num_threads() == 2


def test_shards_are_cut_by_text_size_and_group_count():
    import pyarrow as pa

    from gvpo_offline.stages.reference.compute import shard_starts

    prompts = ["p" * 10, "q" * 100, "r", "s" * 50, "t" * 5]
    responses = [["a", "bb"], ["c" * 20, "d", "e"], ["f" * 300, "g"], ["h", "i"], ["j", "k"]]
    groups = pa.table({"prompt": prompts, "responses": responses})
    # independent: the cost of each group, by hand (every response with its prompt)
    cost = [len(p) * len(r) + sum(map(len, r)) for p, r in zip(prompts, responses)]
    assert cost == [23, 322, 303, 102, 12]
    assert shard_starts(groups, 1000, 10**6) == [0]
    assert shard_starts(groups, 2, 10**6) == [0, 2, 4]
    assert shard_starts(groups, 1000, 400) == [0, 2, 3]  # 23+322 | 303 (+102 > 400) | 102+12
    assert shard_starts(groups, 1000, 1) == [0, 1, 2, 3, 4]  # at least one group per shard


def test_auto_shard_size_follows_the_model_size(tmp_path, run_cli):
    from gvpo_offline.stages.reference import read_manifest
    from gvpo_offline.stages.reference.config import SHARD_BYTES_RANGE, auto_shard_bytes

    stories = sum(p.stat().st_size for p in STORIES.glob("*.safetensors"))
    assert 450_000 < auto_shard_bytes(stories) < 550_000  # about 0.5 MB of text for stories260K
    assert auto_shard_bytes(2 * 10**9) == SHARD_BYTES_RANGE[0] and auto_shard_bytes(1) == SHARD_BYTES_RANGE[1]
    rows = [{"prompt": f"prompt {i // 2} " * 5, "response": f"response {i} " * 4, "reward": i % 2} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    base = ["precompute-ref", data, "--model", STORIES, "--device", "cpu", "--eval-fraction", "0"]
    assert run_cli(*base, "--workdir", tmp_path / "one").code == 0
    assert run_cli(*base, "--workdir", tmp_path / "many", "--shard-bytes", "600").code == 0
    one, many = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "many")
    assert len(one.shards) == 1 and one.inputs["shard_bytes"] == auto_shard_bytes(stories)
    assert len(many.shards) == len(many.shard_starts) > 3 and many.inputs["shard_bytes"] == 600
    from gvpo_offline.stages.reference import load_split

    a, b = load_split(tmp_path / "one", "train"), load_split(tmp_path / "many", "train")
    assert a["group_id"].to_pylist() == b["group_id"].to_pylist()
    for x, y in zip(a["ref_logp"].to_pylist(), b["ref_logp"].to_pylist()):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x))  # the same cache, cut into other files
