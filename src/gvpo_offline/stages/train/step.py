"""One optimizer step of `train`: which groups it takes and the exact gradient of its loss.

- **Data**: the cached train split as whole groups (:class:`CachedGroups`), the epoch's seeded group order
  (:func:`epoch_order`) and a step's responses (:class:`StepBatch`).
- **Gradient**: :func:`gvpo_backward` accumulates ∇θ of the step's loss (GVPO's eq. 16 averaged over the
  step's G groups, or another ``--loss`` objective) into ``param.grad``: whole groups packed into
  micro-batches of ``micro_batch_tokens`` (:func:`pack_groups`), a group too large for one cut across
  micro-batches with the closed-form weights :func:`loss.gvpo_grad_weights`; under torchrun each rank
  computes its share of the step (distributed.StepShare).

recipe.py runs the recipe around it (clip, AdamW step, metrics, checkpoints).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from torch import Tensor

from gvpo_offline.math.loss import (
    OBJECTIVES,
    Objective,
    _group_mean,
    _groups,
    gvpo_grad_weights,
    gvpo_loss,
    gvpo_loss_terms,
)
from gvpo_offline.model import packing
from gvpo_offline.model.distributed import StepShare
from gvpo_offline.model.logprobs import length_batches, sequence_logps
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages import reference

# ---- data: whole groups from the cached train split -----------------------------------------------


@dataclass(frozen=True)
class CachedGroups:
    """The cached train split. Group g is rows ``offsets[g]:offsets[g+1]`` of ``table``."""

    table: pa.Table  # REF_SCHEMA rows sorted by (group_id, response_index)
    offsets: list[int]  # [G+1]

    @property
    def n_groups(self) -> int:
        return len(self.offsets) - 1


def load_train_groups(workdir: Path) -> CachedGroups:
    table = reference.load_split(workdir, "train")
    ids = table.column("group_id").to_pylist()
    offsets = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    if not ids:
        raise GvpoError(f"{workdir}: the cached train split is empty")
    for g in range(len(offsets) - 1):
        if offsets[g + 1] - offsets[g] < 2:
            raise GvpoError(f"{workdir}: group {ids[offsets[g]]!r} has a single response; GVPO needs k >= 2")
    reference.check_reward_range(table, workdir)
    return CachedGroups(table, offsets)


@functools.lru_cache(maxsize=1)
def epoch_order(n_groups: int, seed: int, epoch: int) -> list[int]:
    """The groups' order in one epoch: a permutation seeded by (seed, epoch), the same on every run."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_groups, generator=generator).tolist()


@dataclass
class StepBatch:
    """The N responses of a step's G groups."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: Tensor  # [N] float64
    ref_logps: Tensor  # [N] float64, Σ over response tokens of log πref
    group_index: Tensor  # [N] long in 0..G-1
    n_groups: int

    @property
    def tokens(self) -> int:
        """Σ over the responses of prompt + response token ids: the step as separate sequences (a packed
        pass computes each prompt once, so it runs fewer). metrics.jsonl's ``tokens``."""
        return sum(len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids))

    @property
    def group_tokens(self) -> list[int]:
        """[G] prompt + response token ids of each group."""
        out = [0] * self.n_groups
        for p, r, g in zip(self.prompt_ids, self.response_ids, self.group_index.tolist()):
            out[g] += len(p) + len(r)
        return out


def make_batch(groups: CachedGroups, chosen: list[int]) -> StepBatch:
    rows, group_index = [], []
    for j, g in enumerate(chosen):
        span = range(groups.offsets[g], groups.offsets[g + 1])
        rows += span
        group_index += [j] * len(span)
    sub = groups.table.take(pa.array(rows, type=pa.int64()))
    return StepBatch(
        prompt_ids=sub.column("prompt_ids").to_pylist(),
        response_ids=sub.column("response_ids").to_pylist(),
        rewards=torch.tensor(sub.column("reward").to_pylist(), dtype=torch.float64),
        ref_logps=torch.tensor(sub.column("ref_logp").to_pylist(), dtype=torch.float64),
        group_index=torch.tensor(group_index, dtype=torch.long),
        n_groups=len(chosen),
    )


