"""The memory plan (model/memory_plan.py): made from config.json before any weight is read, against the real
capacity (cgroup limits, free GPU memory), with advice that exists on the device; ``train --dry-run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups

from gvpo_offline.model import adapters, capacity, memory_plan
from gvpo_offline.runtime.errors import GvpoError

GIB = 1 << 30

# Llama-3.1-8B's published config.json shapes (docs/scale-out.md's worked plans use these, and 70B's)
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA_31_70B = {**LLAMA_31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                "num_attention_heads": 64}


def llama_params(c: dict) -> int:
    """Parameters of a Llama by its shapes, counted by hand (independent of transformers)."""
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + h


def config_folder(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---- capacity -------------------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_room_is_the_tightest_limit_minus_its_working_set(tmp_path):
    root = tmp_path / "cg"
    write(tmp_path / "self", "0::/job/step\n")
    write(root / "job" / "memory.max", f"{8 * GIB}\n")  # the job's limit: 8 GiB, 5 GiB used of which 1 GiB cache
    write(root / "job" / "memory.current", f"{5 * GIB}\n")
    write(root / "job" / "memory.stat", f"anon 1\ninactive_file {GIB}\n")
    write(root / "job" / "step" / "memory.max", "max\n")  # no limit of its own
    write(root / "memory.max", f"{64 * GIB}\n")
    write(root / "memory.current", f"{10 * GIB}\n")
    assert capacity.cgroup_room_bytes(tmp_path / "self", root) == 8 * GIB - (5 * GIB - GIB)


def test_cgroup_v1_room_and_no_limit(tmp_path):
    root = tmp_path / "cg"
    write(tmp_path / "self", "4:memory:/job\n0::/\n")
    write(root / "memory" / "job" / "memory.limit_in_bytes", f"{4 * GIB}\n")
    write(root / "memory" / "job" / "memory.usage_in_bytes", f"{3 * GIB}\n")
    write(root / "memory" / "job" / "memory.stat", f"total_inactive_file {GIB // 2}\n")
    assert capacity.cgroup_room_bytes(tmp_path / "self", root) == 4 * GIB - (3 * GIB - GIB // 2)
    write(root / "memory" / "job" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert capacity.cgroup_room_bytes(tmp_path / "self", root) is None


def test_available_ram_is_the_lower_of_memavailable_and_the_cgroup_room(monkeypatch):
    monkeypatch.setattr(capacity, "mem_available_bytes", lambda: 100 * GIB)
    monkeypatch.setattr(capacity, "cgroup_room_bytes", lambda: 6 * GIB)
    assert capacity.available_ram_bytes() == 6 * GIB
    monkeypatch.setattr(capacity, "cgroup_room_bytes", lambda: None)
    assert capacity.available_ram_bytes() == 100 * GIB


def test_gpu_capacity_is_its_free_memory_not_its_total(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * GIB, 80 * GIB))  # a CPU stand-in
    assert memory_plan.capacity(torch.device("cuda", 0), cpu_offload=False, local_world_size=8)[0] == 30 * GIB
    monkeypatch.setattr(memory_plan, "available_ram_bytes", lambda: 64 * GIB)  # --cpu-offload: the node's RAM, split
    assert memory_plan.capacity(torch.device("cuda", 0), cpu_offload=True, local_world_size=8)[0] == 8 * GIB


# ---- the plan ---------------------------------------------------------------------------------------------


def test_the_plan_from_config_json_counts_the_models_parameters(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = config_folder(tmp_path / "m", {**LLAMA_31_8B, "hidden_size": 64, "intermediate_size": 160,
                                            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                            "vocab_size": 300})
    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))  # built for real, to count
    run = memory_plan.RunShape(world_size=4, on_gpu=False, micro_batch_tokens=64)
    plan = memory_plan.plan_from_config(folder, torch.float32, None, run, capacity_bytes=GIB, where="test")
    assert plan.params == sum(p.numel() for p in real.parameters()) == llama_params(json.loads((folder / "config.json").read_text()))
    assert plan.params_bytes == 4 * -(-plan.params // 4)
    layer = sum(p.numel() for p in real.model.layers[0].parameters())
    root = sum(p.numel() for p in (real.model.embed_tokens.weight, real.model.norm.weight, real.lm_head.weight))
    assert plan.gathered_layer_bytes == 4 * (root + 2 * layer) + 4 * layer  # fp32 on CPU, + the layer's gradient
    assert plan.rank0_load_bytes == 0  # no weight files: planned as safetensors, each rank reads its own rows
    assert plan.loading_bytes == 4 * 300 * 64  # the largest tensor (embeddings / LM head) in flight
    assert plan.activation_bytes > 0

    lora = adapters.LoraSettings(r=4)  # LoRA: the adapter is trained, the base is frozen in its dtype
    wrapped = adapters.add_lora(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)), lora)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    plan = memory_plan.plan_from_config(folder, torch.bfloat16, lora, run, capacity_bytes=GIB, where="test")
    assert plan.params == trainable and plan.params_bytes == 4 * -(-trainable // 4) + -(-2 * (sum(
        p.numel() for p in wrapped.parameters()) - trainable) // 4)


def test_the_plan_says_rank_0_reads_the_whole_model_where_sliced_loading_cannot(tmp_path):
    import shutil

    run = memory_plan.RunShape(world_size=2, micro_batch_tokens=16)
    sliced = memory_plan.plan_from_config(STORIES, torch.float32, None, run, capacity_bytes=GIB, where="t")
    assert sliced.rank0_load_bytes == 0 and "each rank reads only its own shards" in sliced.describe()
    bin_folder = tmp_path / "bin"  # .bin weights: rank 0 reads them all (rank0_load.py)
    shutil.copytree(STORIES, bin_folder)
    (bin_folder / "model.safetensors").rename(bin_folder / "pytorch_model.bin")
    whole = memory_plan.plan_from_config(bin_folder, torch.float32, None, run, capacity_bytes=GIB, where="t")
    assert whole.rank0_load_bytes == 4 * whole.params and "rank 0 alone holds the full model" in whole.describe()
    assert whole.load_peak_bytes == whole.params_bytes + 4 * whole.params


def test_activations_scale_with_the_micro_batch_and_shrink_with_checkpointing():
    shape = memory_plan.ModelShape(params=0, frozen_bytes=0, layer_params=0, largest_tensor_bytes=0, hidden=64,
                                   intermediate=160, layers=4, vocab=1000)
    one, two = (memory_plan.activation_bytes(shape, tokens, 10**9, on_gpu=False) for tokens in (100, 200))
    logits = 3 * 4 * 1000  # per LM-head position, chunked to the micro-batch here
    assert two - logits * 200 == 2 * (one - logits * 100)  # linear in the tokens
    chunked = memory_plan.activation_bytes(shape, 200, 50, on_gpu=False)
    assert two - chunked == logits * 150  # the LM head sees 50 positions at a time
    checkpointed = memory_plan.activation_bytes(shape, 200, 50, on_gpu=False, gradient_checkpointing=True)
    assert checkpointed < chunked
    assert memory_plan.activation_bytes(shape, 200, 50, on_gpu=True) < chunked  # bf16 activations on GPU


def test_the_does_not_fit_advice_fits_the_device():
    cpu = memory_plan.plan_for(10**9, 10**7, 2, on_gpu=False, device="CPU RAM", capacity_bytes=GIB)
    gpu = memory_plan.plan_for(10**9, 10**7, 2, on_gpu=True, device="cuda:0", capacity_bytes=GIB)
    for plan in (cpu, gpu):
        with pytest.raises(GvpoError, match="^does not fit: memory plan") as err:
            memory_plan.check_fits(memory_plan.Dist(), plan)
        assert "\n" not in str(err.value)
    assert "more GPUs" in memory_plan.does_not_fit(gpu) and "--cpu-offload" in memory_plan.does_not_fit(gpu)
    cpu_advice = memory_plan.does_not_fit(cpu)
    assert "GPUs" not in cpu_advice and "--cpu-offload" not in cpu_advice and "do not help" in cpu_advice


def test_on_cpu_rank_0_loading_counts_against_the_same_ram():
    whole = memory_plan.plan_for(1000, 10, 4, on_gpu=False, rank0_reads_all=True)
    assert whole.per_rank_bytes < whole.params_bytes + 4000  # rank 0's shard + the whole fp32 model: the peak
    assert whole.peak_bytes == 1000 + 4000
    gpu = memory_plan.plan_for(1000, 10, 4, on_gpu=True, rank0_reads_all=True)  # loading is in CPU RAM there
    assert gpu.peak_bytes == gpu.per_rank_bytes


def test_a_run_that_cannot_fit_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    from gvpo_offline.stages.train import recipe
    from gvpo_offline.stages.train.config import TrainConfig

    build_cache(tmp_path / "run", STORIES, text_groups(STORIES, STORY_GROUPS[:2]))

    def no_loading(*_a, **_k):
        raise AssertionError("a weight was read before the plan refused the run")

    monkeypatch.setattr(recipe, "load_model", no_loading)
    monkeypatch.setattr(memory_plan, "available_ram_bytes", lambda: 1 << 20)  # 1 MiB of RAM
    with pytest.raises(GvpoError, match=r"^does not fit: memory plan: 0\.3M trainable parameters.*do not help"):
        recipe.train(TrainConfig(workdir=tmp_path / "run", beta=1, device="cpu", progress=False), log=lambda _m: None)


# ---- train --dry-run --------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_of_a_config_json_and_writes_nothing(tmp_path, run_cli):
    folder = config_folder(tmp_path / "llama-3.1-8b", LLAMA_31_8B)  # no weights: a real run could not even load
    workdir = tmp_path / "nothing-here"
    result = run_cli("train", "--beta", "0.1", "--dry-run", "--init-model", folder, "--workdir", workdir,
                     "--plan-processes", "8", "--plan-gpu-memory", "80")
    assert result.code == 0, result.err
    params = llama_params(LLAMA_31_8B)
    assert f"{params / 1e6:,.1f}M trainable parameters on 8 process(es)" in result.out
    share = -(-params // 8)
    assert f"AdamW state {8 * share / GIB:.2f} GiB" in result.out and "fits: needs" in result.out
    assert not workdir.exists() and sorted(p.name for p in folder.iterdir()) == ["config.json"]

    one = run_cli("train", "--beta", "0.1", "--dry-run", "--init-model", folder, "--plan-gpu-memory", "80")
    assert one.code == 0 and "does not fit" in one.out and "more GPUs" in one.out  # 16 B/param of 8B on one GPU
    lora = run_cli("train", "--beta", "0.1", "--dry-run", "--init-model", folder, "--plan-gpu-memory", "80",
                   "--lora-r", "16", "--base-dtype", "bfloat16", "--gradient-checkpointing")
    assert lora.code == 0 and "LoRA r=16" in lora.out and "fits: needs" in lora.out


def test_dry_run_needs_a_model_and_plan_options_need_dry_run(tmp_path, run_cli):
    result = run_cli("train", "--beta", "0.1", "--dry-run", "--workdir", tmp_path / "none")
    assert result.code == 2 and "--dry-run: no model to plan for" in result.err
    result = run_cli("train", "--beta", "0.1", "--plan-processes", "8", "--workdir", tmp_path / "none")
    assert result.code == 2 and "need --dry-run" in result.err


# ---- the worked plans of docs/scale-out.md ----------------------------------------------------------------------------

WORKED = [  # (model, mode, GPUs, extra train options): docs/scale-out.md, 80 GB GPUs
    ("Llama-3.1-8B", "full", 1, []),
    ("Llama-3.1-8B", "full", 8, []),
    ("Llama-3.1-8B", "full", 8, ["--gradient-checkpointing"]),
    ("Llama-3.1-8B", "LoRA r=16, bf16 base", 1, ["--gradient-checkpointing"]),
    ("Llama-3.1-70B", "full", 8, ["--gradient-checkpointing"]),
    ("Llama-3.1-70B", "full", 16, ["--gradient-checkpointing"]),
    ("Llama-3.1-70B", "full", 32, ["--gradient-checkpointing"]),
    ("Llama-3.1-70B", "LoRA r=16, bf16 base", 8, ["--gradient-checkpointing"]),
    ("Llama-3.1-70B", "LoRA r=16, bf16 base", 16, ["--gradient-checkpointing"]),
]


def worked_plans(folder: Path, run_cli=None) -> str:
    """docs/scale-out.md's table: ``train --dry-run`` (dry_run.dry_run, what the option runs) for each of WORKED
    on config.json folders of Llama-3.1-8B and 70B written into ``folder``, against 80 GB GPUs (79 GiB free)."""
    from gvpo_offline.stages.train.config import TrainConfig
    from gvpo_offline.stages.train.dry_run import dry_run

    configs = {"Llama-3.1-8B": LLAMA_31_8B, "Llama-3.1-70B": LLAMA_31_70B}
    lines = ["| model | training | GPUs | options | weights | gradients | AdamW | FSDP gathered | activations | "
             "per GPU | fits 79 GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, mode, gpus, options in WORKED:
        path = config_folder(folder / name, configs[name])
        lora = adapters.LoraSettings(r=16) if mode.startswith("LoRA") else None
        cfg = TrainConfig(workdir=folder / "none", init_model=str(path), lora=lora,
                          base_dtype="bfloat16" if lora else None,
                          gradient_checkpointing="--gradient-checkpointing" in options)
        plan = dry_run(cfg, lambda _m: None, processes=gpus, gpu_memory_gib=79)
        cells = [plan.params_bytes, plan.grads_bytes, plan.optimizer_bytes, plan.gathered_layer_bytes,
                 plan.activation_bytes, plan.peak_bytes]
        lines.append(f"| {name} | {mode} | {gpus} | {' '.join(options) or '-'} | "
                     + " | ".join(f"{b / GIB:,.1f}" for b in cells)
                     + f" | {'yes' if plan.peak_bytes <= plan.capacity_bytes else 'no'} |")
    return "\n".join(lines)


@pytest.mark.slow
def test_the_readme_shows_the_dry_runs_own_plans(tmp_path):
    from conftest import REPO

    table = worked_plans(tmp_path)
    assert table in (REPO / "docs" / "scale-out.md").read_text(), "docs/scale-out.md's worked plans differ; paste:\n" + table


if __name__ == "__main__":  # print the table for the README
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(worked_plans(Path(tmp)))


def test_planning_a_lora_run_leaves_the_seeded_rng_alone(tmp_path):
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    run = memory_plan.RunShape(world_size=1, micro_batch_tokens=16)
    memory_plan.plan_from_config(STORIES, torch.float32, adapters.LoraSettings(r=4), run, capacity_bytes=GIB, where="t")
    assert torch.equal(torch.rand(4), expected)  # LoRA's A, drawn after the plan, is the one a seeded run draws


def test_the_lora_adapter_check_shards_its_state_over_a_node_under_hsdp(monkeypatch):
    from gvpo_offline.model.distributed import Dist

    params = 100_000_000  # 16 B per trainable parameter; rank 0 also holds the fp32 weights
    four = Dist(rank=0, world_size=4, device=torch.device("cpu"))
    monkeypatch.setattr(memory_plan, "all_reduce_max", lambda ctx, values: values)  # no process group here
    flat = memory_plan.plan_for(params, 0, 4, False)
    node = memory_plan.plan_for(params, 0, 4, False, shard_size=2)  # 2 nodes × 2: each node holds a copy
    free = (flat.per_rank_bytes + node.per_rank_bytes) // 2 + flat.rank0_load_bytes  # fits 1/4, not 1/2
    monkeypatch.setattr(memory_plan, "available_ram_bytes", lambda: free)
    memory_plan.check_adapter_fits(four, params, torch.device("cpu"))
    with pytest.raises(GvpoError, match=r"does not fit: the LoRA adapter has 100\.0M trainable parameters"):
        memory_plan.check_adapter_fits(four, params, torch.device("cpu"), shard_size=2)
    assert node.per_rank_bytes - flat.per_rank_bytes == 16 * (params // 2 - params // 4)
    assert node.rank0_load_bytes == flat.rank0_load_bytes
