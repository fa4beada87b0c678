"""|ℓ| at step 0: the policy's log-ratio against the cached reference before any update, per weights dtype.

    python benchmarks/step0_log_ratio.py [--device cpu]

precompute-ref on sample_data/stories260K (the four STORY_GROUPS prompts of tests/cachefixture.py, 14
responses) with ``--dtype float32`` and ``--dtype bfloat16``, then one train step per case: full
fine-tuning and LoRA (r 4), each on the cache of its weights dtype. Prints the first step's max |ℓ| and
mean |ℓ| per token (metrics.jsonl ``log_ratio_absmax``, ``log_ratio_per_token``): what a user should see
in the first line of metrics.jsonl. Not a test; ~1 minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from cachefixture import STORIES, STORY_GROUPS

    from gvpo_offline.data import DataConfig
    from gvpo_offline.data.tokenize import TokenizeConfig
    from gvpo_offline.model.adapters import LoraSettings
    from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute
    from gvpo_offline.stages.train.config import TrainConfig
    from gvpo_offline.stages.train.recipe import train

    print(f"{'weights dtype':<15}{'training':<12}{'max |ℓ| step 0':>16}{'|ℓ|/token':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n"
                                for p, r, w in STORY_GROUPS))
        for dtype in ("float32", "bfloat16"):
            for mode, lora in (("full", None), ("LoRA r 4", LoraSettings(r=4))):
                run = Path(tmp) / f"{dtype}-{mode.split()[0]}"
                precompute(PrecomputeConfig(data=DataConfig((str(data),)), model=str(STORIES), workdir=run,
                                            tokenize=TokenizeConfig(max_length=96, max_prompt_length=32),
                                            eval_fraction=0.0, device=args.device, dtype=dtype, progress=False))
                train(TrainConfig(workdir=run, beta=1.0, lr=1e-3, groups_per_step=4, max_steps=1, save_every=0,
                                  progress=False, device=args.device, lora=lora), log=lambda _: None)
                first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
                print(f"{dtype:<15}{mode:<12}{first['log_ratio_absmax']:>16.3g}{first['log_ratio_per_token']:>12.3g}")


if __name__ == "__main__":
    main()
