#!/usr/bin/env bash
# The whole offline GVPO pipeline on the bundled sample data, in about a minute of CPU time:
#   precompute-ref -> train -> eval (held-out ranking + generation with the same reward).
#
# Data: sample_data/groups.jsonl = 340 story openings, each with 2..6 continuations sampled from the
# stories260K model and scored by sample_data/reward.py:kindness (kind/happy words minus sad/unkind
# ones). Training teaches the model to tell kinder stories; eval compares it with the reference on
# held-out groups (10% of the data) and on 60 held-out openings it never saw.
#
# Sized for speed: 1 epoch (39 steps), 2 samples of 64 new tokens per held-out opening; the result is
# still well outside the intervals (README, Quick start). One torch thread per process: this 260K-
# parameter model is too small for intra-op threads to pay, and on a busy 2-core machine two threads
# per process cost ~2-5x the CPU time (measured); set OMP_NUM_THREADS to override.
#
# Usage: examples/quickstart.sh            (writes to gvpo-run/quickstart/, replaced on every run)
#        WORKDIR=/tmp/qs examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# `python -m gvpo_offline` is the `gvpo-offline` command, found even where pip's script folder is not on PATH.
gvpo-offline() { "${PYTHON:-python3}" -m gvpo_offline "$@"; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

DATA=sample_data
WORKDIR="${WORKDIR:-gvpo-run/quickstart}"
rm -rf "$WORKDIR"

# (Optional, ~1 minute; groups.jsonl is bundled.) How the training data was made:
# gvpo-offline sample $DATA/prompts.txt --model $DATA/stories260K --k-range 2:6 \
#     --reward $DATA/reward.py:kindness --max-new-tokens 128 --seed 0 -o $DATA/groups.jsonl

echo "== 1/3 precompute-ref: log pi_ref(y|x) of every response, once"
gvpo-offline precompute-ref "$DATA/groups.jsonl" --model "$DATA/stories260K" --workdir "$WORKDIR" \
    --eval-fraction 0.1

echo "== 2/3 train: GVPO, beta 0.1, 1 epoch (39 steps of 8 groups)"
gvpo-offline train --workdir "$WORKDIR" --beta 0.1 --lr 2e-4 --epochs 1 --groups-per-step 8 --save-every 0

echo "== 3/3 eval: held-out groups + sampling on held-out prompts with the same reward"
gvpo-offline eval --workdir "$WORKDIR" --json "$WORKDIR/eval.json" \
    --prompts "$DATA/heldout_prompts.txt" --reward "$DATA/reward.py:kindness" \
    --samples-per-prompt 2 --max-new-tokens 64 >"$WORKDIR/eval_table.txt"
echo "(full eval table: $WORKDIR/eval_table.txt)"

"${PYTHON:-python3}" - "$WORKDIR/eval.json" <<'PY'
import json, sys

r = json.load(open(sys.argv[1]))
m, ref, iv, ivd, g = r["model"], r["reference"], r["intervals"]["model"], r["intervals"]["delta"], r["generation"]
ci = lambda pair: f"[{pair[0]:.3f}, {pair[1]:.3f}]"
rows = [
    ("held-out ranking accuracy", m["pairwise_accuracy"], ref["pairwise_accuracy"], ci(iv["pairwise_accuracy"]), "model 95% CI"),
    ("mean generated reward", g["model_mean_reward"], g["reference_mean_reward"], ci(g["difference_interval"]), "Δ 95% CI"),
    ("mean ℓ per token (drift)", m["mean_log_ratio_per_token"], 0.0, ci(iv["mean_log_ratio_per_token"]), "model 95% CI"),
]
print(f"\n{'':28}{'trained':>9}{'reference':>11}   interval")
for name, a, b, interval, kind in rows:
    print(f"{name:28}{a:9.3f}{b:11.3f}   {interval} ({kind})")
c = r["counts"]
print(f"\n{c['groups']} held-out groups ({c['pairs']} ranked pairs); generation: {g['prompts']} held-out prompts × "
      f"{g['samples_per_prompt']} samples, same seeds for both models. ℓ = log πθ/πref of a response.")
PY

# Figures (needs matplotlib: pip install 'gvpo-offline[plot]'): loss and its eq. 17 terms, drift, eval.
if "${PYTHON:-python3}" -c "import matplotlib" 2>/dev/null; then
    gvpo-offline plot "$WORKDIR"
else
    echo "(skipping the figures: pip install 'gvpo-offline[plot]' for matplotlib)"
fi
