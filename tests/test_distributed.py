"""torchrun --nproc_per_node 2 with gloo on CPU: the sharded step's gradient (full and LoRA), precompute-ref,
eval and a LoRA train run equal their single-process results; kill -9 of torchrun's process group ends its ranks
at once without writing, and --resume then equals the uninterrupted 2-process run; an error on one rank stops
every rank at once with the same one-line message.

Each launch is a real ``python -m torch.distributed.run --standalone`` (OMP_NUM_THREADS=1 per process, a
60 s process-group timeout, and a subprocess timeout)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cachefixture import STORIES, STORY_GROUPS, build_cache, save_perturbed_policy, set_lora_weights, text_groups
from conftest import REPO, write_jsonl
from rich.console import Console
from safetensors.torch import load_file

from gvpo_offline.data import DataConfig
from gvpo_offline.data.tokenize import TokenizeConfig
from gvpo_offline.math.loss import OBJECTIVES
from gvpo_offline.model import adapters, distributed, memory_plan
from gvpo_offline.model.loading import load_model
from gvpo_offline.model.logprobs import length_batches, sequence_logps
from gvpo_offline.runtime import workdir as workdirs
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.files import atomic_write_json, atomic_write_table, sha256_file
from gvpo_offline.stages import reference
from gvpo_offline.stages.evaluate.heldout import EvalConfig, evaluate
from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train
from gvpo_offline.stages.train.step import gvpo_backward, load_train_groups, make_batch, pack_groups

MICRO_TOKENS = 60  # small enough that some groups are cut across micro-batches
STEPS = 8  # a checkpoint every 2 steps: the kill test stops the run after its first, with 6 steps to go
TRAIN_ARGS = ["--beta", "1", "--lr", "1e-3", "--groups-per-step", "3", "--max-steps", STEPS, "--save-every", "2",
              "--micro-batch-tokens", MICRO_TOKENS, "--device", "cpu", "--seed", "1"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One 2-process launch of tests/dist_worker.py (a sharded step, precompute-ref, eval) and its inputs."""
    root = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    step_cache = root / "step"
    build_cache(step_cache, STORIES, text_groups(STORIES, STORY_GROUPS))
    lines = (REPO / "sample_data" / "groups.jsonl").read_text().splitlines()[:8]
    data = write_jsonl(root / "data.jsonl", [json.loads(line) for line in lines])
    save_perturbed_policy(root / "policy")  # a policy away from the reference, for eval
    out, straight = root / "out.pt", root / "straight"
    shutil.copytree(step_cache, straight)
    done = subprocess.run(
        torchrun(REPO / "tests" / "dist_worker.py", out, step_cache, MICRO_TOKENS, data, root / "ref2", root / "policy",
                 straight, *TRAIN_ARGS),
        env=env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "step_cache": step_cache, "data": data, "policy": root / "policy", "straight": straight,
            "stderr": done.stderr, "out": torch.load(out, weights_only=False)}


