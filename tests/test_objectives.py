"""`train --loss dpo|ipo|rebel|sft-best`: the objectives (loss.py) against hand-computed values of their
published formulas, their pair/group weighting, REBEL = 2 × GVPO, the exact micro-batched gradient of
each in train.py, and the loss name in train_config.json, --resume and eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups
from test_train import grads, random_batch, tiny_llama

from gvpo_offline import cli
from gvpo_offline.math.loss import (
    OBJECTIVES,
    dpo_loss,
    gvpo_grad_weights,
    gvpo_loss,
    ipo_loss,
    rebel_loss,
    sft_best_loss,
)
from gvpo_offline.model.logprobs import sequence_logps
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train
from gvpo_offline.stages.train.step import gvpo_backward, load_train_groups, make_batch

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


# Hand-worked data (β = 0.5). Sequence log-probs of policy and reference; ℓ = policy − ref.
#   group 7:  k=3, R = [2, 1, 1]   policy [-10, -12, -9]  ref [-11, -11, -10]  -> ℓ = [1, -1, 1]
#   group 3:  k=2, R = [0, 1]      policy [-5, -6]        ref [-5, -5]         -> ℓ = [0, -1]
#   group 9:  k=2, R = [4, 4]      policy [-2, -1]        ref [-1, -1]         -> ℓ = [-1, 0]  (a tie)
BETA = 0.5
POLICY = [-10.0, -12.0, -9.0, -5.0, -6.0, -2.0, -1.0]
REF = [-11.0, -11.0, -10.0, -5.0, -5.0, -1.0, -1.0]
REWARDS = [2.0, 1.0, 1.0, 0.0, 1.0, 4.0, 4.0]
GIDS = [7, 7, 7, 3, 3, 9, 9]
TOKENS = [4, 5, 2, 3, 3, 6, 2]


def trl_pair(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """TRL's DPO/IPO inputs for one (chosen, rejected) pair: logits = π log-ratio − ref log-ratio."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def hand_pairs():
    """Per group, the (chosen, rejected) index pairs with different rewards, written out by hand."""
    return {7: [(0, 1), (0, 2)], 3: [(4, 3)], 9: []}  # group 7: R 2 > 1, 2 > 1; the 1-1 tie is no pair


def test_dpo_matches_trls_sigmoid_loss_by_hand():
    per_group = []
    for pairs in hand_pairs().values():
        if pairs:  # the tied group has no pair: neither a term nor a count
            losses = [-log_sigmoid(BETA * trl_pair(POLICY[c], POLICY[r], REF[c], REF[r], BETA)) for c, r in pairs]
            per_group.append(sum(losses) / len(losses))
    # group 7: logits 2 and 0 -> (−log σ(1) − log σ(0)) / 2; group 3: chosen ℓ −1, rejected 0 -> −log σ(−0.5)
    assert per_group == pytest.approx([(math.log1p(math.exp(-1)) + math.log(2)) / 2, math.log1p(math.exp(0.5))])
    got = dpo_loss(t(POLICY), t(REF), t(REWARDS), torch.tensor(GIDS), BETA)
    assert got.item() == pytest.approx(sum(per_group) / 2, rel=1e-12)


def test_ipo_matches_trls_ipo_loss_by_hand():
    target = 1 / (2 * BETA)  # = 1
    # group 7: logits 2, 0 -> ((2−1)² + (0−1)²)/2 = 1; group 3: logits −1 -> 4; group 9: no pair
    per_group = []
    for pairs in hand_pairs().values():
        if pairs:
            losses = [(trl_pair(POLICY[c], POLICY[r], REF[c], REF[r], BETA) - target) ** 2 for c, r in pairs]
            per_group.append(sum(losses) / len(losses))
    assert per_group == [1.0, 4.0]
    got = ipo_loss(t(POLICY), t(REF), t(REWARDS), torch.tensor(GIDS), BETA)
    assert got.item() == pytest.approx(2.5, rel=1e-12)


