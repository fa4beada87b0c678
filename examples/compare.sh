#!/usr/bin/env bash
# Same data, other objectives: GVPO against DPO, IPO, REBEL and SFT on the best response, one table.
#
# One precompute-ref on the bundled sample data (as examples/quickstart.sh), then each objective trains
# from the same reference cache with the quickstart's settings (β 0.1, lr 2e-4, 8 groups per step, the
# same seed, hence the same group order) for the same number of steps, and is evaluated the same way:
# held-out groups (ranking accuracy, GVPO loss, drift) and sampling on the 60 held-out prompts with the
# kindness reward (same seeds for every model). Nothing is tuned per objective.
#
# Usage: examples/compare.sh                 (writes to gvpo-run/compare/, replaced on every run)
#        WORKDIR=/tmp/cmp STEPS=40 LOSSES="gvpo dpo" examples/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

gvpo-offline() { "${PYTHON:-python3}" -m gvpo_offline "$@"; }

DATA=sample_data
WORKDIR="${WORKDIR:-gvpo-run/compare}"
STEPS="${STEPS:-78}"  # the quickstart's 2 epochs of 8 groups
LOSSES="${LOSSES:-gvpo dpo ipo rebel sft-best}"
rm -rf "$WORKDIR"
mkdir -p "$WORKDIR"

echo "== precompute-ref: log pi_ref(y|x) of every response, once for all objectives"
gvpo-offline precompute-ref "$DATA/groups.jsonl" --model "$DATA/stories260K" --workdir "$WORKDIR/cache" \
    --eval-fraction 0.1

for loss in $LOSSES; do
    run="$WORKDIR/$loss"
    cp -r "$WORKDIR/cache" "$run"  # train writes checkpoints/, metrics.jsonl and model/ into its workdir
    echo "== $loss: train $STEPS steps, then eval"
    start=$(date +%s)
    gvpo-offline train --workdir "$run" --loss "$loss" --beta 0.1 --lr 2e-4 --max-steps "$STEPS" \
        --groups-per-step 8 --save-every 0
    gvpo-offline eval --workdir "$run" --json "$run/eval.json" \
        --prompts "$DATA/heldout_prompts.txt" --reward "$DATA/reward.py:kindness" \
        --samples-per-prompt 4 --max-new-tokens 128 >"$run/eval_table.txt"
    echo $(( $(date +%s) - start )) >"$run/seconds"
done

"${PYTHON:-python3}" - "$WORKDIR" $LOSSES <<'PY'
import json, sys
from pathlib import Path

root, losses = Path(sys.argv[1]), sys.argv[2:]
reports = {loss: json.loads((root / loss / "eval.json").read_text()) for loss in losses}
ci = lambda pair: "" if pair is None else f"[{pair[0]:.3f}, {pair[1]:.3f}]"
header = ("objective", "pairwise acc", "95% CI", "GVPO loss", "95% CI", "gen. reward", "Δ vs ref 95% CI",
          "ℓ/token", "95% CI", "s")
rows = []
for loss, r in reports.items():
    m, iv, g = r["model"], r["intervals"]["model"], r["generation"]
    assert r["meta"]["objective"] == loss, (loss, r["meta"]["objective"])
    rows.append((loss, f"{m['pairwise_accuracy']:.3f}", ci(iv["pairwise_accuracy"]), f"{m['gvpo_loss']:.3f}",
                 ci(iv["gvpo_loss"]), f"{g['model_mean_reward']:.2f}", ci(g["difference_interval"]),
                 f"{m['mean_log_ratio_per_token']:+.3f}", ci(iv["mean_log_ratio_per_token"]),
                 (root / loss / "seconds").read_text().strip()))
any_report = next(iter(reports.values()))
ref, g = any_report["reference"], any_report["generation"]
rows.append(("reference", f"{ref['pairwise_accuracy']:.3f}", "", f"{ref['gvpo_loss']:.3f}", "",
             f"{g['reference_mean_reward']:.2f}", "", f"{0.0:+.3f}", "", ""))
widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
line = lambda row: "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"  # noqa: E731
print(line(header))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for row in rows:
    print(line(row))
c = any_report["counts"]
print(f"\n{c['groups']} held-out groups ({c['pairs']} ranked pairs); generation: {g['prompts']} held-out prompts × "
      f"{g['samples_per_prompt']} samples, same seeds for every model. GVPO loss at β = {any_report['meta']['beta']:g}. "
      "Intervals: 95% bootstrap over groups (generation: over prompts, of the difference to the reference). "
      "s = wall seconds of train + eval.")
PY
