"""Scoring many (prompt, response) pairs without grad: batched by length, or packed (each prompt once).

Used by precompute-ref and eval; :func:`batched_logps` returns float64 sums in input order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from gvpo_offline.model import packing
from gvpo_offline.model.logprobs import length_batches, sequence_logps


def batched_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    batch_tokens: int,
    chunk_tokens: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    packed: bool = False,
    passes: Callable[[int], int] | None = None,
) -> np.ndarray:
    """:func:`sequence_logps` of many pairs without grad: [N] float64 (summed in fp32), in input order.

    ``packed=False``: pairs are batched by length (:func:`length_batches`, rows × longest ≤
    ``batch_tokens``). ``packed=True``: each prompt is computed once for its responses and sequences are
    packed without padding (:mod:`gvpo_offline.model.packing`: rows of ≤ min(batch_tokens, MAX_ROW_TOKENS)
    tokens, batched rows × longest ≤ ``batch_tokens``); same values to float rounding. Runs in the
    weights' dtype. ``on_batch(n_pairs, n_tokens)`` after each batch (progress;
    n_tokens = prompt + response tokens of those pairs, as if scored separately).
    ``passes(n) -> m``: a model sharded over processes (sharded_scoring.py) runs m ≥ n forwards in lock-step
    with the other ranks: after this rank's n batches, m − n padding passes on a one-token pair (dropped).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    out = np.zeros(len(lengths), dtype=np.float64)
    if packed:
        rows = packing.plan_rows(prompt_ids, response_ids, min(batch_tokens, packing.MAX_ROW_TOKENS))
        plan = [[rows[j] for j in b] for b in length_batches([packing.row_tokens(r) for r in rows], batch_tokens)]
    else:
        plan = length_batches(lengths, batch_tokens)
    # sharded (sharded_scoring.py): a forward method of the FSDP root, so that its parameters are gathered too
    rows_logps = getattr(model, "gvpo_rows_logps", None) or functools.partial(packing.rows_logps, model)
    n_passes = passes(len(plan)) if passes is not None else len(plan)  # agreed before the first forward
    with torch.no_grad():
        for batch in plan:
            if packed:
                batch_rows, batch = batch, [i for row in batch for seg in row for i in seg.pairs]
                logps = rows_logps(prompt_ids, response_ids, batch_rows, chunk_tokens)[batch]
            else:
                logps = sequence_logps(
                    model, [prompt_ids[i] for i in batch], [response_ids[i] for i in batch], chunk_tokens
                )
            out[batch] = logps.double().cpu().numpy()
            if on_batch is not None:
                on_batch(len(batch), sum(lengths[i] for i in batch))
        for _ in range(n_passes - len(plan)):
            sequence_logps(model, [[0]], [[0]], chunk_tokens)  # a padding pass: every rank joins each forward
    return out
