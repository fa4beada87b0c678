"""The `train` stage: exact micro-batched gradient, ℓ = 0 at step 0, convergence to π* (Thm 3.1),
kill -9 + --resume, refused starts and non-finite stops. All on CPU, stories260K or a tiny Llama."""

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
from safetensors.torch import load_file, save_file

from gvpo_offline import cli
from gvpo_offline.data.tokenize import tokenizer_fingerprint
from gvpo_offline.math.loss import gvpo_loss
from gvpo_offline.model import lm_head
from gvpo_offline.model.loading import load_model, load_tokenizer
from gvpo_offline.model.logprobs import sequence_logps
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.train.checkpoints import truncate_metrics
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train
from gvpo_offline.stages.train.step import (
    StepBatch,
    epoch_order,
    gvpo_backward,
    load_train_groups,
    make_batch,
    pack_groups,
)

ROOT = Path(__file__).resolve().parents[1]


def config(workdir: Path, **kw) -> TrainConfig:
    defaults = dict(workdir=workdir, beta=1.0, lr=2e-5, groups_per_step=4, save_every=0, progress=False,
                    device="cpu")
    return TrainConfig(**{**defaults, **kw})


def quiet(_msg: str) -> None:
    pass


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def policy_minus_ref(model_dir: Path, workdir: Path):
    """(ℓ [N] float64, batch) of every cached train response under the model at ``model_dir``."""
    groups = load_train_groups(workdir)
    batch = make_batch(groups, list(range(groups.n_groups)))
    model = load_model(model_dir, torch.device("cpu"))
    with torch.no_grad():
        logps = sequence_logps(model, batch.prompt_ids, batch.response_ids).double()
    return logps - batch.ref_logps, batch


def cli_main(*args: str) -> tuple[int, str]:
    """In-process `gvpo-offline ...`: (exit code, stderr)."""
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


# ---- the gradient ----------------------------------------------------------------------------------


