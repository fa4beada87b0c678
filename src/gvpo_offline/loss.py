"""The GVPO objective (paper §3.2–3.3). Pure tensor math: no I/O, no model.

Notation, per response i of a group x with k = k(x) responses:
    ℓ_i  = log πθ(y_i|x) − log πref(y_i|x)        (sequence log-probs: sums over response tokens)
    Rθ_i = β·ℓ_i                                  (implicit reward; β multiplies, never divides)
    c_i  = (Rθ_i − mean_j Rθ_j) − (R_i − mean_j R_j)

The loss is the unbiased estimator of eq. 16, averaged over the G groups present:
    L = 1/G · Σ_x 1/(k(x)−1) · Σ_i c_i²
Its gradient w.r.t. the policy's sequence log-probs is 2β·c_i / ((k(x)−1)·G). The c_i sum to zero within
each group, so the partition function Z(x) cancels and the unique minimiser is π* ∝ πref·exp(R/β).
The authors' verl code scales the loss by ½ (half this gradient at the same learning rate).
"""

from __future__ import annotations

import torch
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