# ---- the GVPO gradient of one step -----------------------------------------------------------------


@dataclass
class StepStats:
    loss: float  # the objective's loss of the step (GVPO: eq. 16), before the update
    implicit_reward: float  # mean β·ℓ over the step's responses
    log_ratio: float  # mean ℓ = log πθ − log πref
    log_ratio_absmax: float  # max |ℓ|
    tokens: int
    micro_batches: int
    log_ratio_per_token: float = 0.0  # Σℓ / Σ response tokens (drift)
    terms: dict[str, float] = field(default_factory=dict)  # loss.gvpo_loss_terms: the loss's three parts


def pack_groups(
    lengths: list[int], group_rows: list[list[int]], budget: int, cost: Callable[[list[int]], int] | None = None
) -> tuple[list[list[int]], list[int]]:
    """Plan a step's forward passes: (packs, split). A pack is a list of whole groups whose responses fit
    together in one micro-batch (``cost(rows)`` ≤ ``budget``; default: padded, rows × longest), longest
    groups first; ``split`` are the groups that do not fit on their own and must be cut across
    micro-batches."""

    def padded(rows: list[int]) -> int:
        return cost(rows) if cost is not None else len(rows) * max(lengths[i] for i in rows)

    fitting = [g for g, rows in enumerate(group_rows) if padded(rows) <= budget]
    split = [g for g, rows in enumerate(group_rows) if padded(rows) > budget]
    packs: list[list[int]] = []
    for g in sorted(fitting, key=lambda g: -max(lengths[i] for i in group_rows[g])):
        if packs and padded([i for h in packs[-1] + [g] for i in group_rows[h]]) <= budget:
            packs[-1].append(g)
        else:
            packs.append([g])
    return packs, split


