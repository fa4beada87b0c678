"""Scaling across processes with gloo on CPU (issue 21): a checkpoint resumed on another number of processes
(2 -> 3, 2 -> 1, 1 -> 2) equals the uninterrupted run; killing torchrun ends its ranks at once; a lost rank
is one line; accelerate's one-process CPU launch is named.

Each launch is a real ``python -m torch.distributed.run --standalone`` (OMP_NUM_THREADS=1 per process, a 60 s
process-group timeout, a subprocess timeout); the launches are shared by the tests of a module fixture."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups
from conftest import REPO
from safetensors.torch import load_file
from test_distributed import env

from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train

STEPS = 6
TRAIN = dict(beta=1, lr=1e-3, groups_per_step=3, max_steps=STEPS, save_every=2, keep_checkpoints=3,
             micro_batch_tokens=60, device="cpu", seed=1)


def cli_args(workdir: Path, **extra) -> list[str]:
    options = {**TRAIN, **extra}
    args = ["-m", "gvpo_offline", "train", "--workdir", str(workdir)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def torchrun(n: int, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *map(str, args)], env=env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def stopped_at_step_2(run: Path, into: Path) -> Path:
    """A copy of ``run`` as it was when its step-2 checkpoint had just been written."""
    shutil.copytree(run, into, ignore=shutil.ignore_patterns("model", "step-4", "step-6"))
    return into


def weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(workdir / "model" / "model.safetensors")


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """An uninterrupted 2-process run and a 1-process run of 6 steps, and their step-2 checkpoints resumed on
    3 processes (from 2), 1 process (from 2) and 2 processes (from 1)."""
    root = tmp_path_factory.mktemp("reshard")
    torch.set_num_threads(1)
    cache = root / "cache"
    build_cache(cache, STORIES, text_groups(STORIES, STORY_GROUPS))
    two, one = root / "two", root / "one"
    shutil.copytree(cache, two)
    shutil.copytree(cache, one)
    torchrun(2, *cli_args(two))
    train(TrainConfig(workdir=one, progress=False, **TRAIN), log=lambda _m: None)
    out = {"two": two, "one": one, "logs": {}}
    out["2to3"] = stopped_at_step_2(two, root / "2to3")
    out["logs"]["2to3"] = torchrun(3, *cli_args(out["2to3"], resume=True)).stderr
    out["2to1"] = stopped_at_step_2(two, root / "2to1")
    lines = []
    train(TrainConfig(workdir=out["2to1"], resume=True, progress=False, **TRAIN), log=lines.append)
    out["logs"]["2to1"] = "\n".join(lines)
    out["1to2"] = stopped_at_step_2(one, root / "1to2")
    out["logs"]["1to2"] = torchrun(2, *cli_args(out["1to2"], resume=True)).stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case,written_by,now", [("2to3", 2, 3), ("2to1", 2, 1), ("1to2", 1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(resharded, case, written_by, now):
    run, straight = resharded[case], resharded["two" if written_by == 2 else "one"]
    assert f"written by {written_by} process(es), resharded to {now}" in resharded["logs"][case]
    got, want = metrics(run), metrics(straight)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert got[:2] == want[:2]  # the steps before the checkpoint are kept as they were
    for a, b in zip(got[2:], want[2:], strict=True):  # the next steps take the same groups in the same order ...
        assert (a["epoch"], a["groups"], a["responses"], a["tokens"]) == (b["epoch"], b["groups"], b["responses"],
                                                                          b["tokens"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)  # ... from the same weights and AdamW state
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == b["lr"]  # the schedule where it was
    a, b = weights(run), weights(straight)
    assert a.keys() == b.keys()
    for k in a:  # 1, 2 and 3 processes sum the same gradient in other orders: float rounding, through AdamW
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), k
    moved = max((a[k] - weights(resharded["two"])[k]).abs().max().item() for k in a)
    assert moved < 1e-4


@pytest.mark.slow
def test_a_resharded_run_is_the_run_it_continues_and_a_fresh_optimizer_would_not_be(resharded, tmp_path):
    # the straight 1- and 2-process runs agree, and a resume that lost AdamW's moments lands elsewhere
    a, b = weights(resharded["one"]), weights(resharded["two"])
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)
    reset = stopped_at_step_2(resharded["one"], tmp_path / "reset")
    (reset / "checkpoints" / "step-2" / "optimizer.pt").unlink()
    torch.save(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).state_dict(), tmp_path / "empty.pt")
    optimizer = torch.load(resharded["one"] / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    optimizer["state"] = {}  # the same parameter groups, no moments: as if the optimizer state were dropped
    torch.save(optimizer, reset / "checkpoints" / "step-2" / "optimizer.pt")
    train(TrainConfig(workdir=reset, resume=True, progress=False, **TRAIN), log=lambda _m: None)
    c = weights(reset)
    assert max((c[k] - a[k]).abs().max().item() for k in a) > 1e-3


@pytest.mark.slow
def test_what_cannot_be_resumed_is_still_refused_in_one_line(resharded, tmp_path):
    run = stopped_at_step_2(resharded["two"], tmp_path / "other-loss")
    with pytest.raises(GvpoError, match=r"^--resume from .*step-2 with different settings: --loss gvpo -> dpo$"):
        train(TrainConfig(workdir=run, resume=True, progress=False, **{**TRAIN, "loss": "dpo"}), log=lambda _m: None)


# ---- a launcher's hygiene (issue 21.5, issue 20 "Launchers") ------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _start_long_run(tmp_path: Path):
    """torchrun (2 ranks, in a session of its own) training 400 quick steps with a checkpoint after each;
    returns (torchrun's Popen, the ranks' pids, the workdir, the stderr file) once the first checkpoint is there."""
    from test_distributed import _children

    workdir = tmp_path / "run"
    build_cache(workdir, STORIES, text_groups(STORIES, STORY_GROUPS))
    log = open(tmp_path / "stderr.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *cli_args(workdir, max_steps=400, save_every=1)], env=env(), stdout=subprocess.DEVNULL,
                            stderr=log, start_new_session=True)
    deadline = time.monotonic() + 200
    while not list((workdir / "checkpoints").glob("step-*")):
        assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    return proc, ranks, workdir, log


def _newest_write(folder: Path) -> float:
    return max(p.stat().st_mtime for p in folder.rglob("*"))


@pytest.mark.slow
def test_killing_torchrun_s_process_group_ends_its_ranks_at_once_without_writing(tmp_path):
    proc, ranks, workdir, log = _start_long_run(tmp_path)
    killed = time.time()
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group: its ranks live in sessions of their own
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(r) for r in ranks):  # before: they trained on, writing checkpoints and model/
        assert time.monotonic() < deadline, "a rank outlived its launcher by 10 s"
        time.sleep(0.05)
    time.sleep(0.5)
    assert not (workdir / "model").exists()
    assert _newest_write(workdir) < killed + 0.5  # nothing written once the launcher was gone (kernel SIGKILL)
    log.close()


@pytest.mark.slow
def test_a_lost_rank_stops_the_job_with_one_line_not_a_traceback_per_rank(tmp_path):
    proc, ranks, workdir, log = _start_long_run(tmp_path)
    started = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    proc.wait(timeout=120)
    seconds = time.monotonic() - started
    log.seek(0)
    err = log.read()
    log.close()
    assert proc.returncode != 0 and seconds < 30  # not the process group's timeout
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert ours == ["error: rank 0: lost contact with another of the job's 2 processes (it exited, was killed, or its "
                    "node is gone); every rank stops, without writing anything more. torchrun names the rank that "
                    "failed first in its own report below"], err[-3000:]
    assert "[rank0]" not in err and "gloo" not in err  # no rank's traceback; torchrun's own report follows
    assert "ChildFailedError" in err  # (what torchrun adds itself: its report naming rank 1's SIGKILL)
    assert not (workdir / "model").exists()


def test_lost_peer_errors_are_recognised_and_others_are_not():
    from gvpo_offline.runtime import launcher

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:5555")
    assert launcher.lost_peer_message(gloo, 0, 4).startswith("rank 0: lost contact with another of the job's 4")
    assert launcher.lost_peer_message(RuntimeError("CUDA out of memory"), 0, 4) is None
    assert launcher.lost_peer_message(ValueError("bad value"), 1, 2) is None


def test_accelerate_s_single_process_cpu_launch_is_named():
    from gvpo_offline.runtime.launcher import single_process_note

    # what `accelerate launch --cpu --num_processes 2` exports to the ONE process it starts (its simple launcher)
    accelerate_cpu = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                      "ACCELERATE_MIXED_PRECISION": "no"}
    assert "started one" in single_process_note(accelerate_cpu)
    assert single_process_note({"ACCELERATE_USE_CPU": "True"}) is None  # --num_processes 1: nothing to say
    assert single_process_note({**accelerate_cpu, "WORLD_SIZE": "2", "RANK": "0"}) is None  # a real launch
    assert single_process_note({}) is None


# ---- sharded inference (issue 21.2) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_scoring_runs(tmp_path_factory):
    """precompute-ref and eval of a perturbed policy, each once with 2 processes holding FSDP shards of the model
    (--shard-model on) and once in one process."""
    from conftest import write_jsonl

    from gvpo_offline.model.loading import load_model

    root = tmp_path_factory.mktemp("sharded-scoring")
    torch.set_num_threads(1)
    lines = (REPO / "sample_data" / "groups.jsonl").read_text().splitlines()[:8]
    data = write_jsonl(root / "data.jsonl", [json.loads(line) for line in lines])
    policy = load_model(STORIES, torch.device("cpu"))
    with torch.no_grad():
        for n, p in enumerate(policy.parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(n)))
    policy.save_pretrained(root / "policy")
    common = [data, "--model", STORIES, "--eval-fraction", "0.5", "--shard-groups", "3", "--max-length", "128",
              "--max-prompt-length", "64", "--device", "cpu", "--batch-tokens", "300"]
    evaluate = ["--model", root / "policy", "--beta", "1", "--bootstrap", "0", "--device", "cpu", "--batch-tokens",
                "300"]
    out = {"root": root}
    out["precompute"] = torchrun(2, "-m", "gvpo_offline", "precompute-ref", *common, "--workdir", root / "two",
                                 "--shard-model", "on").stderr
    out["eval"] = torchrun(2, "-m", "gvpo_offline", "eval", "--workdir", root / "two", *evaluate, "--json",
                           root / "two.json", "--shard-model", "on").stderr
    from gvpo_offline.cli import main

    for args in (["precompute-ref", *common, "--workdir", root / "one"],
                 ["eval", "--workdir", root / "one", *evaluate, "--json", root / "one.json"]):
        try:  # in this process (no process group): the 1-process results
            main([str(a) for a in args])
        except SystemExit as exc:
            assert not exc.code, args
    return out


@pytest.mark.slow
def test_a_sharded_reference_gives_the_unsharded_cache(sharded_scoring_runs):
    import pyarrow.parquet as pq

    from gvpo_offline.stages import reference

    root = sharded_scoring_runs["root"]
    assert "scoring with the model sharded over 2 processes (FSDP, forward only)" in sharded_scoring_runs["precompute"]
    one, two = reference.read_manifest(root / "one"), reference.read_manifest(root / "two")
    assert len(one.shards) == 3
    for field in ("key", "inputs", "shards", "counts", "truncated_prompts", "truncated_responses", "complete"):
        assert getattr(two, field) == getattr(one, field), field
    for shard in one.shards:
        a, b = pq.read_table(root / "one" / shard), pq.read_table(root / "two" / shard)
        assert a.drop(["ref_logp"]).equals(b.drop(["ref_logp"]))
        assert a["ref_logp"].to_numpy() == pytest.approx(b["ref_logp"].to_numpy(), rel=1e-6)  # batch rounding


@pytest.mark.slow
def test_a_sharded_policy_gives_the_unsharded_eval(sharded_scoring_runs):
    from test_distributed import _close

    root = sharded_scoring_runs["root"]
    assert "scoring with the model sharded over 2 processes (FSDP, forward only)" in sharded_scoring_runs["eval"]
    one, two = (json.loads((root / name).read_text()) for name in ("one.json", "two.json"))
    assert two["counts"] == one["counts"] and one["counts"]["groups"] > 0
    assert one["model"]["gvpo_loss"] != one["reference"]["gvpo_loss"]  # the policy's log-probs were computed
    for section in ("model", "reference", "delta"):
        assert _close(two[section], one[section]), section


@pytest.mark.slow
def test_precompute_progress_under_torchrun_counts_the_whole_job(sharded_scoring_runs):
    import re

    counts = [tuple(map(int, m)) for m in re.findall(r"reference log-probs.*?([\d,]+)/([\d,]+)",
                                                    sharded_scoring_runs["precompute"].replace(",", ""))]
    assert counts, sharded_scoring_runs["precompute"][-2000:]
    assert all(done <= total for done, total in counts)  # before: "118/117 (101%)"
    assert counts[-1][0] == counts[-1][1]


def test_shard_model_takes_auto_on_or_off():
    from gvpo_offline.model import distributed, sharded_scoring

    with pytest.raises(GvpoError, match="--shard-model must be one of auto, on, off, got 'yes'"):
        sharded_scoring.check_choice("yes")
    one = distributed.Dist()
    assert not sharded_scoring.should_shard("on", one, STORIES, torch.device("cpu"))  # one process: nothing to shard
    n = sum(p.numel() for p in __import__("gvpo_offline.model.loading", fromlist=["x"]).load_model(
        STORIES, torch.device("cpu")).parameters())
    assert sharded_scoring.weights_bytes(STORIES) == 4 * n  # counted on meta, no weight read


# ---- multi-node: HSDP (issue 21.4) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_hsdp_on_two_nodes_of_two_gives_the_single_process_gradient(tmp_path):
    import socket

    from gvpo_offline.model.loading import load_model
    from gvpo_offline.stages.train.step import gvpo_backward, load_train_groups, make_batch

    cache = tmp_path / "cache"
    build_cache(cache, STORIES, text_groups(STORIES, STORY_GROUPS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.pt"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               REPO / "tests" / "hsdp_worker.py", out, cache, "60"], env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=400)
        assert node.returncode == 0, err[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["hsdp"] and got["nodes"] == (2, 2)  # --hsdp auto: on, since the job spans 2 nodes
    assert got["mesh"] == (2, 2) and got["mesh_names"] == ("replicate", "shard")
    assert got["placements"] == ["R", "S(0)"]  # each node holds one sharded copy
    full = load_model(STORIES, torch.device("cpu")).model.layers[0].mlp.up_proj.weight.shape[0]
    assert got["local_rows"] == full // 2  # sharded over a node's 2 processes, not the job's 4

    groups = load_train_groups(cache)
    batch = make_batch(groups, list(range(groups.n_groups)))
    model = load_model(STORIES, torch.device("cpu"))
    stats = gvpo_backward(model, batch, 1.0, 10**6)  # one process, every group in one pass
    assert got["loss"] == pytest.approx(stats.loss, rel=1e-5)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0 and torch.allclose(got["grads"][name], p.grad, rtol=0, atol=1e-5 * scale), name


def test_hsdp_is_on_by_default_when_the_job_spans_nodes(monkeypatch):
    from gvpo_offline.model import distributed

    four = distributed.Dist(rank=0, world_size=4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.nodes(four) == (2, 2) and distributed.use_hsdp(four, "auto")
    assert not distributed.use_hsdp(four, "off")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one node of 4: plain FSDP over the node
    assert not distributed.use_hsdp(four, "auto") and distributed.use_hsdp(four, "on")
    assert not distributed.use_hsdp(distributed.Dist(), "on")  # one process: nothing to shard
    with pytest.raises(GvpoError, match="--hsdp must be one of auto, on, off"):
        distributed.use_hsdp(four, "yes")


def test_cpu_offload_is_refused_on_cpu_in_one_line(tmp_path):
    from gvpo_offline.model import distributed
    from gvpo_offline.model.loading import load_model

    # under torchrun on CPU (gloo): every rank refuses before its first collective
    ctx = distributed.Dist(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(GvpoError, match=r"^--cpu-offload needs GPUs \(on CPU everything already lives in CPU memory\)$"):
        distributed.shard_model(ctx, load_model(STORIES, torch.device("cpu")), cpu_offload=True)
    # one process: nothing is sharded, so nothing could be offloaded
    build_cache(tmp_path / "run", STORIES, text_groups(STORIES, STORY_GROUPS[:2]))
    with pytest.raises(GvpoError, match="^--cpu-offload shards the training state over processes"):
        train(TrainConfig(workdir=tmp_path / "run", beta=1, device="cpu", cpu_offload=True, progress=False),
              log=lambda _m: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_network_error_that_is_not_a_collective_is_not_called_a_lost_rank():
    from gvpo_offline.runtime import launcher

    assert not launcher.is_lost_peer(OSError("[Errno 111] Connection refused: huggingface.co"))
    assert not launcher.is_lost_peer(BrokenPipeError("[Errno 32] Broken pipe"))


def test_the_cli_says_when_accelerate_started_one_process(monkeypatch, run_cli, tmp_path):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    result = run_cli("inspect", tmp_path / "missing.jsonl")
    assert result.err.startswith("note: accelerate launch asked for several processes but started one")
    monkeypatch.delenv("MASTER_ADDR")  # accelerate launch --cpu (one process asked for): no note
    assert "accelerate" not in run_cli("inspect", tmp_path / "missing.jsonl").err
