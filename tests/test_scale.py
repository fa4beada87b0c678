"""Scaling across processes with gloo on CPU (issue 21): a whole HSDP run (4 processes as 2 "nodes" × 2) equals
the 1-process run and resumes exactly; a checkpoint resumed on another number of processes (2 -> 3, 2 -> 1,
1 -> 2, 4 -> 2, 4 -> 1) equals the uninterrupted run; the sharded reference cache (2 and 4 processes) and a sharded
eval equal one process's; killing torchrun ends its ranks at once; a lost rank is one line; accelerate's
one-process CPU launch is named.

Each launch is a real ``python -m torch.distributed.run`` (OMP_NUM_THREADS=1 per process, a 60 s process-group
timeout, a subprocess timeout); one module fixture, :func:`runs`, makes all the runs that the tests compare, in as
few launches as their world sizes allow (several commands per launch: tests/cli_worker.py)."""

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
from cachefixture import STORIES, STORY_GROUPS, build_cache, save_perturbed_policy, text_groups
from conftest import REPO
from safetensors.torch import load_file
from test_distributed import env

from gvpo_offline.model.adapters import LoraSettings
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train

STEPS = 4  # a checkpoint at step 2, then a step in the next epoch (4 groups, 3 per step) and its last group
TRAIN = dict(beta=1, lr=1e-3, groups_per_step=3, max_steps=STEPS, save_every=2, keep_checkpoints=3,
             micro_batch_tokens=60, device="cpu", seed=1)
SCORE = ["--eval-fraction", "0.5", "--shard-groups", "3", "--max-length", "128", "--max-prompt-length", "64",
         "--device", "cpu", "--batch-tokens", "300"]  # 300 tokens: the ranks' batch plans differ in length
EVAL = ["--beta", "1", "--bootstrap", "0", "--device", "cpu", "--batch-tokens", "300"]


