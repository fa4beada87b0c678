"""bf16 full fine-tuning resumed on another number of processes (issue 21.3): a one-process run's fp32 master
weights and AdamW state (saved by parameter name with torch.distributed.checkpoint) resume on 2 processes, a
2-process run's (FSDP's fp32 shards) on one, each ending where the uninterrupted run of the new size ends;
older one-process checkpoints (``master_weights.pt`` + ``optimizer.pt``) still resume on either.

One 2-process launch (tests/bf16_resume_worker.py: the uninterrupted 2-process run, then two resumes) is shared
by the tests through a module fixture; the one-process runs run in the test process. The model is stories260K
stored in bf16, so 1- and 2-process runs start from the same master weights (from an fp32 file, a 2-process run
takes the fp32 values as its masters and a one-process run their bf16 rounding: two different trajectories)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from cachefixture import STORIES, STORY_GROUPS
from conftest import REPO
from rich.console import Console
from safetensors.torch import load_file
from test_distributed import env

from gvpo_offline.data import DataConfig
from gvpo_offline.data.tokenize import TokenizeConfig
from gvpo_offline.model.loading import load_model, load_tokenizer
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train

STEPS = 4  # 4 groups, 2 per step: the resumed steps 3 and 4 are the second epoch
TRAIN = {"beta": 1, "lr": 1e-4, "groups_per_step": 2, "max_steps": STEPS, "save_every": 2, "keep_checkpoints": 3,
         "micro_batch_tokens": 60, "device": "cpu", "seed": 1}
# 1 and 2 processes sum the same bf16 micro-batch gradients in fp32 in other orders: 3e-8 apart after 6 steps
# (measured); losing the master weights' fp32 digits or AdamW's moments moves them 1e-5 or more
ATOL = 1e-6


def cli_options() -> str:
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in TRAIN.items())


def bf16_cache(root: Path) -> Path:
    """precompute-ref --dtype bfloat16 of the four story groups with stories260K stored in bf16."""
    model = root / "stories-bf16"
    load_model(STORIES, torch.device("cpu"), torch.bfloat16).save_pretrained(model)
    load_tokenizer(STORIES).save_pretrained(model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n" for p, r, w in STORY_GROUPS))
    precompute(PrecomputeConfig(data=DataConfig((str(data),)), model=str(model), workdir=root / "cache",
                                tokenize=TokenizeConfig(max_length=96, max_prompt_length=32), eval_fraction=0.0,
                                device="cpu", dtype="bfloat16", progress=False), Console(quiet=True))
    return root / "cache"


def stopped_at_step_2(run: Path, into: Path) -> Path:
    """A copy of ``run`` as it was when its step-2 checkpoint had just been written."""
    shutil.copytree(run, into, ignore=shutil.ignore_patterns("model", f"step-{STEPS}"))
    return into


def saved_state(checkpoint: Path) -> dict:
    """{"model": fp32 master weights by name, "optimizer": AdamW's state by name} of a DCP checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")  # DCP without a process group
        dcp_to_torch_save(checkpoint, Path(tmp) / "state.pt")
        return torch.load(Path(tmp) / "state.pt", weights_only=True)


def as_older_checkpoint(workdir: Path, masters=lambda t: t, moments=lambda t: t) -> Path:
    """Rewrite ``workdir``'s step-2 checkpoint as the previous release wrote a one-process bf16 run's: the fp32
    master weights as a list in parameter order (``master_weights.pt``) and ``optimizer.pt`` by index (``masters``
    and ``moments`` may change them on the way)."""
    checkpoint = workdir / "checkpoints" / "step-2"
    state = saved_state(checkpoint)
    order = state["optimizer"]["param_groups"][0]["params"]  # AdamW's parameters, in the model's order
    torch.save([masters(state["model"][name]) for name in order], checkpoint / "master_weights.pt")
    optimizer = {"state": {i: {k: v if k == "step" else moments(v) for k, v in state["optimizer"]["state"][name].items()}
                           for i, name in enumerate(order)},
                 "param_groups": [{**g, "betas": tuple(g["betas"]), "params": list(range(len(order)))}
                                  for g in state["optimizer"]["param_groups"]]}
    torch.save(optimizer, checkpoint / "optimizer.pt")
    for name in (".metadata", *(p.name for p in checkpoint.glob("*.distcp"))):
        (checkpoint / name).unlink()
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    del trainer_state["dcp_state"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
    return workdir


def resume_here(workdir: Path) -> str:
    lines = []
    train(TrainConfig(workdir=workdir, resume=True, progress=False, **TRAIN), log=lines.append)
    return "\n".join(lines)


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@functools.cache  # read once per run (the tests only read it)
def final_state(workdir: Path) -> dict:
    return saved_state(workdir / "checkpoints" / f"step-{STEPS}")


def assert_same_state(got: dict, want: dict, atol: float) -> None:
    assert got["model"].keys() == want["model"].keys()
    for name in want["model"]:
        assert got["model"][name].dtype == torch.float32
        assert torch.allclose(got["model"][name], want["model"][name], rtol=0, atol=atol), name
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for name, state in want["optimizer"]["state"].items():
        assert got["optimizer"]["state"][name]["step"] == state["step"] == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(got["optimizer"]["state"][name][key], state[key], rtol=0, atol=atol), (name, key)
    def groups(saved: dict) -> list[dict]:  # a param group broadcast from rank 0 comes back with a list of betas;
        # the kernel flags are each run's own (fused in one process, torch's default when sharded)
        return [{**{k: v for k, v in group.items() if k not in ("fused", "foreach")}, "betas": tuple(group["betas"])}
                for group in saved["optimizer"]["param_groups"]]

    assert groups(got) == groups(want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-process and a two-process bf16 run of STEPS steps, and their step-2 checkpoints resumed on the other
    number of processes (1 -> 2, 2 -> 1), also in the older one-process format (on 1 and on 2 processes)."""
    root = tmp_path_factory.mktemp("bf16resume")
    cache = bf16_cache(root)
    one, two = root / "one", root / "two"
    shutil.copytree(cache, one)
    shutil.copytree(cache, two)
    train(TrainConfig(workdir=one, progress=False, **TRAIN), log=lambda _m: None)
    out = {"one": one, "two": two, "1to2": stopped_at_step_2(one, root / "1to2"),
           "old1to2": as_older_checkpoint(stopped_at_step_2(one, root / "old1to2"))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "bf16_resume_worker.py"), cli_options(), two, out["1to2"],
                           out["old1to2"]], env=env(), capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out["launch"] = done.stdout + done.stderr
    out["2to1"] = stopped_at_step_2(two, root / "2to1")
    out["old1to1"] = as_older_checkpoint(stopped_at_step_2(one, root / "old1to1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["logs"] = {"2to1": resume_here(out["2to1"]), "old1to1": resume_here(out["old1to1"])}
    out["warnings"] = [str(w.message) for w in caught]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case,written_by,now", [("1to2", 1, 2), ("2to1", 2, 1)])
def test_a_bf16_checkpoint_resumes_on_another_number_of_processes(runs, case, written_by, now):
    run, writer, same_size = runs[case], runs["one" if written_by == 1 else "two"], runs["one" if now == 1 else "two"]
    log = runs["launch"] if now == 2 else runs["logs"][case]
    assert f"resuming from {run / 'checkpoints' / 'step-2'} (step 2/{STEPS}; written by {written_by} process(es), " \
           f"resharded to {now})" in log
    got, want = metrics(run), metrics(writer)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert got[:2] == want[:2]  # the steps before the checkpoint are kept as they were
    for a, b in zip(got[2:], want[2:], strict=True):  # the next steps take the same groups in the same order ...
        assert (a["epoch"], a["groups"], a["responses"], a["tokens"]) == (b["epoch"], b["groups"], b["responses"],
                                                                          b["tokens"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # ... from the same weights and AdamW state
        assert a["lr"] == b["lr"]  # the schedule where it was
    # the fp32 master weights and AdamW's state at the end: those of the uninterrupted run of the new size
    state = final_state(run)
    assert_same_state(state, final_state(same_size), ATOL)
    assert_same_state(state, final_state(writer), ATOL)
    assert not [w for w in runs["warnings"] if "torch.distributed" in w]  # DCP in one process: no warning printed
    weights = load_file(run / "model" / "model.safetensors")  # the final model: the masters, in bf16
    assert all(w.dtype == torch.bfloat16 and torch.equal(w, state["model"][name].to(w.dtype))
               for name, w in weights.items())
    assert json.loads((run / "model" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_an_older_bf16_checkpoint_resumes_on_one_and_on_two_processes(runs):
    assert "written by" not in runs["logs"]["old1to1"]
    assert_same_state(final_state(runs["old1to1"]), final_state(runs["one"]), atol=0)  # the run it continues
    assert f"resuming from {runs['old1to2'] / 'checkpoints' / 'step-2'} (step 2/{STEPS}; written by 1 process(es), " \
           "resharded to 2)" in runs["launch"]
    assert_same_state(final_state(runs["old1to2"]), final_state(runs["1to2"]), atol=0)  # broadcast = DCP's load


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["master weights", "AdamW moments"])
def test_a_resume_that_lost_the_master_weights_or_the_moments_would_fail_these_tests(runs, tmp_path, lost):
    # the bf16 rounding of the masters (the checkpoint's model.safetensors), or AdamW's moments at zero
    change = {"master weights": {"masters": lambda t: t.to(torch.bfloat16).float()},
              "AdamW moments": {"moments": torch.zeros_like}}[lost]
    run = as_older_checkpoint(stopped_at_step_2(runs["one"], tmp_path / "lost"), **change)
    resume_here(run)
    got, want = final_state(run)["model"], final_state(runs["one"])["model"]
    assert max((got[k] - want[k]).abs().max().item() for k in want) > 10 * ATOL


@pytest.mark.slow
def test_a_damaged_bf16_checkpoint_falls_back_and_other_settings_are_refused(runs, tmp_path):
    run = tmp_path / "damaged"
    shutil.copytree(runs["one"], run, ignore=shutil.ignore_patterns("model"))
    with pytest.raises(GvpoError, match=r"^--resume from .*step-4 with different settings: --lr 0.0001 -> 0.001$"):
        train(TrainConfig(workdir=run, resume=True, progress=False, **{**TRAIN, "lr": 1e-3}), log=lambda _m: None)
    (run / "checkpoints" / "step-4" / "__0_0.distcp").write_bytes(b"cut")
    log = resume_here(run)
    assert f"warning: checkpoint {run / 'checkpoints' / 'step-4'} is unusable" in log
    assert f"resuming from {run / 'checkpoints' / 'step-2'} (step 2/{STEPS})" in log
    assert_same_state(final_state(run), final_state(runs["one"]), atol=0)


def test_a_failure_inside_torch_distributed_checkpoint_is_an_ordinary_exception(tmp_path):
    # DCP raises CheckpointException, a BaseException: past the resume's fallback, a traceback instead
    import torch.distributed.checkpoint as dcp

    from gvpo_offline.model import distributed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path), no_dist=True)
        shard = tmp_path / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])  # cut
        with pytest.raises(RuntimeError, match=r"^torch.distributed.checkpoint failed on rank 0: \w+"), \
                distributed.checkpoint_errors():
            dcp.load({"w": torch.zeros(3)}, checkpoint_id=str(tmp_path), no_dist=True)
        (tmp_path / "__0_0.distcp").unlink()
        with pytest.raises(FileNotFoundError), distributed.checkpoint_errors():  # an OSError stays one (exit 1)
            dcp.load({"w": torch.zeros(3)}, checkpoint_id=str(tmp_path), no_dist=True)