def test_ipo_trl_matches_trls_length_normalised_ipo_by_hand():
    """TRL's DPOTrainer(loss_type="ipo") divides each sequence log-prob by its length before the pair
    margin; ``--loss ipo-trl`` does the same, ``--loss ipo`` does not."""
    target = 1 / (2 * BETA)
    per_group = []
    for pairs in hand_pairs().values():
        if pairs:
            avg = lambda i, logps: logps[i] / TOKENS[i]  # noqa: E731  (TRL: all_logps / size_completion)
            losses = [(trl_pair(avg(c, POLICY), avg(r, POLICY), avg(c, REF), avg(r, REF), BETA) - target) ** 2
                      for c, r in pairs]
            per_group.append(sum(losses) / len(losses))
    # group 7: margins 1/4 + 1/5 and 1/4 − 1/2; group 3: chosen 4 (ℓ −1/3), rejected 3 (ℓ 0): −1/3
    assert per_group == pytest.approx([((0.45 - 1) ** 2 + (-0.25 - 1) ** 2) / 2, (-1 / 3 - 1) ** 2], rel=1e-12)
    got = OBJECTIVES["ipo-trl"].loss(t(POLICY), t(REF), t(REWARDS), torch.tensor(GIDS), BETA, t(TOKENS))
    assert got.item() == pytest.approx(sum(per_group) / 2, rel=1e-12)
    assert got.item() != pytest.approx(ipo_loss(t(POLICY), t(REF), t(REWARDS), torch.tensor(GIDS), BETA).item())
    with pytest.raises(ValueError, match="n_tokens"):
        OBJECTIVES["ipo-trl"].loss(t(POLICY), t(REF), t(REWARDS), torch.tensor(GIDS), BETA)


def test_dpo_gradient_is_the_papers_weight():
    """Paper §2.3: for one pair, ∂L/∂log πθ(y_w) = −β·σ(β·ℓ_l − β·ℓ_w) and ∂L/∂log πθ(y_l) = −that."""
    p = t([-3.0, -4.5]).requires_grad_()
    ref, rewards = t([-3.2, -4.0]), t([1.0, 0.0])
    dpo_loss(p, ref, rewards, torch.tensor([0, 0]), 0.7).backward()
    ell_w, ell_l = -3.0 + 3.2, -4.5 + 4.0
    w = 0.7 / (1 + math.exp(-(0.7 * ell_l - 0.7 * ell_w)))
    assert p.grad.tolist() == pytest.approx([-w, w], rel=1e-12)


def test_pairs_are_averaged_per_group_then_groups_averaged():
    """A k = 4 group (6 pairs) weighs as much as a k = 2 group (1 pair), as in GVPO's 1/G Σ_x."""
    policy, ref = t([0.3, -0.2, 0.5, 0.1, -0.4, 0.2]), torch.zeros(6, dtype=F64)
    rewards, gids = t([3.0, 1.0, 2.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 0, 1, 1])
    for name in ("dpo", "ipo", "rebel"):
        alone = [OBJECTIVES[name].loss(policy[gids == g], ref[gids == g], rewards[gids == g], gids[gids == g], 0.9)
                 for g in (0, 1)]
        both = OBJECTIVES[name].loss(policy, ref, rewards, gids, 0.9)
        assert both.item() == pytest.approx((alone[0].item() + alone[1].item()) / 2, rel=1e-12), name
        pooled = (6 * alone[0].item() + alone[1].item()) / 7
        assert both.item() != pytest.approx(pooled, rel=1e-3), name