@pytest.mark.slow
def test_sharded_step_gradient_equals_the_single_process_gradient(launch):  # GVPO (padded, packed), dpo
    groups = load_train_groups(launch["step_cache"])
    batch = make_batch(groups, list(range(groups.n_groups)))
    model = load_model(STORIES, torch.device("cpu"))
    stats = gvpo_backward(model, batch, 1.0, 10**6)  # one process, every group in one pass
    got = launch["out"]
    assert got["loss"] == pytest.approx(stats.loss, rel=1e-5)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert torch.allclose(got["grads"][name], p.grad, rtol=0, atol=1e-5 * scale), name

    # the sharded step with packed rows, against the same: attention per piece sums in another order than
    # padded sequences (1.5e-5 of the largest entry in one process, float32), so test_packing's bound
    for name, p in model.named_parameters():
        assert torch.allclose(got["packed_grads"][name], p.grad, rtol=0, atol=1e-4 * p.grad.abs().max().item()), name
    model.zero_grad(set_to_none=True)
    dpo = gvpo_backward(model, batch, 1.0, 10**6, objective=OBJECTIVES["dpo"])
    assert got["dpo_loss"] == pytest.approx(dpo.loss, rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(got["dpo_grads"][name], p.grad, rtol=0, atol=1e-5 * p.grad.abs().max().item()), name

    # the ranks had disjoint shares of whole groups, and a deliberately uneven number of passes
    shares = got["rank_groups"]
    assert sorted(g for share in shares for g in share) == list(range(groups.n_groups))
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    rows = [[i for i, g in enumerate(batch.group_index.tolist()) if g == h] for h in range(batch.n_groups)]

    def passes(share):
        packs, split = pack_groups(lengths, [rows[g] for g in share], MICRO_TOKENS)
        cut = sum(len(length_batches([lengths[i] for i in rows[share[g]]], MICRO_TOKENS)) for g in split)
        return cut, len(packs) + cut  # (no-grad, with-grad) passes

    assert passes(shares[0]) != passes(shares[1]), "the test needs ranks with different pass counts"



@pytest.mark.slow
def test_sharded_step_with_gradient_checkpointing_equals_the_single_process_gradient(launch):
    groups = load_train_groups(launch["step_cache"])
    batch = make_batch(groups, list(range(groups.n_groups)))
    model = load_model(STORIES, torch.device("cpu"))  # one process, no checkpointing, every group in one pass
    stats = gvpo_backward(model, batch, 1.0, 10**6)
    got = launch["out"]
    plain_calls, checkpointed_calls = got["layer_calls"]  # rank 0's calls of layer 0's MLP in the step
    assert checkpointed_calls > plain_calls > 0  # the layers were recomputed in the backward passes
    assert got["checkpointed_loss"] == pytest.approx(stats.loss, rel=1e-5)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0 and torch.allclose(got["checkpointed_grads"][name], p.grad, rtol=0, atol=1e-5 * scale), name


def _assert_loaded_as(loaded: dict, params: dict, buffers: dict, empty: list[int]) -> None:
    """rank0_load's model (dist_worker.broadcast_loaded) holds exactly ``params`` and, on every rank, ``buffers``;
    ``empty``: how many parameters each rank held without their weights before sharding."""
    assert loaded["empty"] == empty
    assert loaded["params"].keys() == params.keys()
    for name, p in params.items():
        got = loaded["params"][name]
        assert got.dtype == p.dtype and torch.equal(got, p), name
    assert "model.rotary_emb.inv_freq" in {n.removeprefix("base_model.model.") for n in buffers}
    for rank_buffers in loaded["buffers"]:  # not in the state dict: copied from rank 0, not left uninitialised
        assert rank_buffers.keys() == buffers.keys()
        for name, b in buffers.items():
            assert rank_buffers[name].dtype == b.dtype and torch.equal(rank_buffers[name], b), name


@pytest.mark.slow
def test_rank0_loading_equals_a_plain_load_bit_for_bit(launch):
    got = launch["out"]
    plain = load_model(STORIES, torch.device("cpu"))
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # stories260K ties them
    n = len(list(plain.parameters()))
    # safetensors: no rank read the model before sharding; each read its own shards' rows (sliced_load.py)
    _assert_loaded_as(got["loaded"], dict(plain.named_parameters()), dict(plain.named_buffers()), [n, n])
    assert got["loaded"]["tied"] == [True, True]  # still one parameter on every rank after sharding

    # an --init-model adapter folder: its base with the adapter merged, as a plain load merges it; rank 0 reads
    # the weights, rank 1 built the model on meta (rank0_load's broadcast)
    merged = load_model(launch["root"] / "lora-step", torch.device("cpu"))
    assert not torch.equal(merged.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].mlp.up_proj.weight)
    _assert_loaded_as(got["loaded_merged"], dict(merged.named_parameters()), dict(merged.named_buffers()), [0, n])
    assert got["loaded_merged"]["tied"] == [True, True]

    # weights that cannot be read: both ranks stop, with rank 0's one line
    first, second = got["load_errors"]
    assert first == second and first.startswith("rank 0: cannot load the model ") and "\n" not in first

    # LoRA on a bfloat16 base: the base is a plain bf16 load, the adapter rank 0's values before sharding
    lora, prefix = got["loaded_lora"], "base_model.model."
    base = {prefix + name: p for name, p in load_model(STORIES, torch.device("cpu"), torch.bfloat16).named_parameters()}
    params = {name: lora["before"][name] if "lora_" in name else base[name.replace(".base_layer.", ".")]
              for name in lora["params"]}
    assert {p.dtype for name, p in params.items() if "lora_" in name} == {torch.float32}
    assert len(params) == len(base) + 70  # the base's parameters and LoRA's A and B of 35 linear layers
    plain_buffers = load_model(STORIES, torch.device("cpu"), torch.bfloat16).named_buffers()
    _assert_loaded_as(lora, params, {prefix + name: b for name, b in plain_buffers}, [n, n])
    assert lora["tied"] == [True, True]


