"""Held-out metrics as pure numpy (no I/O, no torch): per-group statistics of ℓ = log πθ − log πref and
the rewards, every metric of :data:`METRICS` as a ratio of per-group sums, and percentile-bootstrap
intervals over groups. The definitions of the metrics, counts and intervals are in the docstring of
:mod:`gvpo_offline.evaluate`, the stage that feeds this module and writes the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METRICS = (
    "gvpo_loss",
    "pairwise_accuracy",
    "spearman",
    "top1_agreement",
    "mean_log_ratio",
    "mean_log_ratio_per_token",
    "implicit_reward_variance",
    "implicit_reward_covariance",
    "reward_variance",
)
COUNTS = ("groups", "responses", "tokens", "ranked_groups", "skipped_groups", "pairs")



@dataclass(frozen=True)
class GroupIndex:
    """Responses grouped: ``index`` [N] in 0..G-1, ``sizes`` [G] = k per group, and ``blocks``: for every
    distinct k, (group numbers [n], response positions [n, k]) so per-group math is batched by size."""

    index: np.ndarray
    sizes: np.ndarray
    blocks: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def n_groups(self) -> int:
        return int(self.sizes.shape[0])


def group_index(group_ids, max_block_cells: int = 1 << 22) -> GroupIndex:
    """Any per-response group labels (any order, any sortable numpy dtype) -> :class:`GroupIndex`.

    Blocks are split so that no block's [n, k, k] pairwise arrays exceed ``max_block_cells`` elements.
    """
    group_ids = np.asarray(group_ids)
    if group_ids.ndim != 1 or group_ids.shape[0] == 0:
        raise ValueError("group_ids must be a non-empty 1-d array")
    _, index, sizes = np.unique(group_ids, return_inverse=True, return_counts=True)
    index = index.reshape(-1)
    if (sizes < 2).any():
        raise ValueError("every group needs k >= 2 responses")
    order = np.argsort(index, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    blocks = []
    for k in np.unique(sizes):
        groups = np.flatnonzero(sizes == k)
        positions = order[starts[groups][:, None] + np.arange(k)[None, :]]
        step = max(1, max_block_cells // int(k * k))  # the pairwise math holds [n, k, k] arrays
        for lo in range(0, groups.shape[0], step):
            blocks.append((groups[lo : lo + step], positions[lo : lo + step]))
    return GroupIndex(index, sizes, tuple(blocks))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties get the average of their ranks: [.., k] -> [.., k]."""
    less = (x[..., None, :] < x[..., :, None]).sum(-1)
    equal = (x[..., None, :] == x[..., :, None]).sum(-1)
    return less + (equal + 1) / 2.0


@dataclass(frozen=True)
class GroupStats:
    """Per-group statistics, each [G] float64. NaN marks "undefined for this group" (all-equal rewards)."""

    size: np.ndarray  # k
    tokens: np.ndarray  # Σ response tokens
    log_ratio_sum: np.ndarray  # Σ ℓ
    loss: np.ndarray  # 1/(k−1) Σ c_i²
    implicit_var: np.ndarray  # 1/(k−1) Σ (βℓ − mean)²
    implicit_cov: np.ndarray  # 1/(k−1) Σ (βℓ − mean)(R − mean)
    reward_var: np.ndarray  # 1/(k−1) Σ (R − mean)²
    pairs: np.ndarray  # pairs with different rewards
    pairs_correct: np.ndarray  # of those, ordered the same way by ℓ (ties ½)
    spearman: np.ndarray  # NaN where R is constant
    top1: np.ndarray  # NaN where R is constant
    ranked: np.ndarray  # 1.0 where R is not constant, else 0.0


