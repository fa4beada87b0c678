"""The GVPO objective (loss.py) against independent python/numpy computations of the paper's formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gvpo_offline.math.loss import gvpo_centered_residuals, gvpo_grad_weights, gvpo_loss


def random_groups(seed: int, ks=(2, 3, 5, 4), shuffle=True):
    """Random responses of groups with the given k; group ids non-contiguous, rows optionally shuffled."""
    rng = np.random.default_rng(seed)
    gids = np.concatenate([np.full(k, 10 * g + 7) for g, k in enumerate(ks)])  # 7, 17, 27, ...
    if shuffle:
        gids = gids[rng.permutation(len(gids))]
    n = len(gids)
    policy, ref, rewards = rng.normal(-20, 5, n), rng.normal(-20, 5, n), rng.normal(0, 1, n)
    return policy, ref, rewards, gids


def reference_loss_and_grad(policy, ref, rewards, gids, beta):
    """Paper eq. 16 and its gradient 2β·c_i/((k−1)·G), with plain python loops."""
    groups = sorted(set(gids.tolist()))
    loss, grad = 0.0, [0.0] * len(gids)
    for g in groups:
        rows = [i for i in range(len(gids)) if gids[i] == g]
        k = len(rows)
        mean_implicit = sum(beta * (policy[i] - ref[i]) for i in rows) / k
        mean_reward = sum(rewards[i] for i in rows) / k
        for i in rows:
            c = (beta * (policy[i] - ref[i]) - mean_implicit) - (rewards[i] - mean_reward)
            loss += c * c / (k - 1) / len(groups)
            grad[i] = 2 * beta * c / ((k - 1) * len(groups))
    return loss, np.array(grad)


def as_tensors(policy, ref, rewards, gids, dtype=torch.float64):
    return (
        torch.tensor(policy, dtype=dtype, requires_grad=True),
        torch.tensor(ref, dtype=dtype),
        torch.tensor(rewards, dtype=dtype),
        torch.tensor(gids, dtype=torch.long),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_gradient_matches_paper_weights(seed, beta):
    policy, ref, rewards, gids = random_groups(seed)
    p, r, R, g = as_tensors(policy, ref, rewards, gids)
    loss = gvpo_loss(p, r, R, g, beta)
    loss.backward()
    want_loss, want_grad = reference_loss_and_grad(policy, ref, rewards, gids, beta)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(p.grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)
    weights = gvpo_grad_weights(p, r, R, g, beta, n_groups=len(set(gids.tolist())))
    np.testing.assert_allclose(weights.numpy(), want_grad, rtol=1e-10, atol=1e-12)


def test_weights_and_residuals_sum_to_zero_per_group():
    policy, ref, rewards, gids = random_groups(3, ks=(2, 6, 3, 3, 9))
    p, r, R, g = as_tensors(policy, ref, rewards, gids)
    w = gvpo_grad_weights(p, r, R, g, 0.5, n_groups=5)
    c = gvpo_centered_residuals(p, r, R, g, 0.5)
    for gid in set(gids.tolist()):
        assert abs(w[g == gid].sum().item()) < 1e-12
        assert abs(c[g == gid].sum().item()) < 1e-12


def test_group_order_and_ids_do_not_matter():
    policy, ref, rewards, gids = random_groups(4, shuffle=False)
    base = gvpo_loss(*as_tensors(policy, ref, rewards, gids), beta=0.7).item()
    perm = np.random.default_rng(0).permutation(len(gids))
    relabel = {g: n for g, n in zip(sorted(set(gids.tolist())), [1000, -5, 3, 42])}
    gids2 = np.array([relabel[g] for g in gids[perm]])
    shuffled = gvpo_loss(*as_tensors(policy[perm], ref[perm], rewards[perm], gids2), beta=0.7).item()
    assert shuffled == pytest.approx(base, rel=1e-12)
    assert base == pytest.approx(reference_loss_and_grad(policy, ref, rewards, gids, 0.7)[0], rel=1e-12)


def test_constant_shift_within_a_group_cancels():
    """Z(x) cancels: adding a constant to one group's rewards or policy log-probs changes nothing."""
    policy, ref, rewards, gids = random_groups(5)
    base = gvpo_loss(*as_tensors(policy, ref, rewards, gids), beta=0.3).item()
    one = gids == gids[0]
    for shifted in (
        as_tensors(policy, ref, rewards + 17.0 * one, gids),
        as_tensors(policy - 3.5 * one, ref, rewards, gids),
        as_tensors(policy, ref + 2.0 * one, rewards, gids),
    ):
        assert gvpo_loss(*shifted, beta=0.3).item() == pytest.approx(base, rel=1e-10)
    # ...while a change that is not constant within the group does change it
    bumped = policy.copy()
    bumped[np.flatnonzero(one)[0]] += 1.0
    assert gvpo_loss(*as_tensors(bumped, ref, rewards, gids), beta=0.3).item() != pytest.approx(base)


