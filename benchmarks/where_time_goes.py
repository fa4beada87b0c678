"""Profile: where gvpo-offline's CPU time goes on the TRL-comparison workload (precompute-ref + one epoch of train).

    python benchmarks/where_time_goes.py [--k 4] [--groups 8]

benchmarks/vs_trl.py's model and groups and its ``run_ours`` call (fresh process, one thread, clock started after
the imports), with CPU-time counters (time.process_time: user + system, this process) wrapped around the stages'
parts: tokenizer and model loading (their first calls import transformers' modules, inside the clock),
tokenization, scoring, cache writes; train's forward + backward (``gvpo_backward``), the LM head's forward and
backward inside it, AdamW, clipping, checks and the final save. Prints seconds per part (nested parts are
counted in their parents too) and the system time of each stage. GVPO_OFFLINE_LM_HEAD_KEEP_MIB and
GVPO_OFFLINE_MALLOC (benchmarks/per_token.py) apply as usual. Not a test.
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_prompt import spawn  # noqa: E402
from vs_trl import FULL, make_model, run_ours, write_groups  # noqa: E402


def profiled(model: str, data: str, workdir: str) -> dict:
    import resource

    import torch

    from gvpo_offline.model import lm_head, loading, scoring, sharded_scoring
    from gvpo_offline.stages.reference import compute
    from gvpo_offline.stages.train import recipe

    seconds: dict[str, float] = collections.defaultdict(float)

    def wrap(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[label] += time.process_time() - start

        static = isinstance(owner, type) and isinstance(inspect.getattr_static(owner, name), staticmethod)
        setattr(owner, name, staticmethod(timed) if static else timed)

    for owner, name, label in [
        (loading, "load_tokenizer", "precompute: load tokenizer (+ first imports)"),
        (sharded_scoring, "load_for_scoring", "precompute: load model (+ first imports)"),
        (compute, "_encode_all", "precompute: tokenize"),
        (scoring, "batched_logps", "precompute: score (forward)"),
        (compute, "atomic_write_table", "precompute: write shards"),
        (recipe, "load_model", "train: load model"),
        (recipe, "gvpo_backward", "train: forward + backward"),
        (lm_head.TargetLogprob, "forward", "  LM head forward (precompute + train)"),
        (lm_head.TargetLogprob, "backward", "  LM head backward"),
        (torch.optim.AdamW, "step", "train: AdamW step"),
        (recipe, "_clip", "train: clip"),
        (recipe, "check_finite_parameters", "train: finite check"),
        (recipe, "save_final", "train: save the model"),
    ]:
        wrap(owner, name, label)
    sys_before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    totals = run_ours(model, data, workdir, 1, 1)
    return {**totals, "parts": dict(seconds), "sys": resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--groups", type=int, default=FULL["groups"])
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", FULL["hidden"], FULL["layers"], FULL["intermediate"], FULL["vocab"])
        tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        write_groups(tmp / "data.jsonl", tokenizer, args.groups, args.k, FULL["prompt_tokens_min"],
                     FULL["prompt_tokens_max"], FULL["response_words"])
        out = spawn(profiled, str(tmp / "model"), str(tmp / "data.jsonl"), str(tmp / "work"))
    total = out["precompute"] + out["train"]
    print(f"k = {args.k}, {args.groups} groups: precompute {out['precompute']:.2f} + train {out['train']:.2f} = "
          f"{total:.2f} CPU s (system time of the whole run {out['sys']:.2f} s), peak RSS {out['peak_mb']:,.0f} MB")
    for label, value in out["parts"].items():
        print(f"  {label:48s} {value:6.2f} s  {100 * value / total:5.1f}%")


if __name__ == "__main__":
    main()