def cli_args(workdir: Path, **extra) -> list[str]:
    options = {**TRAIN, **extra}
    args = ["train", "--workdir", str(workdir)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def torchrun(n: int, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *map(str, args)], env=env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def commands_file(path: Path, commands: list[list]) -> Path:
    """COMMANDS.json of tests/cli_worker.py: gvpo-offline command lines and folder copies, run in one launch."""
    path.write_text(json.dumps([[str(a) for a in command] for command in commands]))
    return path


def two_nodes_of_two(*args) -> str:
    """tests/hsdp_worker.py ``args`` as 2 "nodes" × 2 processes: two ``torchrun --nnodes 2 --node_rank N`` launches
    on localhost (LOCAL_WORLD_SIZE=2, WORLD_SIZE=4); returns node 0's stderr (rank 0's log)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               REPO / "tests" / "hsdp_worker.py", *map(str, args)], env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in range(2)]
    errs = []
    for node in nodes:
        _, err = node.communicate(timeout=400)
        assert node.returncode == 0, err[-3000:]
        errs.append(err)
    return errs[0]


def stopped_at_step_2(run: Path, into: Path) -> Path:
    """A copy of ``run`` as it was when its step-2 checkpoint had just been written."""
    shutil.copytree(run, into, ignore=shutil.ignore_patterns(*STOPPED))
    return into


STOPPED = ("model", "step-4")  # what a run stopped at its step-2 checkpoint has not written yet


def weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(workdir / "model" / "model.safetensors")


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "time", "elapsed")} for r in rows]  # wall clock


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this module's scale-out tests, in three launches (a launch's start-up is most of its time here):

    - in this process: a 1-process train run (``one``), precompute-ref (``ref1``) and eval (``one.json``);
    - in this process, too: the same run with a LoRA adapter (``one-lora``);
    - 4 processes as 2 "nodes" × 2 (tests/hsdp_worker.py): one HSDP step's gradient (``out.pt``), a whole
      ``train --hsdp on`` run (``hsdp``), the same resumed from its step-2 checkpoint on HSDP again
      (``hsdp-resumed``), ``precompute-ref --shard-model on`` (``ref4``, flat over the 4 processes) and a LoRA
      run on HSDP (``hsdp-lora``);
    - 2 processes (tests/cli_worker.py): an uninterrupted run (``two``), ``one``'s step-2 checkpoint resumed
      (``1to2``), ``hsdp``'s (``4to2``, on a flat mesh), ``precompute-ref --shard-model on`` (``ref2``) and a sharded
      eval on it (``two.json``);
    - 3 processes: ``two``'s step-2 checkpoint resumed (``2to3``); then in this process ``two``'s and ``hsdp``'s
      (``2to1``, ``4to1``)."""
    from conftest import write_jsonl

    from gvpo_offline.cli import main

    root = tmp_path_factory.mktemp("scale")
    torch.set_num_threads(1)
    cache = root / "cache"
    build_cache(cache, STORIES, text_groups(STORIES, STORY_GROUPS))
    lines = (REPO / "sample_data" / "groups.jsonl").read_text().splitlines()[:8]
    data = write_jsonl(root / "data.jsonl", [json.loads(line) for line in lines])
    save_perturbed_policy(root / "policy")  # a policy away from the reference, for eval
    out = {"root": root, "cache": cache, "logs": {}}
    for name in ("one", "two", "hsdp", "one-lora", "hsdp-lora"):
        out[name] = root / name
        shutil.copytree(cache, out[name])

    train(TrainConfig(workdir=out["one"], progress=False, **TRAIN), log=lambda _m: None)
    train(TrainConfig(workdir=out["one-lora"], progress=False, lora=LoraSettings(r=4), **TRAIN), log=lambda _m: None)
    precompute = ["precompute-ref", data, "--model", STORIES, *SCORE]
    evaluate = ["eval", "--model", root / "policy", *EVAL]
    for args in ([*precompute, "--workdir", root / "ref1"], [*evaluate, "--workdir", root / "ref1", "--json",
                                                              root / "one.json"]):
        try:  # in this process (no process group): the 1-process results
            main([str(a) for a in args])
        except SystemExit as exc:
            assert not exc.code, args

    out["hsdp-resumed"] = root / "hsdp-resumed"
    out["logs"]["four"] = two_nodes_of_two(root / "out.pt", cache, 60, commands_file(root / "four.json", [
        cli_args(out["hsdp"], hsdp="on"),
        ["copy", out["hsdp"], out["hsdp-resumed"], *STOPPED],
        cli_args(out["hsdp-resumed"], hsdp="on", resume=True),
        [*precompute, "--workdir", root / "ref4", "--shard-model", "on"],
        cli_args(out["hsdp-lora"], hsdp="on", lora_r=4)]))
    out["hsdp_step"] = torch.load(root / "out.pt", weights_only=False)

    out["1to2"] = stopped_at_step_2(out["one"], root / "1to2")
    out["4to2"] = stopped_at_step_2(out["hsdp"], root / "4to2")
    out["logs"]["two"] = torchrun(2, REPO / "tests" / "cli_worker.py", commands_file(root / "two.json", [
        cli_args(out["two"]), cli_args(out["1to2"], resume=True), cli_args(out["4to2"], resume=True),
        [*precompute, "--workdir", root / "ref2", "--shard-model", "on"],
        [*evaluate, "--workdir", root / "ref2", "--json", root / "two.json", "--shard-model", "on"]])).stderr

    out["2to3"] = stopped_at_step_2(out["two"], root / "2to3")
    out["logs"]["three"] = torchrun(3, "-m", "gvpo_offline", *cli_args(out["2to3"], resume=True)).stderr
    out["logs"]["one"] = []
    for case, run in (("2to1", "two"), ("4to1", "hsdp")):
        out[case] = stopped_at_step_2(out[run], root / case)
        train(TrainConfig(workdir=out[case], resume=True, progress=False, **TRAIN), log=out["logs"]["one"].append)
    out["logs"]["one"] = "\n".join(out["logs"]["one"])
    return out


WRITER = {1: "one", 2: "two", 4: "hsdp"}  # the uninterrupted run whose step-2 checkpoint each case resumes
RESHARDED = [  # (case, processes that wrote the checkpoint, processes now, the launch's log, the uninterrupted
    ("2to3", 2, 3, "three", "two"),  # run of the new size, or of the old one when there is none)
    ("2to1", 2, 1, "one", "one"),
    ("1to2", 1, 2, "two", "two"),
    ("4to2", 4, 2, "two", "two"),  # from HSDP (2 nodes × 2) to a flat mesh of 2
    ("4to1", 4, 1, "one", "one"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,written_by,now,log,straight", RESHARDED)
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, case, written_by, now, log, straight):
    run, straight = runs[case], runs[straight]
    assert (f"resuming from {run / 'checkpoints' / 'step-2'} (step 2/{STEPS}; written by {written_by} process(es), "
            f"resharded to {now})") in runs["logs"][log]
    got, want = metrics(run), metrics(straight)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert got[:2] == metrics(runs[WRITER[written_by]])[:2]  # the steps before the checkpoint are kept as they were
    assert [m["epoch"] for m in got] == [0, 0, 1, 1]  # the resumed steps start the next epoch's order
    for a, b in zip(got[2:], want[2:], strict=True):  # the next steps take the same groups in the same order ...
        assert (a["epoch"], a["groups"], a["responses"], a["tokens"]) == (b["epoch"], b["groups"], b["responses"],
                                                                          b["tokens"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)  # ... from the same weights and AdamW state
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == b["lr"]  # the schedule where it was
    a, b = weights(run), weights(straight)
    assert a.keys() == b.keys()
    for k in a:  # 1, 2, 3 and 4 processes sum the same gradient in other orders: float rounding, through AdamW
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), k


@pytest.mark.slow
def test_a_resharded_run_is_the_run_it_continues_and_a_fresh_optimizer_would_not_be(runs, tmp_path):
    # the straight 1- and 2-process runs agree, and a resume that lost AdamW's moments lands elsewhere
    a, b = weights(runs["one"]), weights(runs["two"])
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)
    reset = stopped_at_step_2(runs["one"], tmp_path / "reset")
    optimizer = torch.load(runs["one"] / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    optimizer["state"] = {}  # the same parameter groups, no moments: as if the optimizer state were dropped
    torch.save(optimizer, reset / "checkpoints" / "step-2" / "optimizer.pt")
    train(TrainConfig(workdir=reset, resume=True, progress=False, **TRAIN), log=lambda _m: None)
    c = weights(reset)
    assert max((c[k] - a[k]).abs().max().item() for k in a) > 1e-3


@pytest.mark.slow
def test_a_lora_run_on_hsdp_equals_the_one_process_run(runs):
    """LoRA over 2 "nodes" × 2 (the base sharded within a node, the adapter trained on all 4, checkpoints on the
    way) = the one-process LoRA run: the same losses and adapter, to float rounding."""
    from safetensors.torch import load_file

    from gvpo_offline.model.adapters import ADAPTER_WEIGHTS

    assert runs["logs"]["four"].count("HSDP: 2×2 (nodes × processes per node)") == 3  # hsdp, its resume, hsdp-lora
    hsdp, one = runs["hsdp-lora"], runs["one-lora"]
    state = json.loads((hsdp / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 4 and len(list((hsdp / "checkpoints" / "step-2").glob("__*.distcp"))) == 4
    assert not (hsdp / "model" / "model.safetensors").exists()  # an adapter folder, no full model
    a, b = load_file(hsdp / "model" / ADAPTER_WEIGHTS), load_file(one / "model" / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and len(a) == 70  # LoRA A and B of 7 linear layers × 5 decoder layers
    for k in a:  # AdamW's g / sqrt(v) turns rounding in a near-0 gradient into up to a step (lr = 1e-3): 1e-4
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
    got, want = metrics(hsdp), metrics(one)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for x, y in zip(got, want, strict=True):
        assert (x["groups"], x["responses"], x["tokens"]) == (y["groups"], y["responses"], y["tokens"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_what_cannot_be_resumed_is_still_refused_in_one_line(runs, tmp_path):
    run = stopped_at_step_2(runs["hsdp"], tmp_path / "other-loss")  # an HSDP checkpoint (4 processes)
    with pytest.raises(GvpoError, match=r"^--resume from .*step-2 with different settings: --loss gvpo -> dpo$"):
        train(TrainConfig(workdir=run, resume=True, progress=False, **{**TRAIN, "loss": "dpo"}), log=lambda _m: None)


# ---- a launcher's hygiene (issue 21.5, issue 20 "Launchers") ------------------------------------------------


def _start_long_run(tmp_path: Path):
    """torchrun (2 ranks, in a session of its own) training 400 quick steps with a checkpoint after each;
    returns (torchrun's Popen, the ranks' pids, the workdir, the stderr file) once the first checkpoint is there
    (the ranks are then past their first collectives)."""
    from test_distributed import _children

    workdir = tmp_path / "run"
    build_cache(workdir, STORIES, text_groups(STORIES, STORY_GROUPS))
    log = open(tmp_path / "stderr.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "gvpo_offline", *cli_args(workdir, max_steps=400, save_every=1)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 200
    while not list((workdir / "checkpoints").glob("step-*")):
        assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    return proc, ranks, workdir, log


# (killing torchrun's process group ends its ranks at once without writing: test_distributed.py's kill -9 test,
# which then resumes the run)


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


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_a_sharded_reference_gives_the_unsharded_cache(runs, processes):
    import pyarrow.parquet as pq

    from gvpo_offline.stages import reference

    root, log = runs["root"], runs["logs"]["two" if processes == 2 else "four"]
    assert f"scoring with the model sharded over {processes} processes (FSDP, forward only)" in log
    one, many = reference.read_manifest(root / "ref1"), reference.read_manifest(root / f"ref{processes}")
    assert len(one.shards) == 3
    for field in ("key", "inputs", "shards", "counts", "truncated_prompts", "truncated_responses", "complete"):
        assert getattr(many, field) == getattr(one, field), field
    for shard in one.shards:
        a, b = pq.read_table(root / "ref1" / shard), pq.read_table(root / f"ref{processes}" / shard)
        assert a.drop(["ref_logp"]).equals(b.drop(["ref_logp"]))
        assert a["ref_logp"].to_numpy() == pytest.approx(b["ref_logp"].to_numpy(), rel=1e-6)  # batch rounding


@pytest.mark.slow
def test_a_sharded_policy_gives_the_unsharded_eval(runs):
    from test_distributed import _close

    root = runs["root"]
    assert "scoring with the model sharded over 2 processes (FSDP, forward only)" in runs["logs"]["two"]
    one, two = (json.loads((root / name).read_text()) for name in ("one.json", "two.json"))
    assert two["counts"] == one["counts"] and one["counts"]["groups"] > 0
    assert one["model"]["gvpo_loss"] != one["reference"]["gvpo_loss"]  # the policy's log-probs were computed
    for section in ("model", "reference", "delta"):
        assert _close(two[section], one[section]), section


@pytest.mark.slow
@pytest.mark.parametrize("log", ["two", "four"])
def test_precompute_progress_under_torchrun_counts_the_whole_job(runs, log):
    import re

    counts = [tuple(map(int, m)) for m in re.findall(r"reference log-probs.*?([\d,]+)/([\d,]+)",
                                                    runs["logs"][log].replace(",", ""))]
    assert counts, runs["logs"][log][-2000:]
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
def test_hsdp_on_two_nodes_of_two_gives_the_single_process_gradient(runs):
    from gvpo_offline.model.loading import load_model
    from gvpo_offline.stages.train.step import gvpo_backward, load_train_groups, make_batch

    got = runs["hsdp_step"]
    assert got["hsdp"] and got["nodes"] == (2, 2)  # --hsdp auto: on, since the job spans 2 nodes
    assert got["mesh"] == (2, 2) and got["mesh_names"] == ("replicate", "shard")
    assert got["placements"] == ["R", "S(0)"]  # each node holds one sharded copy
    full = load_model(STORIES, torch.device("cpu")).model.layers[0].mlp.up_proj.weight.shape[0]
    assert got["local_rows"] == full // 2  # sharded over a node's 2 processes, not the job's 4

    groups = load_train_groups(runs["cache"])
    batch = make_batch(groups, list(range(groups.n_groups)))
    model = load_model(STORIES, torch.device("cpu"))
    stats = gvpo_backward(model, batch, 1.0, 10**6)  # one process, every group in one pass
    assert got["loss"] == pytest.approx(stats.loss, rel=1e-5)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0 and torch.allclose(got["grads"][name], p.grad, rtol=0, atol=1e-5 * scale), name


@pytest.mark.slow
def test_a_whole_hsdp_run_equals_one_process_and_resumes_on_hsdp_exactly(runs):
    from torch.distributed.checkpoint import FileSystemReader

    from gvpo_offline.stages.train.checkpoints import saved_world_size

    hsdp, one, log = runs["hsdp"], runs["one"], runs["logs"]["four"]
    assert log.count("HSDP: 2×2 (nodes × processes per node)") == 3  # the run, its resumption, the LoRA run
    assert log.count("on 4 process(es) (HSDP: sharded over each node's 2, replicated across nodes)") == 3  # plans
    step2 = hsdp / "checkpoints" / "step-2"
    assert saved_world_size(step2) == 4 and {f"rng-{r}.pt" for r in range(4)} <= {p.name for p in step2.iterdir()}
    rows = load_file(STORIES / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].shape[0]
    saved = FileSystemReader(str(step2)).read_metadata().state_dict_metadata
    for key in ("model.model.layers.0.mlp.up_proj.weight", "optimizer.state.model.layers.0.mlp.up_proj.weight.exp_avg"):
        # written from the (replicate, shard) mesh: each node's copy in 2 row blocks, saved once (not per node)
        assert [c.sizes[0] for c in saved[key].chunks] == [rows // 2] * 2, key

    # the whole run: the 1-process run's steps and weights, to float rounding
    a, b, start = weights(hsdp), weights(one), load_file(STORIES / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((b[k] - start[k].float()).abs().max().item() for k in b if k in start) > 1e-3  # it trained
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), k
    got, want = metrics(hsdp), metrics(one)
    assert [m["groups"] for m in got] == [3, 1, 3, 1] and [m["groups"] for m in want] == [3, 1, 3, 1]
    for x, y in zip(got, want, strict=True):  # a step of 1 group: 3 of the 4 ranks ran padding passes only
        assert (x["epoch"], x["responses"], x["tokens"], x["lr"]) == (y["epoch"], y["responses"], y["tokens"], y["lr"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)

    # resumed from its step-2 checkpoint on the same HSDP mesh: the uninterrupted run, bit for bit
    resumed = runs["hsdp-resumed"]
    assert f"resuming from {resumed / 'checkpoints' / 'step-2'} (step 2/{STEPS})\n" in log
    c = weights(resumed)
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert timeless(metrics(resumed)) == timeless(got)


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


def test_the_memory_plan_of_an_hsdp_run_shards_the_state_over_a_node_not_the_job(monkeypatch):
    from gvpo_offline.model import distributed, rank0_load
    from gvpo_offline.stages.train.dry_run import dry_run

    params = sum(p.numel() for p in rank0_load.build_on_meta(STORIES, torch.float32).parameters())

    def planned(**options):
        cfg = TrainConfig(workdir=Path("unused"), beta=1, init_model=str(STORIES), device="cpu", **options)
        return dry_run(cfg, lambda _m: None, processes=8, processes_per_node=2)

    hsdp = planned()  # 4 nodes × 2: --hsdp auto is on, each node holds one sharded copy of the state
    assert (hsdp.world_size, hsdp.shard_size) == (8, 2)
    assert (hsdp.params_bytes, hsdp.grads_bytes, hsdp.optimizer_bytes) == (4 * -(-params // 2), 4 * -(-params // 2),
                                                                           8 * -(-params // 2))
    assert "(HSDP: sharded over each node's 2, replicated across nodes)" in hsdp.describe()
    flat = planned(hsdp="off")  # before, every plan was this one (1/8 of the state), also for an HSDP run
    assert flat.shard_size == 8 and flat.params_bytes == 4 * -(-params // 8) and "HSDP" not in flat.describe()
    assert hsdp.per_rank_bytes - flat.per_rank_bytes == 16 * (-(-params // 2) - -(-params // 8))

    # the plan train prints before loading: the launch's own HSDP choice (torchrun's LOCAL_WORLD_SIZE)
    from gvpo_offline.stages.train.recipe import run_shape

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    four = distributed.Dist(rank=0, world_size=4, device=torch.device("cpu"))
    assert run_shape(TrainConfig(workdir=Path("unused"), beta=1), four, torch.device("cpu"), 60).hsdp
    assert not run_shape(TrainConfig(workdir=Path("unused"), beta=1, hsdp="off"), four, torch.device("cpu"), 60).hsdp


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