def tiny_llama(vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def random_batch(vocab: int = 97, ks=(2, 3, 4)) -> StepBatch:
    g = torch.Generator().manual_seed(1)
    prompts, responses, gids = [], [], []
    for j, k in enumerate(ks):
        prompt = torch.randint(1, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(k):
            n = int(torch.randint(2, 11, (1,), generator=g))
            prompts.append(prompt)
            responses.append(torch.randint(1, vocab, (n,), generator=g).tolist())
            gids.append(j)
    n = len(gids)
    return StepBatch(prompts, responses, rewards=torch.randn(n, generator=g, dtype=torch.float64),
                     ref_logps=-torch.rand(n, generator=g, dtype=torch.float64) * 30 - 10,
                     group_index=torch.tensor(gids), n_groups=len(ks))


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("keep_mib", [None, "0"], ids=["lm-head-kept", "lm-head-recompute"])
def test_split_micro_batches_give_the_one_pass_gradient(keep_mib, monkeypatch):
    """Both LM-head backwards (the forward's exp chunks kept, the default on CPU; the logits recomputed)."""
    if keep_mib is not None:
        monkeypatch.setenv(lm_head.KEEP_ENV, keep_mib)
    model, batch, beta = tiny_llama(), random_batch(), 0.3

    one = gvpo_backward(model, batch, beta, micro_batch_tokens=100_000)
    g_one = grads(model)
    split = gvpo_backward(model, batch, beta, micro_batch_tokens=20)  # groups cut across micro-batches
    g_split = grads(model)
    assert one.micro_batches == 1 and split.micro_batches >= 4
    assert split.loss == pytest.approx(one.loss, rel=1e-6)

    # naive reference: full logits, log_softmax over everything, autograd through gvpo_loss
    logps = []
    for p, r in zip(batch.prompt_ids, batch.response_ids):
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[0, len(p) - 1 : -1], -1).gather(-1, torch.tensor(r)[:, None]).sum()
        logps.append(lp)
    gvpo_loss(torch.stack(logps), batch.ref_logps, batch.rewards, batch.group_index, beta).backward()
    g_naive = grads(model)

    assert g_one.keys() == g_split.keys() == g_naive.keys()
    for name in g_one:
        scale = g_naive[name].abs().max().item() + 1e-12
        assert (g_split[name] - g_one[name]).abs().max().item() <= 1e-5 * scale, name
        assert (g_naive[name] - g_one[name]).abs().max().item() <= 1e-4 * scale, name


def test_whole_groups_go_in_one_pass_and_only_oversized_groups_are_split():
    model, batch, beta = tiny_llama(), random_batch(ks=(2, 2, 3, 6)), 0.3
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    rows = [[i for i, g in enumerate(batch.group_index.tolist()) if g == j] for j in range(batch.n_groups)]
    padded = [len(r) * max(lengths[i] for i in r) for r in rows]
    budget = sorted(padded)[-2]  # every group fits but the largest one
    packs, split = pack_groups(lengths, rows, budget)
    assert split == [padded.index(max(padded))]
    assert sorted(g for pack in packs for g in pack) == sorted(set(range(batch.n_groups)) - set(split))
    for pack in packs:
        assert sum(len(rows[g]) for g in pack) * max(lengths[i] for g in pack for i in rows[g]) <= budget

    one = gvpo_backward(model, batch, beta, micro_batch_tokens=100_000)
    g_one = grads(model)
    mixed = gvpo_backward(model, batch, beta, micro_batch_tokens=budget)
    g_mixed = grads(model)
    assert one.micro_batches == 1 and mixed.micro_batches >= len(packs) + 2
    assert mixed.loss == pytest.approx(one.loss, rel=1e-6)
    for name in g_one:
        scale = g_one[name].abs().max().item() + 1e-12
        assert (g_mixed[name] - g_one[name]).abs().max().item() <= 1e-5 * scale, name


def test_gradient_checkpointing_keeps_the_gradient():
    from gvpo_offline.stages.train.recipe import enable_gradient_checkpointing

    model, batch = tiny_llama(), random_batch()
    calls, mlp = [], model.model.layers[0].mlp
    mlp.forward = lambda x, forward=mlp.forward: calls.append(1) or forward(x)  # (hooks don't see recomputes)
    gvpo_backward(model, batch, 0.5, micro_batch_tokens=100_000)
    plain, plain_calls = grads(model), len(calls)
    enable_gradient_checkpointing(model)
    assert not model.model.layers[0].self_attn.training  # dropouts stay off
    calls.clear()
    gvpo_backward(model, batch, 0.5, micro_batch_tokens=100_000)
    assert len(calls) == 2 * plain_calls  # the layer really is recomputed in the backward pass
    for name, g in grads(model).items():
        assert (g - plain[name]).abs().max().item() <= 1e-5 * plain[name].abs().max().item(), name


# ---- the real model ------------------------------------------------------------------------------


def test_step0_policy_equals_reference(workdir):
    """Eval mode (no dropout) + the shared sequence_logps: ℓ = 0 before the first update, so the loss
    is the rewards' own within-group variance Σ(R−R̄)²/(k−1), averaged over groups."""
    train(config(workdir, max_steps=1), log=quiet)
    first = read_metrics(workdir)[0]
    assert first["log_ratio_absmax"] < 1e-4
    variances = []
    for _, _, rewards in STORY_GROUPS:
        mean = sum(rewards) / len(rewards)
        variances.append(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    assert first["loss"] == pytest.approx(sum(variances) / len(variances), rel=1e-4)
    assert (workdir / "model" / "model.safetensors").is_file()
    saved = json.loads((workdir / "model" / "train_config.json").read_text())
    assert saved["beta"] == 1.0 and saved["total_steps"] == 1
    manifest = json.loads((workdir / "manifest.json").read_text())
    # the saved tokenizer is the cached one, so WORKDIR/model can be an --init-model later
    assert tokenizer_fingerprint(load_tokenizer(workdir / "model")) == manifest["tokenizer_fingerprint"]


def test_step0_on_a_precompute_ref_cache(tmp_path):
    """The cache written by the real `precompute-ref` (tokenization, batching, dtype) also gives ℓ = 0."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n" for p, r, w in STORY_GROUPS))
    code, err = cli_main("precompute-ref", str(data), "--model", str(STORIES), "--workdir", str(tmp_path / "run"),
                        "--eval-fraction", "0", "--device", "cpu", "--max-length", "96", "--max-prompt-length", "32")
    assert code == 0, err
    train(config(tmp_path / "run", max_steps=1), log=quiet)
    assert read_metrics(tmp_path / "run")[0]["log_ratio_absmax"] < 1e-4


def test_training_reaches_the_gvpo_optimum(workdir):
    """Thm 3.1: the minimiser is πref·exp(R/β)/Z(x), i.e. ℓ_i − R_i/β is constant within each group."""
    beta = 1.0
    result = train(config(workdir, beta=beta, lr=2e-5, max_steps=150), log=quiet)
    assert result.steps == 150
    ell, batch = policy_minus_ref(workdir / "model", workdir)
    target = ell - batch.rewards / beta
    ks = []
    for j in range(batch.n_groups):
        rows = batch.group_index == j
        ks.append(int(rows.sum()))
        before = (batch.rewards[rows] / beta).max() - (batch.rewards[rows] / beta).min()
        spread = (target[rows].max() - target[rows].min()).item()
        assert before > 0.5 and spread < 0.01, (j, spread)
    assert sorted(ks) == [2, 3, 4, 5]
    losses = [m["loss"] for m in read_metrics(workdir)]
    assert losses[-1] < 1e-4 * losses[0]



# ---- the optimizer -----------------------------------------------------------------------------------


def test_fused_adamw_steps_the_weights_of_torchs_default_adamw():
    """optimizer.adamw (fused in one process) against torch's default AdamW (on CPU: its per-tensor loop),
    5 GVPO steps with clipping and weight decay on the same model: the same weights to float rounding."""
    from gvpo_offline.stages.train.optimizer import adamw

    batch, runs = random_batch(), []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1), lambda ps: adamw(ps, 1e-3, 0.1, False)):
        model = tiny_llama()
        params = list(model.parameters())
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = make(params)
        for _ in range(5):
            gvpo_backward(model, batch, 0.3, micro_batch_tokens=100_000)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs.append(({n: p.detach().clone() for n, p in model.named_parameters()}, start, optimizer))
    (old, start, default), (new, _, fused) = runs
    assert fused.param_groups[0]["fused"] and not default.param_groups[0]["fused"]
    for name in old:
        moved = (old[name] - start[name]).abs().max().item()
        assert moved > 1e-4, name  # the steps changed every weight tensor
        rounding = 4 * torch.finfo(torch.float32).eps * old[name].abs().max().item()  # a few float32 ulps
        assert (new[name] - old[name]).abs().max().item() <= rounding, name
    # sharded (DTensor) parameters keep torch's default, also after loading a fused run's state
    from gvpo_offline.stages.train.optimizer import keep_implementation

    sharded = adamw(list(tiny_llama().parameters()), 1e-3, 0.0, sharded=True)
    sharded.load_state_dict(fused.state_dict())
    assert sharded.param_groups[0]["fused"] is True  # what torch's load_state_dict brings
    keep_implementation(sharded)
    assert sharded.param_groups[0]["fused"] in (None, False)
    assert torch.equal(sharded.state_dict()["state"][0]["exp_avg"], fused.state_dict()["state"][0]["exp_avg"])


def test_train_uses_fused_adamw_and_frees_gradients_before_a_checkpoint(workdir, monkeypatch):
    from gvpo_offline.stages.train import recipe

    seen = []

    def save(out, model, optimizer, *args, **kw):
        seen.append((optimizer.param_groups[0]["fused"], [p.grad for p in model.parameters()]))
        return real_save(out, model, optimizer, *args, **kw)

    real_save = recipe.save_checkpoint
    monkeypatch.setattr(recipe, "save_checkpoint", save)
    train(config(workdir, max_steps=2, save_every=1), log=quiet)
    assert len(seen) == 2
    for fused, grads_at_save in seen:
        assert fused is True
        assert all(g is None for g in grads_at_save)  # freed right after the step, not at the next one


# ---- kill -9 and resume --------------------------------------------------------------------------


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_kill9_then_resume_equals_uninterrupted(workdir, tmp_path):
    args = ["--beta", "1.0", "--lr", "2e-5", "--groups-per-step", "1", "--max-steps", "60", "--save-every", "4",
            "--keep-checkpoints", "2", "--device", "cpu", "--seed", "3"]
    straight = tmp_path / "straight"
    shutil.copytree(workdir, straight)
    train(config(straight, lr=2e-5, groups_per_step=1, max_steps=60, save_every=4, seed=3), log=quiet)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gvpo_offline.cli", "train", "--workdir", str(workdir), *args]
    log = open(tmp_path / "killed.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while not list((workdir / "checkpoints").glob("step-*")):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "model").exists()
    done = len(read_metrics(workdir)) if (workdir / "metrics.jsonl").exists() else 0
    assert done < 60, "the run finished before it could be killed"

    # without --resume, a workdir with checkpoints is refused rather than overwritten
    code, err = cli_main("train", "--workdir", str(workdir), *args)
    assert code == 2 and "--resume" in err

    code, err = cli_main("train", "--workdir", str(workdir), *args, "--resume")  # in-process: no 2nd start-up
    assert code == 0, err
    assert "resuming from" in err

    a, b = _weights(straight / "model"), _weights(workdir / "model")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    clock = ("seconds", "time", "elapsed")  # wall-clock fields differ between runs
    strip = lambda rows: [{k: v for k, v in r.items() if k not in clock} for r in rows]  # noqa: E731
    assert strip(read_metrics(workdir)) == strip(read_metrics(straight))
    kept = sorted(int(p.name.split("-")[1]) for p in (workdir / "checkpoints").glob("step-*"))
    assert kept == [56, 60]
    assert not list((workdir / "checkpoints").glob(".gvpo-tmp-*"))

    # a resume with other trajectory settings is refused
    with pytest.raises(GvpoError, match="--lr"):
        train(config(workdir, lr=1e-3, groups_per_step=1, max_steps=60, save_every=4, seed=3, resume=True), log=quiet)


def test_truncate_metrics_drops_later_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_metrics(path, keep_through_step=3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


# ---- refused starts and non-finite stops ---------------------------------------------------------


def one_line_error(*args: str) -> str:
    code, err = cli_main("train", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_incomplete_manifest_is_refused(tmp_path):
    build_cache(tmp_path / "run", STORIES, text_groups(STORIES, STORY_GROUPS[:2]), complete=False)
    assert "incomplete" in one_line_error("--workdir", str(tmp_path / "run"), "--beta", "0.1")


def test_changed_reference_model_is_refused(tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(STORIES, ref)
    for p in ref.iterdir():
        p.chmod(0o644)
    build_cache(tmp_path / "run", ref, text_groups(ref, STORY_GROUPS[:2]))
    weights = load_file(ref / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, ref / "model.safetensors", metadata={"format": "pt"})
    msg = one_line_error("--workdir", str(tmp_path / "run"), "--beta", "0.1")
    assert f"the reference model at {ref} changed since precompute-ref" in msg


def test_different_tokenizer_is_refused_and_other_weights_get_a_note(workdir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(STORIES, other)
    for p in other.iterdir():
        p.chmod(0o644)
    # same tokenizer, other weights (e.g. an SFT checkpoint): allowed, with a note that ℓ ≠ 0 at step 0
    weights = load_file(other / "model.safetensors")
    weights = {k: v * 1.01 for k, v in weights.items()}
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    notes = []
    train(config(workdir, init_model=str(other), max_steps=1), log=notes.append)
    assert any("ℓ ≠ 0" in n for n in notes)
    assert read_metrics(workdir)[0]["log_ratio_absmax"] > 1e-3

    # a different tokenizer: refused
    tok_cfg = json.loads((other / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    msg = one_line_error("--workdir", str(workdir), "--beta", "0.1", "--init-model", str(other))
    assert "tokenizer" in msg and str(other) in msg


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    groups = text_groups(STORIES, STORY_GROUPS)
    groups[2].rewards[1] = float("nan")
    build_cache(tmp_path / "run", STORIES, groups)
    bad = [g.group_id for g in groups].index(groups[2].group_id)
    seed = next(s for s in range(100) if epoch_order(len(groups), s, 0).index(bad) == 2)  # bad at step 3
    cfg = config(tmp_path / "run", groups_per_step=1, max_steps=8, save_every=1, seed=seed)
    with pytest.raises(GvpoError, match=r"step 3 \(epoch 0\): the loss is not finite.*checkpoints/step-2"):
        train(cfg, log=quiet)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept == ["step-1", "step-2"]
    assert len(read_metrics(tmp_path / "run")) == 2
    assert not (tmp_path / "run" / "model").exists()


def test_resume_refuses_a_reference_cache_that_changed(workdir):
    train(config(workdir, max_steps=2, save_every=1), log=quiet)
    manifest = json.loads((workdir / "manifest.json").read_text())
    (workdir / "manifest.json").write_text(json.dumps({**manifest, "key": "made-from-other-inputs"}))
    with pytest.raises(GvpoError, match="reference cache changed since this checkpoint"):
        train(config(workdir, max_steps=2, save_every=1, resume=True), log=quiet)
    (workdir / "manifest.json").write_text(json.dumps(manifest))  # the same cache again: resumes
    assert train(config(workdir, max_steps=2, save_every=1, resume=True), log=quiet).resumed_from == 2