def test_rebel_by_hand_and_equal_to_gvpo_for_k2():
    # hand: group 7, pairs (0,1), (0,2), (1,2): β(ℓ_i − ℓ_j) − (R_i − R_j) = 1−1, 0−1, −1−0 -> (0+1+1)/3;
    # group 3: 0.5 − (−1) = 1.5 -> 2.25; group 9: −0.5 − 0 -> 0.25.  Mean over the 3 groups:
    expected = (2 / 3 + 2.25 + 0.25) / 3
    assert rebel_loss(t(POLICY), t(REF), t(REWARDS), torch.tensor(GIDS), BETA).item() == pytest.approx(expected)

    # k = 2: one pair d = β(ℓ_1 − ℓ_2) − (R_1 − R_2); c_1 = d/2 = −c_2, so GVPO = (c_1² + c_2²)/(k−1) = d²/2:
    # REBEL = d² = 2 × GVPO exactly, loss and gradient, for any mix of k = 2 groups.
    g = torch.Generator().manual_seed(0)
    policy, ref, rewards = (torch.randn(10, generator=g, dtype=F64) * 3 for _ in range(3))
    gids = torch.arange(10) // 2
    p1, p2 = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    rebel, gvpo = rebel_loss(p1, ref, rewards, gids, 0.3), gvpo_loss(p2, ref, rewards, gids, 0.3)
    rebel.backward(), gvpo.backward()
    assert rebel.item() == pytest.approx(2 * gvpo.item(), rel=1e-12)
    torch.testing.assert_close(p1.grad, 2 * p2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p2.grad, gvpo_grad_weights(policy, ref, rewards, gids, 0.3, n_groups=5))


def test_rebel_is_twice_gvpo_for_any_k_with_per_group_pair_means():
    """Σ_{i<j} (c_i − c_j)² = k·Σ c_i² when Σ c_i = 0: the per-group pair mean is 2 × eq. 16's group term."""
    g = torch.Generator().manual_seed(1)
    gids = torch.repeat_interleave(torch.arange(5), torch.tensor([2, 3, 6, 4, 5]))
    policy, ref, rewards = (torch.randn(len(gids), generator=g, dtype=F64) for _ in range(3))
    assert rebel_loss(policy, ref, rewards, gids, 1.7).item() == pytest.approx(
        2 * gvpo_loss(policy, ref, rewards, gids, 1.7).item(), rel=1e-12
    )


def test_sft_best_by_hand():
    # group 7: best R = 2 -> response 0: 10 nats / 4 tokens; group 3: best R = 1 -> response 4: 6/3;
    # group 9: both tie for best -> (2 + 1) nats / (6 + 2) tokens (tokens pooled).
    expected = (10 / 4 + 6 / 3 + 3 / 8) / 3
    p = t(POLICY).requires_grad_()
    loss = sft_best_loss(p, t(REWARDS), torch.tensor(GIDS), torch.tensor(TOKENS))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()  # only the best responses get a (negative: raise their likelihood) weight
    assert p.grad.tolist() == pytest.approx([-1 / 12, 0, 0, 0, -1 / 9, -1 / 24, -1 / 24], rel=1e-12)
    with pytest.raises(ValueError, match="n_tokens"):
        OBJECTIVES["sft-best"].loss(p, t(REF), t(REWARDS), torch.tensor(GIDS), BETA)