@pytest.mark.slow
def test_sharded_lora_step_train_run_and_adapter_folder_equal_one_process(launch, tmp_path):
    from peft import PeftModel

    groups = load_train_groups(launch["step_cache"])
    batch = make_batch(groups, list(range(groups.n_groups)))
    model = adapters.add_lora(load_model(STORIES, torch.device("cpu")), adapters.LoraSettings(r=4))
    set_lora_weights(model)
    stats = gvpo_backward(model, batch, 1.0, 10**6)  # one process, every group in one pass
    got = launch["out"]
    assert got["lora_loss"] == pytest.approx(stats.loss, rel=1e-5)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert got["lora_grads"].keys() == trainable.keys() and len(trainable) == 70  # only LoRA A and B: 7 × 5 × 2
    for name, p in trainable.items():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        assert torch.allclose(got["lora_grads"][name], p.grad, rtol=0, atol=3e-5 * scale), name  # fp32 sums in another order: up to 1.2e-5 seen

    # the adapter folder gathered from the shards is a plain PEFT adapter computing what the shards computed
    folder = launch["root"] / "lora-step"
    assert {adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS} <= {p.name for p in folder.iterdir()}
    assert not (folder / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(load_model(STORIES, torch.device("cpu")), folder).eval()
    with torch.no_grad():
        logps = sequence_logps(loaded, batch.prompt_ids, batch.response_ids)
    assert torch.allclose(logps, got["lora_logps"], rtol=1e-5, atol=0)

    # train --lora-r --merge under 2 processes = 1 process (to rounding); resumed from step 2 = straight (exact)
    two, resumed, one = Path(f"{launch['straight']}-lora"), Path(f"{launch['straight']}-lora-resumed"), tmp_path / "one"
    shutil.copytree(launch["step_cache"], one)
    train(TrainConfig(workdir=one, beta=1, lr=1e-3, groups_per_step=3, max_steps=4, save_every=0, micro_batch_tokens=60,
                      device="cpu", seed=1, lora=adapters.LoraSettings(r=4), merge=True, progress=False),
          log=lambda _m: None)
    a, b = load_file(two / "model" / adapters.ADAPTER_WEIGHTS), load_file(one / "model" / adapters.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and len(a) == 70
    for k in a:  # AdamW's g / sqrt(v) turns rounding in a near-0 gradient into up to a step (lr = 1e-3): 1e-4
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
    c, d = _weights(two / "model-merged"), _weights(one / "model-merged")
    assert c.keys() == d.keys()
    for k in c:
        assert torch.allclose(c[k], d[k], rtol=0, atol=1e-4), k
    for x, y in zip(_metrics(two), _metrics(one), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(two / "checkpoints" / "step-2")).read_metadata().state_dict_metadata
    adapter, in_model = {f"model.{k}" for k in trainable}, {k for k in saved if k.startswith("model.")}
    assert adapter <= in_model and in_model - adapter <= {"model.base_model.model.lm_head.weight"}  # (tied: kept)
    e = load_file(resumed / "model" / adapters.ADAPTER_WEIGHTS)
    assert e.keys() == a.keys() and all(torch.equal(a[k], e[k]) for k in a)
    assert _metrics(resumed) == _metrics(two)

@pytest.mark.slow
def test_precompute_ref_and_eval_under_two_processes_equal_one_process(launch):
    root, quiet = launch["root"], Console(quiet=True)
    one = precompute(PrecomputeConfig(DataConfig((str(launch["data"]),)), str(STORIES), root / "ref1",
                                      TokenizeConfig(max_length=128, max_prompt_length=64), eval_fraction=0.5,
                                      shard_groups=3, device="cpu", progress=False), quiet)
    two = reference.read_manifest(root / "ref2")
    assert len(one.shards) == 3 and one.counts["eval"].groups > 0
    for field in ("key", "inputs", "shards", "counts", "truncated_prompts", "truncated_responses", "complete"):
        assert getattr(two, field) == getattr(one, field), field
    for shard in one.shards:
        a, b = pq.read_table(root / "ref1" / shard), pq.read_table(root / "ref2" / shard)
        assert a.drop(["ref_logp"]).equals(b.drop(["ref_logp"]))
        assert a.schema.metadata == b.schema.metadata
        assert a["ref_logp"].to_numpy() == pytest.approx(b["ref_logp"].to_numpy(), rel=1e-6)  # batch rounding

    report = evaluate(EvalConfig(workdir=str(root / "ref1"), model_path=str(launch["policy"]), beta=1.0,
                                 bootstrap=200, device="cpu"), quiet).to_json()
    got = launch["out"]["eval"]
    assert got["meta"]["model_is_reference"] is False and got["model"]["gvpo_loss"] != got["reference"]["gvpo_loss"]
    assert got["counts"] == report["counts"] and got["counts"]["groups"] > 0
    for section in ("model", "reference", "delta", "intervals"):
        assert _close(got[section], report[section]), section


def _close(a, b) -> bool:
    """Equal structure, numbers equal to float rounding (log-probs summed in other batches)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=2e-5, abs=1e-6)  # fp32 log-probs of ~250 nats: ~1e-7 relative each
    return a == b


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _metrics(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "time", "elapsed")} for r in rows]  # wall clock


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_kill_9_of_torchrun_ends_its_ranks_at_once_without_writing_and_resume_equals_the_uninterrupted_run(
        launch, tmp_path):
    args = [str(a) for a in TRAIN_ARGS]
    straight, killed, single = launch["straight"], tmp_path / "killed", tmp_path / "single"
    for workdir in (killed, single):
        shutil.copytree(launch["step_cache"], workdir)
    cli = ["-m", "gvpo_offline", "train"]
    assert launch["stderr"].count("memory plan:") == 3  # printed by rank 0 only, once per train run (full, 2 LoRA)

    log = open(tmp_path / "killed.log", "w+")
    proc = subprocess.Popen(torchrun(*cli, "--workdir", killed, *args), env=env(), stdout=subprocess.DEVNULL,
                            stderr=log, start_new_session=True)
    deadline = time.monotonic() + 200
    while not list((killed / "checkpoints").glob("step-*")):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ranks = _children(proc.pid)  # torchrun starts each rank in a session of its own
    assert len(ranks) == 2
    killed_at = time.time()
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun's process group: its ranks get no signal from this
    proc.wait()
    while any(_alive(r) for r in ranks):  # before: they trained on, writing checkpoints and model/
        assert time.monotonic() < deadline and time.time() < killed_at + 10, "a rank outlived its launcher by 10 s"
        time.sleep(0.05)
    assert max(p.stat().st_mtime for p in killed.rglob("*")) < killed_at + 0.5  # nothing written after the kill
    while True:  # their workdir lock goes with their last thread
        try:
            with workdirs.lock(killed, "train"):
                break
        except GvpoError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    log.close()
    assert not (killed / "model").exists()
    saved = sorted((killed / "checkpoints").glob("step-*"))[-1]
    assert {"rng-0.pt", "rng-1.pt", ".metadata"} <= {p.name for p in saved.iterdir()}  # DCP shards + each rank's RNG
    assert len(_metrics(killed)) < STEPS, "the run finished before it could be killed"

    done = subprocess.run(torchrun(*cli, "--workdir", killed, *args, "--resume"), env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    a, b = _weights(straight / "model"), _weights(killed / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact: same world size, same shards
    assert _metrics(killed) == _metrics(straight)
    assert json.loads((killed / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    # and the 2-process run is the 1-process run, to float rounding
    train(TrainConfig(workdir=single, beta=1, lr=1e-3, groups_per_step=3, max_steps=STEPS, save_every=0,
                      micro_batch_tokens=MICRO_TOKENS, device="cpu", seed=1, progress=False), log=lambda _m: None)
    c = _weights(single / "model")
    assert a.keys() == c.keys()
    for k in a:
        assert torch.allclose(a[k], c[k], rtol=0, atol=1e-4), k
    # AdamW steps at lr 1e-3 whose loss swings by orders of magnitude: step 1 agrees to 4e-7, and the sums in
    # another order drift (|Δloss| 2.5e-5 on a loss of 0.198 was seen at step 10 of a 16-step run)
    for x, y in zip(_metrics(straight), _metrics(single)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=5e-4)


# ---- an error on one rank only: every rank stops at once, with the same message -------------------------


# well under the ranks' 300 s process-group timeout, well over their start-up (up to 70 s was seen on the shared
# 2-core test machine: torch's import and the model's load, twice at once)
PATIENCE = 200


def two_ranks(*args, limit: float = PATIENCE) -> tuple[list[tuple[int, str]], float]:
    """``gvpo-offline *args`` as 2 ranks with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT; a
    300 s process-group timeout), each a process of its own. torchrun would SIGTERM the other ranks as soon as
    one exits (hiding a rank that waits; on other nodes nobody does), so here nothing ends a rank before
    ``limit`` s. Returns ([(exit code, stderr)] by rank, seconds until both exited); started again on another
    port when the free port found was taken before rank 0 could listen on it."""
    results, seconds = _two_ranks_once(args, limit)
    if any("EADDRINUSE" in err for _, err in results):
        results, seconds = _two_ranks_once(args, limit)
    return results, seconds


def _two_ranks_once(args, limit: float) -> tuple[list[tuple[int, str]], float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {**env(), distributed.TIMEOUT_ENV: "300", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
              "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "gvpo_offline", *map(str, args)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, limit - (time.monotonic() - started)))
            results.append((proc.returncode, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank still ran after {limit:g} s (waiting in a collective?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results, time.monotonic() - started


def _set_ref_logp(workdir: Path, group_ids: set[str], value: float) -> None:
    """Overwrite the cached ref_logp of these groups' responses (shard checksum and size updated)."""
    shard = workdir / reference.REF_DIR / "shard-00000.parquet"
    table = pq.read_table(shard)
    ref = [value if g in group_ids else v for g, v in zip(table["group_id"].to_pylist(), table["ref_logp"].to_pylist())]
    atomic_write_table(shard, table.set_column(table.schema.get_field_index("ref_logp"), "ref_logp",
                                               pa.array(ref, pa.float64())))
    manifest = json.loads((workdir / reference.MANIFEST).read_text())
    manifest.update(shard_sizes=[shard.stat().st_size], shard_sha256=[sha256_file(shard)])
    atomic_write_json(workdir / reference.MANIFEST, manifest)


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_both_ranks_at_once_with_its_message(tmp_path, run_cli):
    workdir = tmp_path / "run"
    build_cache(workdir, STORIES, text_groups(STORIES, STORY_GROUPS))
    groups = load_train_groups(workdir)
    tokens = make_batch(groups, list(range(groups.n_groups))).group_tokens  # a step of all 4 groups
    assert distributed.balanced_split(tokens, 2)[1] == [0, 3]  # g0000 and g0003 are rank 1's, whatever the order
    _set_ref_logp(workdir, {"g0000", "g0003"}, float("inf"))
    # 79 padded tokens: g0000 (3 × 26) goes in one pass, g0003 (4 × 20) is cut across micro-batches, and so is
    # rank 0's g0002 (5 × 19): rank 1 fails in its first backward pass and must still join every later one
    args = ["train", "--workdir", workdir, "--beta", "1", "--groups-per-step", "4", "--max-steps", "2",
            "--micro-batch-tokens", 79, "--device", "cpu"]

    one = run_cli(*args)
    assert one.code == 2 and "the cached reference log-probs (ref_logp) are not finite" in one.err
    line = one.err.strip().splitlines()[-1]
    assert line.startswith("error: step 1 (epoch 0): ")

    results, seconds = two_ranks(*args)
    assert seconds < PATIENCE  # not the 300 s process-group timeout
    # both ranks: rank 1's message, one line, and the exit code of the 1-process run
    assert _outcomes(results) == [(2, [line.replace("error: ", "error: rank 1: ", 1)])] * 2, results
    assert not (workdir / "model").exists() and not (workdir / "checkpoints").exists()
    assert not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_eval_refused_by_rank_0_s_locks_stops_the_other_rank_too(tmp_path, run_cli):
    workdir = tmp_path / "run"
    eval_groups = text_groups(STORIES, STORY_GROUPS)
    for group in eval_groups:
        group.split = "eval"
    build_cache(workdir, STORIES, eval_groups)
    policy = load_model(STORIES, torch.device("cpu"))  # not the reference: every rank scores its share
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.01)
    policy.save_pretrained(tmp_path / "policy")
    args = ["eval", "--workdir", workdir, "--model", tmp_path / "policy", "--beta", "1", "--bootstrap", "0",
            "--device", "cpu"]
    with workdirs.lock(workdir, "ref"):  # as a running precompute-ref holds it: only rank 0 takes the locks
        one = run_cli(*args)
        assert one.code == 2 and "is using this workdir" in one.err
        line = one.err.strip().splitlines()[-1]
        results, seconds = two_ranks(*args)
    assert seconds < PATIENCE
    assert _outcomes(results) == [(2, [line.replace("error: ", "error: rank 0: ", 1)])] * 2, results


