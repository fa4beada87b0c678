"""Tests for the eval stage: metric math against hand-computed values, bootstrap, and the stage itself."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.evaluate import generation
from gvpo_offline.stages.evaluate import heldout as ev
from gvpo_offline.math import metrics
from gvpo_offline.math.loss import gvpo_loss

BETA = 0.5

# Four hand-worked groups (β = 0.5):
#   A  k=3  R=[1,0,0]    ℓ=[2,1,1]       all orderings right, ℓ tie among equal rewards
#   B  k=2  R=[0,1]      ℓ=[.5,.5]       ℓ tie across different rewards
#   C  k=2  R=[1,1]      ℓ=[1,-1]        all rewards equal: skipped by the ranking metrics
#   D  k=4  R=[3,1,2,2]  ℓ=[-1,0,2,1]    mostly wrong
GROUPS = ["A"] * 3 + ["B"] * 2 + ["C"] * 2 + ["D"] * 4
REWARDS = [1, 0, 0, 0, 1, 1, 1, 3, 1, 2, 2]
ELL = [2, 1, 1, 0.5, 0.5, 1, -1, -1, 0, 2, 1]
TOKENS = [2, 1, 1, 1, 1, 3, 3, 1, 1, 1, 1]

# hand-computed per group
LOSS = {"A": 1 / 12, "B": 0.5, "C": 0.5, "D": 4.25 / 3}
IVAR = {"A": 1 / 12, "B": 0.0, "C": 0.5, "D": 1.25 / 3}
ICOV = {"A": 1 / 6, "B": 0.0, "C": 0.0, "D": -0.5 / 3}
RVAR = {"A": 1 / 3, "B": 0.5, "C": 0.0, "D": 2 / 3}
SPEARMAN_D = -1 / math.sqrt(10)  # ranks ℓ [1,2,4,3], ranks R [4,1,2.5,2.5]


def stats(ell=ELL, groups=GROUPS, rewards=REWARDS, tokens=TOKENS, beta=BETA):
    return metrics.group_statistics(np.array(ell, float), np.array(rewards, float), np.array(groups), beta, tokens)


def test_per_group_statistics_match_hand_computation():
    s = stats()
    order = ["A", "B", "C", "D"]  # np.unique order
    assert s.loss == pytest.approx([LOSS[g] for g in order])
    assert s.implicit_var == pytest.approx([IVAR[g] for g in order])
    assert s.implicit_cov == pytest.approx([ICOV[g] for g in order])
    assert s.reward_var == pytest.approx([RVAR[g] for g in order])
    assert s.pairs.tolist() == [2, 1, 0, 5]
    assert s.pairs_correct.tolist() == [2, 0.5, 0, 2]
    assert s.spearman[[0, 1, 3]] == pytest.approx([1.0, 0.0, SPEARMAN_D])
    assert math.isnan(s.spearman[2]) and math.isnan(s.top1[2])
    assert s.top1[[0, 1, 3]] == pytest.approx([1.0, 0.5, 0.0])
    assert s.ranked.tolist() == [1, 1, 0, 1]
    # eq. 17: loss = Var(βℓ) + Var(R) − 2 Cov(βℓ, R), group by group
    assert s.loss == pytest.approx(s.implicit_var + s.reward_var - 2 * s.implicit_cov)


def test_aggregate_metrics_match_hand_computation():
    m = metrics.aggregate_metrics(stats())
    assert set(m) == set(metrics.METRICS)
    assert m["gvpo_loss"] == pytest.approx(sum(LOSS.values()) / 4)
    assert m["pairwise_accuracy"] == pytest.approx(4.5 / 8)
    assert m["spearman"] == pytest.approx((1 + 0 + SPEARMAN_D) / 3)
    assert m["top1_agreement"] == pytest.approx(1.5 / 3)
    assert m["mean_log_ratio"] == pytest.approx(7 / 11)
    assert m["mean_log_ratio_per_token"] == pytest.approx(7 / 16)
    assert m["implicit_reward_variance"] == pytest.approx(sum(IVAR.values()) / 4)
    assert m["implicit_reward_covariance"] == pytest.approx(sum(ICOV.values()) / 4)
    assert m["reward_variance"] == pytest.approx(sum(RVAR.values()) / 4)
    c = metrics.count_stats(stats())
    assert c == {"groups": 4, "responses": 11, "tokens": 16, "ranked_groups": 3, "skipped_groups": 1, "pairs": 8}


def test_loss_agrees_with_the_training_loss():
    ids = torch.tensor([{"A": 0, "B": 1, "C": 2, "D": 3}[g] for g in GROUPS])
    ell = torch.tensor(ELL, dtype=torch.float64)
    expected = gvpo_loss(ell, torch.zeros_like(ell), torch.tensor(REWARDS, dtype=torch.float64), ids, BETA)
    assert metrics.aggregate_metrics(stats())["gvpo_loss"] == pytest.approx(float(expected), rel=1e-12)


def test_reference_is_the_neutral_baseline():
    m = metrics.aggregate_metrics(stats(ell=np.zeros(len(ELL))))
    assert m["pairwise_accuracy"] == 0.5
    assert m["spearman"] == 0.0
    # chance rate: |argmax R| / k in each ranked group: A 1/3, B 1/2, D 1/4
    assert m["top1_agreement"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert m["mean_log_ratio"] == 0.0 and m["mean_log_ratio_per_token"] == 0.0
    assert m["implicit_reward_variance"] == 0.0 and m["implicit_reward_covariance"] == 0.0
    assert m["gvpo_loss"] == pytest.approx(m["reward_variance"])  # the reward-only loss
    assert m["gvpo_loss"] == pytest.approx(sum(RVAR.values()) / 4)


def test_group_order_and_labels_do_not_matter():
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ELL))
    relabel = {"A": 17, "B": -3, "C": 5, "D": 100}
    a = metrics.aggregate_metrics(stats())
    b = metrics.aggregate_metrics(
        stats(
            ell=np.array(ELL)[perm],
            groups=np.array([relabel[g] for g in GROUPS])[perm],
            rewards=np.array(REWARDS)[perm],
            tokens=np.array(TOKENS)[perm],
        )
    )
    for k in metrics.METRICS:
        assert a[k] == pytest.approx(b[k], rel=1e-12)


def test_k2_groups_and_ties():
    # k = 2: right order, wrong order, ℓ tie, equal rewards
    ell = [1, 0, 0, 1, 3, 3, 1, 2]
    rew = [1, 0, 1, 0, 1, 0, 5, 5]
    s = metrics.group_statistics(np.array(ell, float), np.array(rew, float), np.repeat([0, 1, 2, 3], 2), 1.0)
    assert s.pairs_correct.tolist() == [1, 0, 0.5, 0]
    assert s.spearman[:3] == pytest.approx([1, -1, 0])
    assert s.top1[:3] == pytest.approx([1, 0, 0.5])
    m = metrics.aggregate_metrics(s)
    assert m["pairwise_accuracy"] == pytest.approx(0.5)
    assert m["spearman"] == pytest.approx(0.0)
    assert m["top1_agreement"] == pytest.approx(0.5)
    # k = 2, β = 1: loss = (Δℓ − ΔR)² / 2 per group
    assert s.loss.tolist() == pytest.approx([0, 2, 0.5, 0.5])


def test_top1_ties_in_both_rewards_and_implicit_rewards():
    # implicit argmax set {0, 1, 2}; reward argmax set {1, 3} -> 1/3
    s = metrics.group_statistics(np.array([5.0, 5, 5, 0]), np.array([0.0, 2, 1, 2]), np.zeros(4), 1.0)
    assert s.top1[0] == pytest.approx(1 / 3)


def test_average_ranks():
    assert metrics.average_ranks(np.array([10.0, 20, 20, 5])).tolist() == [2, 3.5, 3.5, 1]
    assert metrics.average_ranks(np.array([[1.0, 1.0], [2.0, 1.0]])).tolist() == [[1.5, 1.5], [2, 1]]


def test_all_groups_skipped_gives_nan_ranking_metrics():
    s = metrics.group_statistics(np.array([1.0, 0]), np.array([1.0, 1]), np.zeros(2), 1.0)
    m = metrics.aggregate_metrics(s)
    assert math.isnan(m["pairwise_accuracy"]) and math.isnan(m["spearman"]) and math.isnan(m["top1_agreement"])
    assert m["gvpo_loss"] == pytest.approx(0.5)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        metrics.group_statistics(np.array([1.0, 0, 2]), np.array([1.0, 0, 2]), np.array([0, 0, 1]), 1.0)  # k=1
    with pytest.raises(ValueError):
        metrics.group_statistics(np.array([1.0, 0]), np.array([1.0, 0]), np.zeros(2), 0.0)


def _naive_bootstrap(model, reference, n_boot, seed):
    """Loop version of the bootstrap with the same draws, for checking the vectorised one."""
    rng = np.random.default_rng(seed)
    G = model.size.shape[0]
    w = metrics.bootstrap_weights(G, n_boot, rng)
    out = {m: [] for m in metrics.METRICS}
    for b in range(n_boot):
        idx = np.repeat(np.arange(G), w[b].astype(int))
        sub = lambda s: metrics.GroupStats(**{f: getattr(s, f)[idx] for f in metrics.GroupStats.__dataclass_fields__})
        mm = metrics.aggregate_metrics(sub(model))
        for m in metrics.METRICS:
            out[m].append(mm[m])
    return {m: np.nanpercentile(np.array(v), [2.5, 97.5]).tolist() for m, v in out.items()}


def test_bootstrap_matches_a_naive_loop_and_is_seeded():
    model, ref = stats(), stats(ell=np.zeros(len(ELL)))
    iv = metrics.bootstrap_intervals(model, ref, n_boot=200, seed=3)
    naive = _naive_bootstrap(model, ref, 200, 3)
    for m in metrics.METRICS:
        assert iv["model"][m] == pytest.approx(naive[m]), m
    assert iv == metrics.bootstrap_intervals(model, ref, n_boot=200, seed=3)
    # chunking must not change the draws' statistics shape; a different chunk size still gives an interval
    small = metrics.bootstrap_intervals(model, ref, n_boot=200, seed=3, chunk_cells=8)
    assert set(small["delta"]) == set(metrics.METRICS)
    # the delta of pairwise accuracy is model − 0.5 exactly on every resample
    lo, hi = iv["delta"]["pairwise_accuracy"]
    mlo, mhi = iv["model"]["pairwise_accuracy"]
    assert lo == pytest.approx(mlo - 0.5) and hi == pytest.approx(mhi - 0.5)


def test_bootstrap_interval_covers_the_estimate_on_many_groups():
    rng = np.random.default_rng(1)
    G, k = 300, 4
    rew = rng.normal(size=G * k)
    ell = rew + rng.normal(scale=1.0, size=G * k)
    s = metrics.group_statistics(ell, rew, np.repeat(np.arange(G), k), 1.0)
    point = metrics.aggregate_metrics(s)
    iv = metrics.bootstrap_intervals(s, metrics.group_statistics(np.zeros_like(ell), rew, np.repeat(np.arange(G), k), 1.0), 500)
    for m in ("pairwise_accuracy", "spearman", "gvpo_loss", "implicit_reward_covariance"):
        lo, hi = iv["model"][m]
        assert lo < point[m] < hi
    assert iv["delta"]["pairwise_accuracy"][0] > 0  # clearly better than chance


def test_mean_difference_interval():
    a, b = np.array([1.0, 2, 3, 4]), np.array([0.0, 1, 2, 3])
    assert metrics.mean_difference_interval(a, b, 100) == pytest.approx([1.0, 1.0])
    assert metrics.mean_difference_interval(a, b, 0) is None


# ---- the stage, end to end on the real tiny model ---------------------------------------------------

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from gvpo_offline.cli import main  # noqa: E402
from gvpo_offline.stages import reference  # noqa: E402
from gvpo_offline.stages.reference import compute as precompute_stage  # noqa: E402

STORIES = Path(__file__).resolve().parents[1] / "sample_data" / "stories260K"
NAMES = ["Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Anna", "Sam", "Lucy", "Tim", "Zoe", "Jack", "Amy", "Leo", "Kim", "Bob"]
ANIMALS = ["dog", "cat", "bird", "frog", "duck", "bear", "fox", "bunny"]
ADJS = ["happy", "sad", "tired", "angry", "scared", "hungry"]


def story_groups(n: int, names: list[str], seed: int, k: int = 4) -> list[dict]:
    """Story openings with k continuations "NAME was very ADJ. ..."; reward 1 for "happy", else 0.

    A reward the 260K TinyStories model can learn from a few groups and carry over to prompts with
    names it was not trained on. Every 7th group (g % 7 == 3) has no "happy": all rewards equal.
    """
    rng, out = random.Random(seed), []
    for g in range(n):
        name, animal = rng.choice(names), rng.choice(ANIMALS)
        adjs = ["happy"] + rng.sample(ADJS[1:], k - 1)
        rng.shuffle(adjs)
        if g % 7 == 3:
            adjs = ADJS[1 : k + 1]
        out.append({
            "id": f"s{seed}-{g}",
            "prompt": f"Once upon a time, there was a little {animal} named {name}.",
            "responses": [f"{name} was very {a}. The {animal} went home." for a in adjs],
            "rewards": [1.0 if a == "happy" else 0.0 for a in adjs],
        })
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """precompute-ref on 48 train groups (names 0-9) with 16 held-out groups (names 10-15) as the eval
    split, then 8 GVPO steps (β = 1) with train.train: WORKDIR/model is the trained policy."""
    from gvpo_offline.data import DataConfig
    from gvpo_offline.data.tokenize import TokenizeConfig
    from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute
    from gvpo_offline.stages.train.config import TrainConfig
    from gvpo_offline.stages.train.recipe import train

    root = tmp_path_factory.mktemp("eval")
    train_file = write_jsonl(root / "train.jsonl", story_groups(48, NAMES[:10], seed=1))
    heldout = write_jsonl(root / "heldout.jsonl", story_groups(16, NAMES[10:], seed=2))
    wd = root / "run"
    precompute(PrecomputeConfig(
        DataConfig((str(train_file),)), str(STORIES), wd, TokenizeConfig(64, 32),
        eval_data=(str(heldout),), device="cpu", progress=False,
    ))
    train(TrainConfig(wd, beta=1.0, lr=1e-4, max_steps=8, groups_per_step=4, device="cpu", progress=False,
                      save_every=0), log=lambda s: None)
    return wd


def run_eval(capsys, *args) -> dict:
    out = Path(args[args.index("--workdir") + 1]).parent / "report.json"
    main(["eval", *args, "--device", "cpu", "--json", str(out), "--bootstrap", "300"])
    capsys.readouterr()
    return json.loads(out.read_text())


@pytest.mark.slow
def test_json_report_layout(workdir, capsys):
    rep = run_eval(capsys, "--workdir", str(workdir))
    assert set(rep) == {"model", "reference", "delta", "intervals", "counts", "generation", "meta"}
    for side in ("model", "reference", "delta"):
        assert set(rep[side]) == set(metrics.METRICS)
    assert set(rep["intervals"]) == {"model", "delta"}
    assert set(rep["intervals"]["model"]) == set(metrics.METRICS)
    assert set(rep["counts"]) == set(metrics.COUNTS)
    assert rep["counts"]["groups"] == 16 and rep["counts"]["responses"] == 64 and rep["counts"]["skipped_groups"] == 2
    assert rep["generation"] is None
    assert rep["meta"]["beta"] == 1.0 and rep["meta"]["beta_source"].endswith("train_config.json")
    assert rep["meta"]["model_is_reference"] is False


@pytest.mark.slow
def test_trained_model_beats_the_reference_on_held_out_groups(workdir, capsys):
    rep = run_eval(capsys, "--workdir", str(workdir))
    m, r, iv = rep["model"], rep["reference"], rep["intervals"]
    assert m["gvpo_loss"] < 0.5 * r["gvpo_loss"]
    assert iv["delta"]["gvpo_loss"][1] < 0  # the whole interval of the improvement is below 0
    assert m["pairwise_accuracy"] > 0.8 and iv["model"]["pairwise_accuracy"][0] > 0.5
    assert m["spearman"] > 0.5
    assert m["top1_agreement"] > r["top1_agreement"] + 0.3
    assert m["implicit_reward_covariance"] > 0
    assert m["gvpo_loss"] == pytest.approx(
        m["implicit_reward_variance"] + m["reward_variance"] - 2 * m["implicit_reward_covariance"]
    )


@pytest.mark.slow
def test_the_reference_is_the_neutral_baseline(workdir, tmp_path, capsys):
    copy = tmp_path / "ref-copy"  # a copy is recognised by content, not by path
    shutil.copytree(STORIES, copy)
    for model in (str(STORIES), str(copy)):
        rep = run_eval(capsys, "--workdir", str(workdir), "--model", model, "--beta", "1")
        m, r = rep["model"], rep["reference"]
        assert rep["meta"]["model_is_reference"] is True
        assert m["pairwise_accuracy"] == 0.5
        assert m["spearman"] == 0.0
        assert m["mean_log_ratio"] == 0.0 and m["mean_log_ratio_per_token"] == 0.0
        assert m["gvpo_loss"] == pytest.approx(m["reward_variance"])  # the reward-only loss
        assert m == r
        assert all(v == 0 for v in rep["delta"].values())


@pytest.mark.slow
def test_a_forward_pass_of_the_reference_reproduces_the_cached_log_probs(workdir):
    from gvpo_offline.model.loading import load_model

    table = reference.load_split(workdir, "eval")
    model = load_model(STORIES, torch.device("cpu"))
    logps = ev.policy_log_probs(
        model, table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist(), batch_tokens=1000
    )
    assert np.abs(logps - table["ref_logp"].to_numpy()).max() < 1e-4


@pytest.mark.slow
def test_data_files_are_scored_once_and_cached(workdir, tmp_path, capsys, monkeypatch):
    new = write_jsonl(tmp_path / "new.jsonl", story_groups(10, NAMES[10:], seed=3))
    calls = []
    real = precompute_stage._compute_shards  # the reference forward passes of precompute
    monkeypatch.setattr(precompute_stage, "_compute_shards", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = run_eval(capsys, "--workdir", str(workdir), "--data", str(new))
    assert calls, "the first eval --data must compute the reference log-probs"
    assert len(list((workdir / "extra").glob("*/manifest.json"))) == 1
    calls.clear()
    second = run_eval(capsys, "--workdir", str(workdir), "--data", str(new))
    assert not calls, "a second eval --data on the same file must use the cache"
    assert first["model"] == second["model"] and first["counts"] == second["counts"]
    assert first["counts"]["groups"] == 10 and first["meta"]["data"] == [str(new)]
    assert first["model"]["pairwise_accuracy"] > 0.8
    # the main cache is untouched
    assert reference.read_manifest(workdir).counts["eval"].groups == 16


@pytest.mark.slow
def test_generation_eval(workdir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time, there was a little dog named Kim.\n\nOne day, Amy went to the park.\n")
    reward = tmp_path / "happy.py"
    reward.write_text("def score(prompt, response):\n    return float(len(response.split()))\n")
    common = ["--prompts", str(prompts), "--reward", f"{reward}:score", "--samples-per-prompt", "2",
              "--max-new-tokens", "6"]
    rep = run_eval(capsys, "--workdir", str(workdir), *common)
    g = rep["generation"]
    assert g["prompts"] == 2 and g["samples_per_prompt"] == 2
    assert g["mean_reward_difference"] == pytest.approx(g["model_mean_reward"] - g["reference_mean_reward"])
    assert len(g["difference_interval"]) == 2
    for side in ("model", "reference"):  # every sample's reward, [prompt][sample], averaging to the mean
        rewards = g[f"{side}_rewards"]
        assert [len(row) for row in rewards] == [2, 2]
        assert sum(map(sum, rewards)) / 4 == pytest.approx(g[f"{side}_mean_reward"])
    # the reference against itself: same seeds, same samples, no difference
    rep = run_eval(capsys, "--workdir", str(workdir), "--model", str(STORIES), "--beta", "1", *common)
    g = rep["generation"]
    assert g["mean_reward_difference"] == 0 and g["difference_interval"] == [0, 0]


def test_read_eval_prompts(tmp_path):
    flat = tmp_path / "flat.jsonl"
    write_jsonl(flat, [{"prompt": "a", "response": "x", "reward": 1}, {"prompt": "a", "response": "y", "reward": 0},
                       {"prompt": [{"role": "user", "content": "hi"}], "response": "z", "reward": 0}])
    assert generation.read_eval_prompts(flat) == ["a", [{"role": "user", "content": "hi"}]]
    parquet = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "b", "responses": ["x", "y"], "rewards": [1, 0]},
                                         {"prompt": "c", "responses": ["x", "y"], "rewards": [0, 1]}]), parquet)
    assert generation.read_eval_prompts(parquet) == ["b", "c"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}])
    with pytest.raises(GvpoError, match="line 1"):
        generation.read_eval_prompts(bad)


@pytest.mark.slow
def test_user_errors_exit_2(workdir, capsys):
    with pytest.raises(SystemExit) as exc:  # the reference has no train_config.json: β must be given
        main(["eval", "--workdir", str(workdir), "--model", str(STORIES), "--device", "cpu"])
    assert exc.value.code == 2 and "--beta" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--workdir", str(workdir), "--prompts", "x.txt"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--workdir", str(workdir / "nope"), "--beta", "1"])
    assert exc.value.code == 2 and "precompute-ref" in capsys.readouterr().err


def test_resolve_beta(tmp_path):
    final, ckpt, bare = tmp_path / "final", tmp_path / "ckpt", tmp_path / "bare"
    for d in (final, ckpt, bare):
        d.mkdir()
    (final / "train_config.json").write_text(json.dumps({"beta": 0.25}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "config": {"beta": 0.5}}))
    assert ev.resolve_beta(ev.EvalConfig(), final) == (0.25, str(final / "train_config.json"))
    assert ev.resolve_beta(ev.EvalConfig(), ckpt) == (0.5, str(ckpt / "trainer_state.json"))
    assert ev.resolve_beta(ev.EvalConfig(beta=2.0), final) == (2.0, "--beta")  # an explicit --beta wins
    assert ev.resolve_beta(ev.EvalConfig(beta=2.0), bare) == (2.0, "--beta")
    with pytest.raises(GvpoError, match="--beta"):
        ev.resolve_beta(ev.EvalConfig(), bare)
    with pytest.raises(GvpoError):
        ev.EvalConfig(beta=0.0)


def test_small_blocks_give_the_same_statistics():
    a = stats()
    gi = metrics.group_index(np.array(GROUPS), max_block_cells=1)  # one group per block
    assert len(gi.blocks) == 4
    b = metrics.group_statistics(np.array(ELL, float), np.array(REWARDS, float), gi, BETA, TOKENS)
    for f in metrics.GroupStats.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_no_bootstrap_keeps_the_interval_keys():
    *_, intervals, _ = ev.metrics_from_arrays(ELL, REWARDS, GROUPS, BETA, TOKENS, bootstrap=0)
    assert intervals == {"model": dict.fromkeys(metrics.METRICS), "delta": dict.fromkeys(metrics.METRICS)}


@pytest.mark.slow
def test_table_written_to_a_file_is_not_wrapped(workdir, capsys):
    main(["eval", "--workdir", str(workdir), "--device", "cpu", "--bootstrap", "50"])
    out = capsys.readouterr().out  # captured: not a terminal
    row = next(line for line in out.splitlines() if "pairwise ranking accuracy" in line)
    assert row.count("[") == 2 and row.count("]") == 2  # both intervals on the metric's own line
    assert len(row) > 80


@pytest.mark.slow
def test_generation_eval_passes_prompt_fields_to_the_reward(workdir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Once upon a time, there was a little dog named Kim.", "target": 2.0},
        {"prompt": "One day, Amy went to the park.", "target": 5.0},
    ])
    reward = tmp_path / "target.py"
    reward.write_text("def score(prompt, response, **fields):\n    return fields['target']\n")
    rep = run_eval(capsys, "--workdir", str(workdir), "--prompts", str(prompts), "--reward", f"{reward}:score",
                   "--samples-per-prompt", "2", "--max-new-tokens", "4")
    g = rep["generation"]
    assert g["model_mean_reward"] == g["reference_mean_reward"] == pytest.approx(3.5)  # (2 + 5) / 2