def group_statistics(log_ratio, rewards, group_ids, beta: float, n_tokens=None) -> GroupStats:
    """Per-group statistics from per-response arrays: ℓ [N], R [N], group labels [N], tokens [N].

    ``group_ids`` may also be a prebuilt :class:`GroupIndex`. ``n_tokens`` defaults to 1 per response.
    """
    if beta <= 0:
        raise ValueError("beta must be > 0")
    gi = group_ids if isinstance(group_ids, GroupIndex) else group_index(group_ids)
    ell = np.asarray(log_ratio, dtype=np.float64)
    rew = np.asarray(rewards, dtype=np.float64)
    tok = np.ones_like(ell) if n_tokens is None else np.asarray(n_tokens, dtype=np.float64)
    if not (ell.shape == rew.shape == tok.shape == gi.index.shape):
        raise ValueError("log_ratio, rewards, n_tokens and group_ids must have the same length")
    if not (np.isfinite(ell).all() and np.isfinite(rew).all()):
        raise ValueError("log-ratios and rewards must be finite")

    G = gi.n_groups
    out = {name: np.full(G, np.nan) for name in GroupStats.__dataclass_fields__}
    out["size"] = gi.sizes.astype(np.float64)
    out["tokens"] = np.bincount(gi.index, weights=tok, minlength=G)
    out["log_ratio_sum"] = np.bincount(gi.index, weights=ell, minlength=G)
    for groups, pos in gi.blocks:
        k = pos.shape[1]
        L, R = ell[pos], rew[pos]  # [n, k]
        imp = beta * L
        imp_c = imp - imp.mean(1, keepdims=True)
        rew_c = R - R.mean(1, keepdims=True)
        out["loss"][groups] = ((imp_c - rew_c) ** 2).sum(1) / (k - 1)
        out["implicit_var"][groups] = (imp_c**2).sum(1) / (k - 1)
        out["implicit_cov"][groups] = (imp_c * rew_c).sum(1) / (k - 1)
        out["reward_var"][groups] = (rew_c**2).sum(1) / (k - 1)

        d_rew = R[:, :, None] - R[:, None, :]  # [n, k, k]; each unordered pair once as d_rew > 0
        d_imp = L[:, :, None] - L[:, None, :]  # β > 0 leaves the order of β·ℓ that of ℓ
        better = d_rew > 0
        out["pairs"][groups] = better.sum((1, 2))
        out["pairs_correct"][groups] = (better & (d_imp > 0)).sum((1, 2)) + 0.5 * (better & (d_imp == 0)).sum((1, 2))

        ranked = R.max(1) > R.min(1)
        out["ranked"][groups] = ranked.astype(np.float64)

        rank_l, rank_r = average_ranks(L), average_ranks(R)
        rank_l -= rank_l.mean(1, keepdims=True)
        rank_r -= rank_r.mean(1, keepdims=True)
        num = (rank_l * rank_r).sum(1)
        den = np.sqrt((rank_l**2).sum(1) * (rank_r**2).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        out["spearman"][groups] = np.where(ranked, rho, np.nan)

        top_imp = L == L.max(1, keepdims=True)
        top_rew = R == R.max(1, keepdims=True)
        agree = (top_imp & top_rew).sum(1) / top_imp.sum(1)
        out["top1"][groups] = np.where(ranked, agree, np.nan)
    return GroupStats(**out)


def _ratio_parts(s: GroupStats) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (per-group numerator, per-group denominator); metric = Σ num / Σ den over groups."""
    ones = np.ones_like(s.size)
    ranked = s.ranked
    return {
        "gvpo_loss": (s.loss, ones),
        "pairwise_accuracy": (s.pairs_correct, s.pairs),
        "spearman": (np.nan_to_num(s.spearman) * ranked, ranked),
        "top1_agreement": (np.nan_to_num(s.top1) * ranked, ranked),
        "mean_log_ratio": (s.log_ratio_sum, s.size),
        "mean_log_ratio_per_token": (s.log_ratio_sum, s.tokens),
        "implicit_reward_variance": (s.implicit_var, ones),
        "implicit_reward_covariance": (s.implicit_cov, ones),
        "reward_variance": (s.reward_var, ones),
    }


def _weighted_metrics(s: GroupStats, weights: np.ndarray) -> dict[str, np.ndarray]:
    """weights [B, G] (group multiplicities) -> metric -> [B]; NaN where the denominator is 0."""
    out = {}
    for name, (num, den) in _ratio_parts(s).items():
        n, d = weights @ num, weights @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)
    return out


def aggregate_metrics(s: GroupStats) -> dict[str, float]:
    """Point estimates of every metric in :data:`METRICS` (NaN where undefined, e.g. no ranked group)."""
    return {k: float(v[0]) for k, v in _weighted_metrics(s, np.ones((1, s.size.shape[0]))).items()}


def count_stats(s: GroupStats) -> dict[str, int]:
    ranked = int(s.ranked.sum())
    return {
        "groups": int(s.size.shape[0]),
        "responses": int(s.size.sum()),
        "tokens": int(s.tokens.sum()),
        "ranked_groups": ranked,
        "skipped_groups": int(s.size.shape[0]) - ranked,
        "pairs": int(s.pairs.sum()),
    }


def bootstrap_weights(n_groups: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n_groups] multiplicities of each group in each resample (G draws with replacement)."""
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    flat = (draws + (np.arange(n_boot) * n_groups)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_groups).reshape(n_boot, n_groups).astype(np.float64)


def _percentile_interval(reps: np.ndarray, level: float) -> list[float] | None:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(reps, [100 * alpha, 100 * (1 - alpha)])
    return [float(lo), float(hi)]


def bootstrap_intervals(
    model: GroupStats,
    reference: GroupStats,
    n_boot: int,
    seed: int = 0,
    level: float = 0.95,
    chunk_cells: int = 1 << 22,
) -> dict[str, dict[str, list[float] | None]]:
    """Percentile bootstrap over groups: {"model": {metric: [lo, hi]}, "delta": {metric: [lo, hi]}}.

    Both sides are evaluated on the same resamples, so ``delta`` is the interval of model − reference.
    Vectorised: per-group numerators/denominators are precomputed and each chunk of replicates is one
    matrix product; ``chunk_cells`` bounds the [replicates, groups] weight matrix held at once.
    """
    G = int(model.size.shape[0])
    rng = np.random.default_rng(seed)
    per_chunk = max(1, chunk_cells // max(G, 1))
    model_reps: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    delta_reps: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    done = 0
    while done < n_boot:
        b = min(per_chunk, n_boot - done)
        w = bootstrap_weights(G, b, rng)
        mm, rr = _weighted_metrics(model, w), _weighted_metrics(reference, w)
        for m in METRICS:
            model_reps[m].append(mm[m])
            delta_reps[m].append(mm[m] - rr[m])
        done += b
    return {
        "model": {m: _percentile_interval(np.concatenate(model_reps[m]), level) for m in METRICS},
        "delta": {m: _percentile_interval(np.concatenate(delta_reps[m]), level) for m in METRICS},
    }


def mean_difference_interval(
    model_values, reference_values, n_boot: int, seed: int = 0, level: float = 0.95
) -> list[float] | None:
    """Percentile bootstrap interval of mean(model − reference) over paired units (e.g. prompts)."""
    diff = np.asarray(model_values, dtype=np.float64) - np.asarray(reference_values, dtype=np.float64)
    if n_boot <= 0 or diff.size == 0:
        return None
    rng = np.random.default_rng(seed)
    w = bootstrap_weights(diff.size, n_boot, rng)
    return _percentile_interval(w @ diff / diff.size, level)


# ---- how a metric is written (the eval table, the model card) ----------------------------------------


def format_value(x) -> str:
    """4 significant digits; "—" for a missing or non-finite value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.4g}"


def format_interval(iv) -> str:
    """[lo, hi] with :func:`format_value`; "—" when there is none."""
    return "—" if not iv else f"[{format_value(iv[0])}, {format_value(iv[1])}]"