def _outcomes(results: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """(exit code, its stderr lines that say an error: "error: ..." or a traceback's first line) by rank."""
    return [(code, [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line])
            for code, err in results]


def test_agree_in_one_process_raises_the_error_itself():
    ctx = distributed.Dist()
    distributed.agree(ctx, None)
    error = GvpoError("data.jsonl: line 3: bad")
    with pytest.raises(GvpoError) as raised:
        distributed.agree(ctx, error)
    assert raised.value is error
    with pytest.raises(GvpoError, match="^boom$"), distributed.together(ctx):
        raise GvpoError("boom")


# ---- one process: no process group, the split, the memory plan ----------------------------------------


def test_a_plain_run_has_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "_CONTEXT", None)
    ctx = distributed.context("cpu")
    assert (ctx.world_size, ctx.rank, ctx.enabled, ctx.is_main) == (1, 0, False, True)
    assert not torch.distributed.is_initialized()
    assert distributed.step_share(ctx, [5, 3]) is None
    assert distributed.all_reduce_max(ctx, [2, 7]) == [2, 7]


def test_balanced_split_is_disjoint_whole_and_token_balanced():
    tokens = [100, 90, 40, 30, 30, 20, 5, 1]
    shares = distributed.balanced_split(tokens, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(tokens)))
    # longest first, each to the least-loaded rank (ties: lowest): 100 90 40 | 30 30 -> rank 2 | 20 -> 1 | 5 -> 0 | 1 -> 2
    assert shares == [[0, 6], [1, 5], [2, 3, 4, 7]]
    assert [sum(tokens[i] for i in s) for s in shares] == [105, 110, 101]
    assert distributed.balanced_split([4, 4], 3) == [[0], [1], []]  # more ranks than groups: an empty share


