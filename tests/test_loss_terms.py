"""loss.gvpo_loss_terms: the eq. 16-17 decomposition logged per training step, checked by hand."""

import pytest
import torch

from gvpo_offline.math.loss import gvpo_loss, gvpo_loss_terms


def test_terms_by_hand_and_recombined():
    beta = 0.5
    ref = torch.tensor([-10.0, -12.0, -5.0, -6.0, -7.0], dtype=torch.float64)
    ell = torch.tensor([2.0, 6.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # β·ℓ = [1, 3] | [0, 0, 0]
    rewards = torch.tensor([0.0, 4.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    groups = torch.tensor([7, 7, 3, 3, 3])
    terms = gvpo_loss_terms(ref + ell, ref, rewards, groups, beta)
    # group 7 (k=2): β·ℓ centred [-1, 1], R centred [-2, 2] -> var 2, cov 4, var R 8
    # group 3 (k=3): β·ℓ centred 0, R centred [-1, 0, 1]     -> var 0, cov 0, var R 2/2 = 1
    assert terms == pytest.approx({"implicit_reward_variance": 1.0, "implicit_reward_covariance": 2.0,
                                   "reward_variance": 4.5})
    loss = gvpo_loss(ref + ell, ref, rewards, groups, beta).item()
    assert loss == pytest.approx(1.0 - 2 * 2.0 + 4.5)