def test_unbiased_for_variable_k():
    """Thm 3.3 / Cor. 3.4: E[loss] = population variance of (β·ℓ − R) under π_s, for any mix of k ≥ 2.

    A discrete population of 4 responses with probabilities p; each draw takes k ∈ {2..6} responses
    i.i.d. from it. The 1/(k−1) estimator's mean matches the exact variance; a 1/k one is biased low.
    """
    beta = 0.5
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    pop_policy = np.array([-10.0, -12.0, -9.0, -15.0])
    pop_ref = np.array([-11.0, -11.5, -10.0, -12.0])
    pop_reward = np.array([1.0, -0.5, 2.0, 0.0])
    d = beta * (pop_policy - pop_ref) - pop_reward
    exact_var = float(probs @ (d - probs @ d) ** 2)

    rng = np.random.default_rng(0)
    n_groups = 60_000
    ks = rng.integers(2, 7, size=n_groups)
    gids = np.repeat(np.arange(n_groups), ks)
    pick = rng.choice(4, size=len(gids), p=probs)
    p, r, R, g = (t.detach() for t in as_tensors(pop_policy[pick], pop_ref[pick], pop_reward[pick], gids))
    estimate = gvpo_loss(p, r, R, g, beta).item()

    # per-group values for a standard error and for the biased 1/k variant
    c2 = (gvpo_centered_residuals(p, r, R, g, beta) ** 2).numpy()
    sum_c2 = np.bincount(gids, weights=c2)
    unbiased, biased = sum_c2 / (ks - 1), sum_c2 / ks
    assert estimate == pytest.approx(unbiased.mean(), rel=1e-9)
    se = unbiased.std() / np.sqrt(n_groups)
    assert abs(estimate - exact_var) < 4 * se, (estimate, exact_var, se)
    assert exact_var - biased.mean() > 20 * se  # the 1/k version is measurably biased low


def test_dtypes():
    policy, ref, rewards, gids = random_groups(6)
    assert gvpo_loss(*as_tensors(policy, ref, rewards, gids, torch.float64), beta=1.0).dtype == torch.float64
    assert gvpo_loss(*as_tensors(policy, ref, rewards, gids, torch.float32), beta=1.0).dtype == torch.float32
    p16 = torch.tensor(policy, dtype=torch.bfloat16)
    args = (torch.tensor(ref, dtype=torch.bfloat16), torch.tensor(rewards, dtype=torch.bfloat16), torch.tensor(gids))
    assert gvpo_loss(p16, *args, beta=1.0).dtype == torch.float32  # statistics never in bf16


def test_single_response_group_raises():
    p, r, R, g = as_tensors([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0, 0, 1])
    with pytest.raises(ValueError, match="k >= 2"):
        gvpo_loss(p, r, R, g, beta=1.0)
    with pytest.raises(ValueError, match="k >= 2"):
        gvpo_grad_weights(p, r, R, torch.tensor([0, 1, 1]), 1.0, n_groups=2)


def test_zero_at_the_optimum():
    """ℓ_i = R_i/β + const per group (π = πref·exp(R/β)/Z) gives loss 0 and zero gradient."""
    policy, ref, rewards, gids = random_groups(7)
    beta = 0.25
    offsets = {g: float(i) * 3 for i, g in enumerate(set(gids.tolist()))}
    optimum = ref + rewards / beta + np.array([offsets[g] for g in gids])
    p, r, R, g = as_tensors(optimum, ref, rewards, gids)
    loss = gvpo_loss(p, r, R, g, beta)
    loss.backward()
    assert loss.item() < 1e-20
    assert p.grad.abs().max().item() < 1e-10