def gvpo_backward(
    model,
    batch: StepBatch,
    beta: float,
    micro_batch_tokens: int,
    chunk_tokens: int | None = None,
    objective: Objective = OBJECTIVES["gvpo"],
    packed: bool = False,
    share: StepShare | None = None,
) -> StepStats:
    """Accumulate ∇θ of the step's loss (gvpo_loss, or ``objective``'s) into ``param.grad``, over all its G groups.

    Groups that fit in ``micro_batch_tokens`` are packed whole into micro-batches and go in one pass each:
    ``gvpo_loss(pack) · |pack|/G`` is exactly their share of the step's loss. A group too large for one
    micro-batch gets the exact same gradient in two phases: (a) its current policy log-probs without
    grad, hence the weights w_i = ∂L/∂log πθ(y_i|x) = 2β·c_i/((k−1)·G); (b) backward of
    Σ w_i·log πθ(y_i|x) micro-batch by micro-batch. Raises GvpoError when a loss is not finite (before
    its backward). ``chunk_tokens``: response positions per LM-head chunk (None: logprobs.logits_chunk_for).

    Another ``objective`` (loss.OBJECTIVES; its loss is Σ_x term_x / C over the C groups that carry a
    term) goes the same way: a pack backs ``Σ_{x∈pack} term_x / C``; a split group gets its weights
    w = ∂(term_x / C)/∂log πθ by autograd on a leaf tensor of its no-grad log-probs, then Σ w·log πθ.

    ``packed``: log-probs by :func:`packing.packed_logps` (each prompt once, no padding; budgets count packed
    tokens) instead of padded :func:`sequence_logps`; the same gradient to float rounding.

    ``share`` (several processes, see distributed.step_share): this rank computes only ``share.groups``
    of the step (G and C stay the whole step's, so the gradients summed over ranks are the step's gradient),
    joins the other ranks' passes with zero-weight padding passes, and the step's log-probs are summed
    over ranks so that every rank returns the statistics of the whole step. A non-finite loss in its share
    does not stop it mid-step (the other ranks would wait in the next pass's collectives): the rank
    finishes the step's passes with zero weights and raises the first NonFiniteError after them; the
    caller then stops every rank together (distributed.agree).
    """
    device = getattr(model, "gvpo_compute_device", None) or next(model.parameters()).device
    ref, rewards, gid = (t.to(device) for t in (batch.ref_logps, batch.rewards, batch.group_index))
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    group_rows: list[list[int]] = [[] for _ in range(batch.n_groups)]
    for i, g in enumerate(batch.group_index.tolist()):
        group_rows[g].append(i)
    mine = [group_rows[g] for g in (share.groups if share else range(batch.n_groups))]
    row_cap = min(micro_batch_tokens, packing.MAX_ROW_TOKENS)
    cost = None
    if packed:
        def cost(rows: list[int]) -> int:
            sub = [batch.prompt_ids[i] for i in rows], [batch.response_ids[i] for i in rows]
            return packing.padded_tokens(packing.plan_rows(*sub, row_cap))
    packs, split = pack_groups(lengths, mine, micro_batch_tokens, cost)

    def cut(rows: list[int]) -> list[list[int]]:  # the micro-batches of a group too large for one
        if packed:
            return packing.split_pairs(batch.prompt_ids, batch.response_ids, rows, row_cap)
        return [[rows[j] for j in mb] for mb in length_batches([lengths[i] for i in rows], micro_batch_tokens)]

    micro = {g: cut(mine[g]) for g in split}
    no_grad_passes = with_grad_passes = sum(len(m) for m in micro.values())
    with_grad_passes += len(packs)
    if share is not None:
        no_grad_passes, with_grad_passes = share.passes_to_join(no_grad_passes, with_grad_passes)

    def logps(rows: list[int]) -> Tensor:
        prompts, responses = [batch.prompt_ids[i] for i in rows], [batch.response_ids[i] for i in rows]
        if packed:  # sharded: through FSDP's hooks (distributed.shard_model)
            packed_logps = getattr(model, "gvpo_packed_logps", None) or functools.partial(packing.packed_logps, model)
            return packed_logps(prompts, responses, chunk_tokens, row_cap)
        return sequence_logps(model, prompts, responses, chunk_tokens)

    def padding() -> Tensor:  # a one-token pair: log-probs of a pass that only joins the others' collectives
        return sequence_logps(model, [[0]], [[0]], chunk_tokens)

    n_tokens = torch.tensor([len(r) for r in batch.response_ids], dtype=torch.float64, device=device)
    is_gvpo = objective.name == "gvpo"
    counted = 1 if is_gvpo else max(1, objective.counted_groups(rewards, gid))

    def group_terms_sum(pack_logps: Tensor, rows: list[int]) -> Tensor:  # another objective's Σ term_x / C
        args = (ref[rows], rewards[rows], gid[rows], beta, n_tokens[rows])
        return objective.group_terms(pack_logps, *args)[0].sum() / counted

    failure: NonFiniteError | None = None

    def finite(check, *args) -> bool:  # one process: raise at once, before any backward; several: see above
        nonlocal failure
        try:
            check(*args)
        except NonFiniteError as err:
            if share is None:
                raise
            failure = failure or err
            return False
        return True

    policy = torch.zeros(len(lengths), dtype=torch.float32, device=device)
    passes = 0
    with torch.no_grad():  # (a) of the split groups: their policy log-probs, hence their weights
        for g in split:
            for mb in micro[g]:
                policy[mb] = logps(mb)
        for _ in range(no_grad_passes - sum(len(m) for m in micro.values())):
            padding()
    for pack in packs:  # whole groups: one pass
        rows = [i for g in pack for i in mine[g]]
        pack_logps = logps(rows)
        ok = finite(_check_implicit_reward, pack_logps, ref[rows], gid[rows], beta)
        if is_gvpo:
            part = gvpo_loss(pack_logps, ref[rows], rewards[rows], gid[rows], beta) * (len(pack) / batch.n_groups)
        else:
            part = group_terms_sum(pack_logps, rows)
        ok = ok and finite(_check_finite_loss, part)
        (part if ok else pack_logps.sum() * 0.0).backward()
        policy[rows] = pack_logps.detach()
        passes += 1
    for g in split:  # (b) a group cut across micro-batches: Σ w·log π piece by piece
        rows = mine[g]
        weights = torch.zeros(len(lengths), dtype=torch.float64, device=device)
        ok = finite(_check_implicit_reward, policy[rows], ref[rows], gid[rows], beta)
        if is_gvpo:
            ok = ok and finite(_check_finite_loss, gvpo_loss(policy[rows], ref[rows], rewards[rows], gid[rows], beta))
            weights[rows] = gvpo_grad_weights(policy[rows], ref[rows], rewards[rows], gid[rows], beta, batch.n_groups)
        else:
            leaf = policy[rows].double().requires_grad_()
            part = group_terms_sum(leaf, rows)
            ok = ok and finite(_check_finite_loss, part)
            (weights[rows],) = torch.autograd.grad(part, leaf, materialize_grads=True)
        if not ok:
            weights[rows] = 0.0
        for mb in micro[g]:
            (logps(mb).double() * weights[mb]).sum().backward()
            passes += 1
    for _ in range(with_grad_passes - passes):  # zero weight, summed (a mean would be 0·NaN-prone)
        (padding() * 0.0).sum().backward()
    if share is not None:
        policy = share.sum(policy)  # each row is computed by exactly one rank; the others hold 0
        passes = int(share.sum(torch.tensor([passes])).item())  # the step's passes on all ranks, no padding
    if failure is not None:
        raise failure
    terms = gvpo_loss_terms(policy, ref, rewards, gid, beta)
    if is_gvpo:
        loss = gvpo_loss(policy, ref, rewards, gid, beta)  # the step's loss, for the record (= Σ parts)
    else:  # the objective's loss; GVPO's (and its eq. 17 terms) still logged, to compare runs
        loss = objective.loss(policy, ref, rewards, gid, beta, n_tokens)
        terms["gvpo_loss"] = gvpo_loss(policy, ref, rewards, gid, beta).item()
    ratio = policy.double() - ref
    return StepStats(
        loss=loss.item(),
        implicit_reward=beta * ratio.mean().item(),
        log_ratio=ratio.mean().item(),
        log_ratio_absmax=ratio.abs().max().item(),
        tokens=batch.tokens,
        micro_batches=passes,
        log_ratio_per_token=ratio.sum().item() / max(1, sum(len(r) for r in batch.response_ids)),
        terms=terms,
    )