def test_memory_plan_counts_16_bytes_per_parameter_over_the_ranks():
    plan = memory_plan.plan_for(params=1000, layer_params=100, world_size=4, on_gpu=True)
    assert (plan.params_bytes, plan.grads_bytes, plan.optimizer_bytes) == (1000, 1000, 2000)
    # two bf16 layers gathered (one computing, one prefetched) + one layer's fp32 gradient before reduce-scatter
    assert plan.gathered_layer_bytes == 2 * 100 * 2 + 4 * 100 and plan.per_rank_bytes == 4800
    assert memory_plan.plan_for(1000, 100, 1, on_gpu=False).per_rank_bytes == 16000


def test_memory_plan_counts_a_frozen_base_without_gradients_or_optimizer_state():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    total = sum(p.numel() for p in model.parameters())
    trainable = model.lm_head.weight
    for p in model.parameters():
        p.requires_grad_(p is trainable)
    model.model.to(torch.bfloat16)  # a LoRA base held in bf16: 2 bytes per frozen weight
    plan = memory_plan.memory_plan(model, distributed.Dist(), torch.device("cpu"))
    frozen = total - trainable.numel()
    assert plan.params == trainable.numel()
    assert plan.params_bytes == 4 * trainable.numel() + 2 * frozen
    assert (plan.grads_bytes, plan.optimizer_bytes) == (4 * trainable.numel(), 8 * trainable.numel())
    # under FSDP (LoRA under torchrun) the frozen base is sharded like the rest: 1/4 of it per rank
    sharded = memory_plan.plan_for(trainable.numel(), 0, 4, on_gpu=True, frozen_bytes=2 * frozen)
    assert sharded.params_bytes == 4 * -(-trainable.numel() // 4) + -(-2 * frozen // 4)


def test_memory_plan_says_only_rank_0_holds_the_full_model_while_loading():
    plan = memory_plan.plan_for(params=1000, layer_params=100, world_size=4, on_gpu=True, frozen_bytes=600,
                                rank0_reads_all=True)  # rank0_load.py's broadcast (an adapter folder, .bin weights)
    assert plan.rank0_load_bytes == 4 * 1000 + 600  # fp32 trainable weights + the frozen ones, on rank 0 only
    assert plan.per_rank_bytes == 4 * 250 + 150 + 1000 + 2000 + 800  # the training state is unchanged by it
    assert "rank 0 alone holds the full model in CPU RAM" in plan.describe()
    one = memory_plan.plan_for(1000, 100, 1, on_gpu=True)  # one process loads what it trains: nothing to add
    assert one.rank0_load_bytes == 0 and "rank 0" not in one.describe()
    sliced = memory_plan.plan_for(1000, 100, 4, on_gpu=True, largest_tensor_bytes=400)  # sliced_load.py: no full copy
    assert sliced.rank0_load_bytes == 0 and sliced.loading_bytes == 400 and "rank 0" not in sliced.describe()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_meta_built_model_has_the_loaded_models_parameters_and_buffers(dtype):
    from gvpo_offline.model import rank0_load

    loaded = load_model(STORIES, torch.device("cpu"), dtype)
    meta = rank0_load.build_on_meta(STORIES, dtype)
    assert all(p.is_meta for p in meta.parameters()) and not meta.training
    assert rank0_load._layout(meta) == rank0_load._layout(loaded)
    assert meta.lm_head.weight is meta.model.embed_tokens.weight  # tied, as loaded
    assert rank0_load._stateless_buffers(meta) == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]


