"""The GVPO objective (paper §3.2–3.3) and the baselines `train --loss` offers on the same groups
(DPO, IPO, REBEL, SFT on the best response; §3.4–3.5). Pure tensor math: no I/O, no model.

Notation, per response i of a group x with k = k(x) responses:
    ℓ_i  = log πθ(y_i|x) − log πref(y_i|x)        (sequence log-probs: sums over response tokens)
    Rθ_i = β·ℓ_i                                  (implicit reward; β multiplies, never divides)
    c_i  = (Rθ_i − mean_j Rθ_j) − (R_i − mean_j R_j)

The loss is the unbiased estimator of eq. 16, averaged over the G groups present:
    L = 1/G · Σ_x 1/(k(x)−1) · Σ_i c_i²
Its gradient w.r.t. the policy's sequence log-probs is 2β·c_i / ((k(x)−1)·G). The c_i sum to zero within
each group, so the partition function Z(x) cancels and the unique minimiser is π* ∝ πref·exp(R/β).
The authors' verl objective is (m/(2n)) × this per optimizer step (m = ppo_micro_batch_size_per_gpu,
n = responses per prompt; ×2 for their shipped script); AdamW mostly cancels a constant factor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _groups(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """group_ids [N] (any order, any values) -> (index [N] in 0..G-1, counts [G] = k per group)."""
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError("every group needs k >= 2 responses (the estimator divides by k-1)")
    return index, counts


def _group_mean(values: Tensor, index: Tensor, counts: Tensor) -> Tensor:
    """Per-response mean of ``values`` over its group: [N] -> [N]."""
    sums = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device).index_add(0, index, values)
    return (sums / counts.to(values.dtype))[index]


def _as_float(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = torch.promote_types(torch.result_type(tensors[0], tensors[1]), tensors[2].dtype)
    dtype = torch.promote_types(dtype, torch.float32)  # never do the group statistics in bf16/fp16
    return tuple(t.to(dtype) for t in tensors)


def gvpo_centered_residuals(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, beta: float
) -> Tensor:
    """c_i = (β·ℓ_i − mean_group β·ℓ) − (R_i − mean_group R), shape [N]; sums to zero within each group."""
    policy_logps, ref_logps, rewards = _as_float(policy_logps, ref_logps, rewards)
    index, counts = _groups(group_ids)
    implicit = beta * (policy_logps - ref_logps)
    return (implicit - _group_mean(implicit, index, counts)) - (rewards - _group_mean(rewards, index, counts))


def gvpo_loss(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, beta: float
) -> Tensor:
    """GVPO loss, the unbiased estimator of paper eq. 16, as a scalar tensor.

        L = 1/G · Σ_groups 1/(k−1) · Σ_i [(β·ℓ_i − mean_j β·ℓ_j) − (R_i − mean_j R_j)]²,   ℓ = policy − ref

    Args:
        policy_logps: [N] float, log πθ(y_i|x) summed over each response's tokens (carries the gradient).
        ref_logps: [N] float, log πref(y_i|x), same tokenization.
        rewards: [N] float, scalar reward R(x, y_i).
        group_ids: [N] long, which prompt each response answers; any order, need not be contiguous.
            Every group needs k >= 2 responses.
        beta: KL strength β > 0 (multiplies the log-ratio).

    Returns a 0-dim tensor in the promoted dtype of the inputs (at least float32; float64 in -> float64).
    """
    c = gvpo_centered_residuals(policy_logps, ref_logps, rewards, group_ids, beta)
    index, counts = _groups(group_ids)
    per_group = torch.zeros(counts.shape[0], dtype=c.dtype, device=c.device).index_add(0, index, c * c)
    return (per_group / (counts.to(c.dtype) - 1)).mean()


def gvpo_grad_weights(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, beta: float, n_groups: int
) -> Tensor:
    """dL/d log πθ(y_i|x) = 2β·c_i / ((k−1)·n_groups), shape [N], detached (eq. 12–13).

    ``Σ_i w_i · log πθ(y_i|x)`` has exactly the gradient of :func:`gvpo_loss` (with G = n_groups), so a
    group too large for one forward pass can be back-propagated micro-batch by micro-batch.
    """
    with torch.no_grad():
        c = gvpo_centered_residuals(policy_logps, ref_logps, rewards, group_ids, beta)
        index, counts = _groups(group_ids)
        return 2.0 * beta * c / ((counts[index].to(c.dtype) - 1) * n_groups)


def gvpo_loss_terms(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, beta: float
) -> dict[str, float]:
    """The three within-group statistics the loss is made of (eq. 16–17), each averaged over the G groups:

        implicit_reward_variance   = 1/G Σ_x 1/(k−1) Σ_i (Rθ_i − mean Rθ)²          (Rθ = β·ℓ)
        implicit_reward_covariance = 1/G Σ_x 1/(k−1) Σ_i (Rθ_i − mean Rθ)(R_i − mean R)
        reward_variance            = 1/G Σ_x 1/(k−1) Σ_i (R_i − mean R)²

    so that gvpo_loss = implicit_reward_variance − 2·implicit_reward_covariance + reward_variance. Training drives the
    covariance up towards var_reward (the implicit reward learns the reward's ordering) while keeping the
    implicit-reward variance in check. Shapes as in :func:`gvpo_loss`; returns Python floats.
    """
    with torch.no_grad():
        policy_logps, ref_logps, rewards = _as_float(policy_logps, ref_logps, rewards)
        index, counts = _groups(group_ids)
        implicit = beta * (policy_logps - ref_logps)
        a = implicit - _group_mean(implicit, index, counts)
        r = rewards - _group_mean(rewards, index, counts)

        def mean_over_groups(values: Tensor) -> float:
            sums = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device).index_add(0, index, values)
            return (sums / (counts.to(values.dtype) - 1)).mean().item()

        return {
            "implicit_reward_variance": mean_over_groups(a * a),
            "implicit_reward_covariance": mean_over_groups(a * r),
            "reward_variance": mean_over_groups(r * r),
        }


# ---- the same groups, other objectives (paper §2.3, §3.4) -----------------------------------------
#
# Every objective below is a mean of per-group terms over the groups that carry one:
#     L = Σ_x term_x / Σ_x counted_x
# so each prompt weighs the same, as in GVPO's 1/G Σ_x, and a step's loss splits exactly into the
# micro-batches of whole groups (step.py). Within a group, a pairwise objective averages over the
# group's pairs ("each group's pairs averaged, then groups averaged"): a prompt with k = 6 answers
# (15 pairs) does not weigh 15 times a prompt with k = 2, and the comparison with GVPO changes the
# per-group loss only, not the weighting of the prompts. ℓ_i = log πθ(y_i|x) − log πref(y_i|x) as above.


def _pairs(index: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """All unordered within-group pairs (i, j), i < j, of responses with group numbers ``index`` [N]
    (``counts`` [G] = k per group): two [P] long tensors, P = Σ_x k(k−1)/2, in (i, j) order per group."""
    order = torch.argsort(index, stable=True)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    firsts, seconds = [], []
    for start, k in zip(starts, counts.tolist()):
        a, b = torch.triu_indices(k, k, offset=1, device=index.device)
        rows = order[start : start + k]
        firsts.append(rows[a])
        seconds.append(rows[b])
    return torch.cat(firsts), torch.cat(seconds)


def _per_group_mean(values: Tensor, group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """values [P] of items in groups ``group`` [P] -> (per-group mean [G], 0 where a group has no item;
    counted [G] bool, the groups that have items)."""
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(0, group, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(
        0, group, torch.ones_like(values)
    )
    return sums / counts.clamp(min=1), counts > 0


def _preference_pairs(policy_logps, ref_logps, rewards, group_ids):
    """(margin [P], pair group [P], G): for every within-group pair with different rewards, the chosen
    (higher-reward) response's ℓ minus the rejected one's."""
    policy_logps, ref_logps, rewards = _as_float(policy_logps, ref_logps, rewards)
    index, counts = _groups(group_ids)
    i, j = _pairs(index, counts)
    keep = rewards[i] != rewards[j]
    i, j = i[keep], j[keep]
    ell = policy_logps - ref_logps
    sign = torch.sign(rewards[i] - rewards[j])
    return sign * (ell[i] - ell[j]), index[i], counts.shape[0]


def dpo_group_terms(policy_logps, ref_logps, rewards, group_ids, beta: float, n_tokens=None):
    """DPO (Rafailov et al. 2023; TRL's ``sigmoid`` loss): per group, the mean over its pairs with
    different rewards of −log σ(β·(ℓ_chosen − ℓ_rejected)). Returns (terms [G], counted [G]); a group
    whose rewards are all equal has no pair: term 0, not counted."""
    margin, group, n_groups = _preference_pairs(policy_logps, ref_logps, rewards, group_ids)
    return _per_group_mean(F.softplus(-beta * margin), group, n_groups)  # softplus(−z) = −log σ(z)


def ipo_group_terms(policy_logps, ref_logps, rewards, group_ids, beta: float, n_tokens=None):
    """IPO (Azar et al. 2023, eq. 17; TRL's ``ipo`` loss with τ = β): per group, the mean over its pairs
    with different rewards of (ℓ_chosen − ℓ_rejected − 1/(2β))². ℓ is the sequence log-ratio (a sum over
    tokens) as for every objective here; TRL divides IPO's log-probs by the response length first.
    Returns (terms [G], counted [G]); all-equal-reward groups: term 0, not counted."""
    margin, group, n_groups = _preference_pairs(policy_logps, ref_logps, rewards, group_ids)
    return _per_group_mean((margin - 1.0 / (2.0 * beta)) ** 2, group, n_groups)


def ipo_trl_group_terms(policy_logps, ref_logps, rewards, group_ids, beta: float, n_tokens=None):
    """IPO as TRL computes it (``DPOTrainer(loss_type="ipo")``): the same pairs and weighting as
    :func:`ipo_group_terms`, but each response's log-ratio is divided by its length first,
    ((ℓ_c/T_c − ℓ_r/T_r) − 1/(2β))², T = response tokens. ``n_tokens`` [N]: T_i (required).
    Returns (terms [G], counted [G]); all-equal-reward groups: term 0, not counted."""
    if n_tokens is None:
        raise ValueError("ipo-trl needs n_tokens, the response token counts")
    policy_logps, ref_logps, rewards = _as_float(policy_logps, ref_logps, rewards)
    n_tokens = n_tokens.to(policy_logps.dtype)
    margin, group, n_groups = _preference_pairs(policy_logps / n_tokens, ref_logps / n_tokens, rewards, group_ids)
    return _per_group_mean((margin - 1.0 / (2.0 * beta)) ** 2, group, n_groups)


def rebel_group_terms(policy_logps, ref_logps, rewards, group_ids, beta: float, n_tokens=None):
    """REBEL (Gao et al. 2024, η = 1/β): per group, the mean over all its pairs i < j (equal rewards
    included) of the squared regression residual [β·(ℓ_i − ℓ_j) − (R_i − R_j)]². Every group counts.

    Since β·(ℓ_i − ℓ_j) − (R_i − R_j) = c_i − c_j and Σ_i c_i = 0, Σ_{i<j} (c_i − c_j)² = k·Σ_i c_i², so
    the pair mean is 2/(k−1)·Σ_i c_i² = 2 × GVPO's group term (eq. 16) for every k: this REBEL is
    exactly twice GVPO (for k = 2 under any pair weighting; for k > 2 because pairs are averaged per
    group). Returns (terms [G], counted [G])."""
    policy_logps, ref_logps, rewards = _as_float(policy_logps, ref_logps, rewards)
    index, counts = _groups(group_ids)
    i, j = _pairs(index, counts)
    implicit = beta * (policy_logps - ref_logps)
    residual = (implicit[i] - implicit[j]) - (rewards[i] - rewards[j])
    return _per_group_mean(residual**2, index[i], counts.shape[0])


def sft_best_group_terms(policy_logps, ref_logps, rewards, group_ids, beta: float, n_tokens=None):
    """SFT on the best response (rejection-sampling fine-tuning, paper §2.3: w_i = 1 for the top reward):
    per group, the token-mean negative log-likelihood of its highest-reward response(s),
    −Σ_{i∈best} log πθ(y_i|x) / Σ_{i∈best} T_i (ties for the top reward all kept, their tokens pooled).
    Uses neither πref nor β. ``n_tokens`` [N]: response tokens T_i (required). Every group counts."""
    if n_tokens is None:
        raise ValueError("sft-best needs n_tokens, the response token counts")
    policy_logps, _, rewards = _as_float(policy_logps, ref_logps, rewards)
    index, counts = _groups(group_ids)
    best_reward = torch.full((counts.shape[0],), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    best = rewards == best_reward.scatter_reduce(0, index, rewards, reduce="amax")[index]
    n_tokens = n_tokens.to(policy_logps.dtype)
    zeros = torch.zeros(counts.shape[0], dtype=policy_logps.dtype, device=policy_logps.device)
    nll = zeros.index_add(0, index[best], -policy_logps[best])
    return nll / zeros.index_add(0, index[best], n_tokens[best]), torch.ones_like(counts, dtype=torch.bool)


def gvpo_group_terms(policy_logps, ref_logps, rewards, group_ids, beta: float, n_tokens=None):
    """GVPO's per-group terms 1/(k−1)·Σ_i c_i² (eq. 16); their mean is :func:`gvpo_loss`."""
    c = gvpo_centered_residuals(policy_logps, ref_logps, rewards, group_ids, beta)
    index, counts = _groups(group_ids)
    per_group = torch.zeros(counts.shape[0], dtype=c.dtype, device=c.device).index_add(0, index, c * c)
    return per_group / (counts.to(c.dtype) - 1), torch.ones_like(counts, dtype=torch.bool)


GroupTerms = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Objective:
    """A training objective on groups: ``group_terms(policy_logps [N], ref_logps [N], rewards [N],
    group_ids [N], beta, n_tokens [N] | None) -> (terms [G], counted [G] bool)`` with G the distinct
    group ids in sorted order; the loss is Σ terms / Σ counted (0 when nothing counts)."""

    name: str
    group_terms: GroupTerms
    formula: str  # one line, for train_config.json and the docs

    def loss(self, policy_logps, ref_logps, rewards, group_ids, beta: float, n_tokens=None) -> Tensor:
        """The objective's scalar loss over the groups present (0-dim; differentiable in policy_logps)."""
        terms, counted = self.group_terms(policy_logps, ref_logps, rewards, group_ids, beta, n_tokens)
        return terms.sum() / counted.sum().clamp(min=1)

    def counted_groups(self, rewards: Tensor, group_ids: Tensor) -> int:
        """How many of the groups carry a term (depends on the rewards only, not on the log-probs)."""
        zeros = torch.zeros_like(rewards, dtype=torch.float64)
        return int(self.group_terms(zeros, zeros, rewards, group_ids, 1.0, torch.ones_like(zeros))[1].sum())


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("gvpo", gvpo_group_terms,
                  "GVPO eq. 16: 1/G Σ_x 1/(k-1) Σ_i c_i²  (the authors' verl objective is (m/(2n)) × this per "
                  "optimizer step, m = ppo_micro_batch_size_per_gpu, n = responses per prompt; AdamW mostly "
                  "cancels a constant factor)"),
        Objective("dpo", dpo_group_terms, "DPO: mean over groups with a reward difference of the mean over their "
                  "pairs (R_c > R_r) of -log σ(β(ℓ_c - ℓ_r))"),
        Objective("ipo", ipo_group_terms, "IPO: mean over groups with a reward difference of the mean over their "
                  "pairs (R_c > R_r) of (ℓ_c - ℓ_r - 1/(2β))²"),
        Objective("ipo-trl", ipo_trl_group_terms, "IPO as TRL's DPOTrainer(loss_type='ipo'): as ipo with each "
                  "log-ratio divided by its response length T: ((ℓ_c/T_c - ℓ_r/T_r) - 1/(2β))²"),
        Objective("rebel", rebel_group_terms, "REBEL: mean over groups of the mean over all pairs i<j of "
                  "(β(ℓ_i - ℓ_j) - (R_i - R_j))²  (= 2 × GVPO eq. 16)"),
        Objective("sft-best", sft_best_group_terms, "SFT on the best: mean over groups of the token-mean NLL "
                  "of the highest-reward response(s)"),
    )
}
"""``train --loss NAME`` -> its :class:`Objective`."""


def dpo_loss(policy_logps, ref_logps, rewards, group_ids, beta: float) -> Tensor:
    """DPO over every within-group pair with different rewards (:func:`dpo_group_terms`), pairs averaged
    per group, then groups averaged over the groups that have a pair. 0-dim tensor."""
    return OBJECTIVES["dpo"].loss(policy_logps, ref_logps, rewards, group_ids, beta)


def ipo_loss(policy_logps, ref_logps, rewards, group_ids, beta: float) -> Tensor:
    """IPO over the same pairs and with the same weighting as :func:`dpo_loss` (:func:`ipo_group_terms`)."""
    return OBJECTIVES["ipo"].loss(policy_logps, ref_logps, rewards, group_ids, beta)


def rebel_loss(policy_logps, ref_logps, rewards, group_ids, beta: float) -> Tensor:
    """REBEL over all within-group pairs, pairs averaged per group, groups averaged (= 2 × gvpo_loss)."""
    return OBJECTIVES["rebel"].loss(policy_logps, ref_logps, rewards, group_ids, beta)


def sft_best_loss(policy_logps, rewards, group_ids, n_tokens) -> Tensor:
    """Token-mean NLL of each group's highest-reward response(s), averaged over groups
    (:func:`sft_best_group_terms`). ``policy_logps`` [N]: Σ log πθ over each response's tokens."""
    return OBJECTIVES["sft-best"].loss(policy_logps, torch.zeros_like(policy_logps), rewards, group_ids, 1.0, n_tokens)