class NonFiniteError(GvpoError):
    """A step that must not update the model; ``hint`` says what to change."""

    def __init__(self, message: str, hint: str = "Check the cached rewards/ref_logp or lower --lr"):
        super().__init__(message)
        self.hint = hint


def _check_finite_loss(loss: Tensor) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss is not finite ({loss.item()})")


def _check_implicit_reward(policy_logps: Tensor, ref_logps: Tensor, group_index: Tensor, beta: float) -> None:
    """Raise NonFiniteError (before any backward) when ℓ = log πθ − log πref is not finite, or the implicit
    reward β·ℓ overflows float64 in the loss: β·ℓ itself, or its squared deviations from the group mean
    (the loss's (β·ℓ_i − mean β·ℓ)², as check_reward_range does for the rewards). Reads detached copies:
    the loss and its gradient are untouched. Shapes: [n] policy (float32) and reference (float64)
    sequence log-probs, [n] group numbers."""
    ell = policy_logps.detach().double() - ref_logps
    implicit = beta * ell
    index, counts = _groups(group_index)
    deviation = implicit - _group_mean(implicit, index, counts)
    spread = torch.zeros(counts.shape[0], dtype=implicit.dtype, device=implicit.device).index_add(0, index, deviation ** 2)
    if bool(torch.isfinite(spread).all()):
        return
    if not bool(torch.isfinite(ref_logps).all()):
        raise NonFiniteError("the cached reference log-probs (ref_logp) are not finite",
                             "Check the reference model and rerun precompute-ref into a new --workdir")
    if not bool(torch.isfinite(ell).all()):
        bad = int((~torch.isfinite(ell)).sum())
        raise NonFiniteError(f"the policy's log-probs are not finite ({bad} of {len(ell)} responses: ℓ = "
                             f"{ell[~torch.isfinite(ell)][0].item()})", "Lower --lr")
    raise NonFiniteError(
        f"the implicit reward β·ℓ overflows float64 in the loss (β = {beta:g}, max |ℓ| = "
        f"{ell.abs().max().item():.3g} nats: max |β·ℓ| = {implicit.abs().max().item():.3g}, whose squared "
        "differences within a group exceed float64)", "Lower --beta")