def test_a_model_that_cannot_be_loaded_stops_with_one_line(tmp_path):
    from gvpo_offline.model import rank0_load

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GvpoError, match=r"^cannot load the model .*: ValueError: .*\S$"):
        rank0_load.load_for_sharding(distributed.Dist(), tmp_path, torch.float32)


def test_a_run_that_cannot_fit_stops_before_training(launch_free_cache, monkeypatch):
    monkeypatch.setattr(memory_plan, "available_ram_bytes", lambda: 1 << 20)  # 1 MiB of RAM
    with pytest.raises(GvpoError, match=r"does not fit: memory plan: 0\.3M trainable parameters"):
        train(TrainConfig(workdir=launch_free_cache, beta=1, device="cpu", progress=False), log=lambda _m: None)
    assert not (launch_free_cache / "metrics.jsonl").exists()


@pytest.fixture
def launch_free_cache(tmp_path) -> Path:
    build_cache(tmp_path / "run", STORIES, text_groups(STORIES, STORY_GROUPS[:2]))
    return tmp_path / "run"


def test_sample_is_refused_under_a_launcher(monkeypatch, run_cli):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_cli("sample", "prompts.txt", "--model", str(STORIES), "--reward", "r.py:f", "-o", "out.jsonl", "--k", "2")
    assert result.code == 2 and "sample runs in one process" in result.err