def test_all_tied_groups_give_dpo_and_ipo_nothing_to_learn():
    p = t([-1.0, -2.0, -3.0, -4.0]).requires_grad_()
    rewards, gids, ref = t([1.0, 1.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=F64)
    for name in ("dpo", "ipo"):
        assert OBJECTIVES[name].counted_groups(rewards, gids) == 0
        loss = OBJECTIVES[name].loss(p, ref, rewards, gids, 0.5)
        loss.backward()
        assert loss.item() == 0.0 and p.grad.abs().max().item() == 0.0
        p.grad = None
    assert OBJECTIVES["rebel"].counted_groups(rewards, gids) == 2


def test_gvpo_objective_is_gvpo_loss():
    g = torch.Generator().manual_seed(2)
    gids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    policy, ref, rewards = (torch.randn(9, generator=g, dtype=F64) for _ in range(3))
    assert OBJECTIVES["gvpo"].loss(policy, ref, rewards, gids, 0.4).item() == pytest.approx(
        gvpo_loss(policy, ref, rewards, gids, 0.4).item(), rel=1e-14
    )


# ---- the micro-batched gradient in train.py ----------------------------------------------------------


def batch_with_ties():
    """random_batch's 4 groups, with rewards tied inside group 0 (a DPO/IPO no-pair group) and a tie for
    the best reward in group 3."""
    batch = random_batch(ks=(2, 3, 4, 5))
    rewards = batch.rewards.clone()
    rows = [batch.group_index == j for j in range(4)]
    rewards[rows[0]] = 0.25
    best = rewards[rows[3]].max()
    rewards[torch.nonzero(rows[3])[0]] = best
    batch.rewards = rewards
    return batch


@pytest.mark.parametrize("name", ["dpo", "ipo", "ipo-trl", "rebel", "sft-best"])
def test_split_micro_batches_give_the_one_pass_gradient(name):
    model, batch, beta, objective = tiny_llama(), batch_with_ties(), 0.3, OBJECTIVES[name]
    one = gvpo_backward(model, batch, beta, micro_batch_tokens=100_000, objective=objective)
    g_one = grads(model)
    split = gvpo_backward(model, batch, beta, micro_batch_tokens=20, objective=objective)  # every group cut
    g_split = grads(model)
    mixed = gvpo_backward(model, batch, beta, micro_batch_tokens=60, objective=objective)  # packs and cuts
    g_mixed = grads(model)
    assert one.micro_batches == 1 and split.micro_batches > mixed.micro_batches > 1

    # independent: one forward of every response, autograd through the objective's loss
    n_tokens = torch.tensor([len(r) for r in batch.response_ids])
    logps = sequence_logps(model, batch.prompt_ids, batch.response_ids)
    direct = objective.loss(logps, batch.ref_logps, batch.rewards, batch.group_index, beta, n_tokens)
    direct.backward()
    g_direct = grads(model)
    for stats in (one, split, mixed):
        assert stats.loss == pytest.approx(direct.item(), rel=1e-6)
    assert g_one.keys() == g_split.keys() == g_direct.keys()
    for key in g_one:
        scale = g_direct[key].abs().max().item() + 1e-12
        assert (g_split[key] - g_direct[key]).abs().max().item() <= 1e-5 * scale, key
        assert (g_mixed[key] - g_direct[key]).abs().max().item() <= 1e-5 * scale, key
        assert (g_one[key] - g_direct[key]).abs().max().item() <= 1e-5 * scale, key


# ---- train / resume / eval on the real model ---------------------------------------------------------


@pytest.fixture(scope="module")
def story_cache(tmp_path_factory) -> Path:
    """STORY_GROUPS as the train split (k = 3, 2, 5, 4) plus two of them again as the eval split."""
    workdir, before = tmp_path_factory.mktemp("objectives") / "run", torch.get_num_threads()
    torch.set_num_threads(1)
    groups = text_groups(STORIES, STORY_GROUPS)
    held_out = text_groups(STORIES, STORY_GROUPS[:2])
    for n, g in enumerate(held_out):
        g.group_id, g.split = f"eval{n}", "eval"
    build_cache(workdir, STORIES, groups + held_out)
    torch.set_num_threads(before)
    return workdir


def step0_expected(name: str, beta: float, workdir: Path) -> float:
    """Each objective's loss at ℓ = 0 (policy = reference), from its formula and the cached data."""
    groups = []
    for _, _, rewards in STORY_GROUPS:
        k, mean = len(rewards), sum(rewards) / len(rewards)
        groups.append((rewards, sum((r - mean) ** 2 for r in rewards) / (k - 1)))
    if name == "gvpo":
        return sum(v for _, v in groups) / len(groups)
    if name == "rebel":
        return 2 * sum(v for _, v in groups) / len(groups)
    if name == "dpo":  # every pair: −log σ(0) = log 2 (all STORY_GROUPS have distinct rewards)
        return math.log(2)
    if name == "ipo":
        return (1 / (2 * beta)) ** 2
    cached = load_train_groups(workdir)  # sft-best: token-mean NLL of the best response under πref
    batch = make_batch(cached, list(range(cached.n_groups)))
    terms = []
    for j in range(cached.n_groups):
        rows = (batch.group_index == j).nonzero().flatten().tolist()
        best = max(rows, key=lambda i: batch.rewards[i].item())
        terms.append(-batch.ref_logps[best].item() / len(batch.response_ids[best]))
    return sum(terms) / len(terms)


def quiet(_msg: str) -> None:
    pass


def config(workdir: Path, **kw) -> TrainConfig:
    defaults = dict(workdir=workdir, beta=0.5, lr=2e-4, groups_per_step=4, save_every=0, progress=False,
                    device="cpu")
    return TrainConfig(**{**defaults, **kw})


@pytest.mark.parametrize("name", ["gvpo", "dpo", "ipo", "rebel", "sft-best"])
def test_step0_loss_and_the_recorded_objective(workdir, name):
    torch.set_num_threads(1)
    train(config(workdir, loss=name, max_steps=2), log=quiet)
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["log_ratio_absmax"] < 1e-4
    assert metrics[0]["loss"] == pytest.approx(step0_expected(name, 0.5, workdir), rel=1e-4)
    assert metrics[0]["objective"] == name
    if name != "gvpo":  # GVPO's loss is logged beside the objective's, to compare runs
        assert metrics[0]["gvpo_loss"] == pytest.approx(step0_expected("gvpo", 0.5, workdir), rel=1e-4)
    assert metrics[1]["log_ratio_absmax"] > 1e-4  # it moved
    saved = json.loads((workdir / "model" / "train_config.json").read_text())
    assert saved["loss"] == name and saved["loss_formula"] == OBJECTIVES[name].formula


def test_resume_with_another_loss_is_refused(workdir):
    torch.set_num_threads(1)
    train(config(workdir, loss="dpo", max_steps=2, save_every=1), log=quiet)
    with pytest.raises(GvpoError, match="--loss dpo -> gvpo"):
        train(config(workdir, loss="gvpo", max_steps=2, save_every=1, resume=True), log=quiet)
    assert train(config(workdir, loss="dpo", max_steps=2, save_every=1, resume=True), log=quiet).resumed_from == 2


def test_unknown_loss_is_a_one_line_error(workdir, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--workdir", str(workdir), "--beta", "0.1", "--loss", "ppo"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert "--loss must be one of gvpo, dpo, ipo, ipo-trl, rebel, sft-best" in err[0]


def test_eval_reports_the_objective(workdir, capsys, tmp_path):
    from rich.console import Console

    from gvpo_offline.stages.evaluate.heldout import EvalConfig, evaluate, report_table

    torch.set_num_threads(1)
    train(config(workdir, loss="ipo", max_steps=1), log=quiet)
    report = evaluate(EvalConfig(workdir=str(workdir), bootstrap=0, device="cpu", json_path=str(tmp_path / "e.json")),
                      Console(file=open(tmp_path / "log.txt", "w")))
    assert report.objective == "ipo"
    assert json.loads((tmp_path / "e.json").read_text())["meta"]["objective"] == "ipo"
    assert "trained with --loss ipo" in report_table(report).title
    # a model saved before --loss existed ("loss" held the formula) was trained with GVPO
    cfg_path = workdir / "model" / "train_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "loss": "GVPO eq. 16: 1/G Σ_x 1/(k-1) Σ_i c_i²"}))
    assert evaluate(EvalConfig(workdir=str(workdir), bootstrap=0, device="cpu"),
                    Console(file=open(tmp_path / "log2.txt", "w"))).objective == "gvpo"
