"""The weights dtype: precompute-ref loads the weights directly in --dtype and runs in it, train runs the
policy in the cache's weights dtype (ℓ = 0 at step 0 for full fine-tuning and for LoRA on a bf16 base,
on CPU in bf16), refuses another, and full fine-tuning in bf16 steps fp32 master weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cachefixture import STORIES, STORY_GROUPS

from gvpo_offline.data import DataConfig
from gvpo_offline.data.tokenize import TokenizeConfig
from gvpo_offline.model import loading
from gvpo_offline.model.adapters import LoraSettings
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.master import MasterWeights
from gvpo_offline.stages.train.recipe import train


def precomputed(root: Path, dtype: str) -> Path:
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n" for p, r, w in STORY_GROUPS))
    precompute(PrecomputeConfig(data=DataConfig((str(data),)), model=str(STORIES), workdir=root / "run",
                                tokenize=TokenizeConfig(max_length=96, max_prompt_length=32), eval_fraction=0.0,
                                device="cpu", dtype=dtype, progress=False))
    return root / "run"


@pytest.fixture(scope="module")
def bf16_cache(tmp_path_factory) -> Path:
    return precomputed(tmp_path_factory.mktemp("bf16"), "bfloat16")


@pytest.fixture
def bf16_run(bf16_cache, tmp_path) -> Path:
    shutil.copytree(bf16_cache, tmp_path / "run")
    return tmp_path / "run"


def config(workdir: Path, **kw) -> TrainConfig:
    defaults = dict(workdir=workdir, beta=1.0, lr=1e-3, groups_per_step=4, save_every=0, progress=False, device="cpu")
    return TrainConfig(**{**defaults, **kw})


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_precompute_ref_loads_the_weights_in_the_requested_dtype_and_records_it(tmp_path, monkeypatch):
    loaded = []
    real = loading.load_model

    def spy(path, device, dtype=torch.float32, trust_remote_code=False):
        model = real(path, device, dtype, trust_remote_code)
        loaded.append({p.dtype for p in model.parameters()})
        return model

    monkeypatch.setattr(loading, "load_model", spy)
    run = precomputed(tmp_path, "bfloat16")
    assert loaded == [{torch.bfloat16}]  # never a float32 copy of the weights
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["dtype"] == manifest["inputs"]["weights_dtype"] == "bfloat16"


def test_full_fine_tuning_in_bf16_starts_at_the_reference_and_steps_fp32_master_weights(bf16_run):
    train(config(bf16_run, max_steps=2), log=lambda _: None)
    first, second = metrics(bf16_run)
    assert first["log_ratio_absmax"] < 1e-3  # the reference's forward: same bf16 weights, same dtype
    assert second["log_ratio_absmax"] > 1e-3  # and the policy moved
    saved = loading.load_model(bf16_run / "model", torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}
    assert json.loads((bf16_run / "model" / "train_config.json").read_text())["weights_dtype"] == "bfloat16"


def test_lora_on_a_bf16_base_starts_at_the_reference(bf16_run):
    train(config(bf16_run, max_steps=1, lora=LoraSettings(r=4), base_dtype="bfloat16"), log=lambda _: None)
    assert metrics(bf16_run)[0]["log_ratio_absmax"] < 1e-3


def test_train_refuses_another_weights_dtype_than_the_caches(bf16_run, tmp_path):
    with pytest.raises(GvpoError, match=r"^--dtype float32: .*computed with bfloat16 weights.*precompute-ref --dtype float32$"):
        train(config(bf16_run, max_steps=1, dtype="float32"), log=lambda _: None)
    with pytest.raises(GvpoError, match=r"^--base-dtype float32: .*bfloat16 weights"):
        train(config(bf16_run, max_steps=1, lora=LoraSettings(r=4), base_dtype="float32"), log=lambda _: None)
    assert not (bf16_run / "metrics.jsonl").exists()


def test_master_weights_keep_updates_below_bf16_resolution_and_accumulate_grads_in_fp32():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = MasterWeights([weight])
    for _ in range(2):  # two backward passes (micro-batches) accumulate into the fp32 copy's gradient
        (weight.float() * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert weight.grad is None and master.master[0].grad.dtype == torch.float32
    assert master.master[0].grad.tolist() == [2.0, 4.0, 6.0, 8.0]
    optimizer = torch.optim.SGD(master.master, lr=1e-3)  # 1 - 2e-3 rounds back to 1 in bf16 (step 2**-7)
    for _ in range(10):
        optimizer.step()
        master.to_model()
    expected = 1 - 10 * 1e-3 * torch.tensor([2.0, 4.0, 6.0, 8.0])
    assert torch.allclose(master.master[0].detach(), expected)
    assert torch.equal(weight.detach(), expected.to(torch.bfloat16))


def test_resume_of_bf16_full_fine_tuning_continues_the_fp32_master_weights_exactly(bf16_run):
    from safetensors.torch import load_file

    cfg = dict(max_steps=3, save_every=1, keep_checkpoints=5, lr=2e-3)
    train(config(bf16_run, **cfg), log=lambda _: None)
    straight = load_file(bf16_run / "model" / "model.safetensors")
    assert (bf16_run / "checkpoints" / "step-1" / ".metadata").is_file()  # the masters and AdamW, by name (DCP)
    for step in (2, 3):
        shutil.rmtree(bf16_run / "checkpoints" / f"step-{step}")
    assert train(config(bf16_run, resume=True, **cfg), log=lambda _: None).resumed_from == 1
    resumed = load_file(bf16_run / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_memory_plan_counts_the_master_weights_beside_bf16_weights():
    from gvpo_offline.model import memory_plan
    from gvpo_offline.model.distributed import Dist

    model = loading.load_model(STORIES, torch.device("cpu"), torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    plan = memory_plan.memory_plan(model, Dist(), torch.device("cpu"))
    assert (plan.params_bytes, plan.grads_bytes, plan.optimizer_bytes) == (6 * n, 4 * n, 8 * n)  # 2 + 4 master
