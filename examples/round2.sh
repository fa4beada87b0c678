#!/usr/bin/env bash
# Round 2 of offline GVPO on the bundled data: the trained model becomes the new reference.
#
#   round 1: precompute-ref (reference = stories260K) -> train                       -> round1/model
#   round 2: sample from round1/model -> precompute-ref with round1/model as the
#            reference, into a NEW workdir -> train -> eval (vs round1/model)      -> round2/model
#
# GVPO pulls the policy toward π* ∝ πref·exp(R/β) around the reference of the cache it trains on, so a
# second round needs fresh responses sampled from the improved model and a new cache whose reference is
# that model (a workdir's cache belongs to one reference: train refuses a mismatched one).
# Sized to run in about a minute on 2 CPU cores: a short round 1, 40 prompts × 4 samples for round 2.
#
# Usage: examples/round2.sh            (writes to gvpo-run/round2/, replaced on every run)
#        WORKDIR=/tmp/r2 examples/round2.sh
set -euo pipefail
cd "$(dirname "$0")/.."

gvpo-offline() { "${PYTHON:-python3}" -m gvpo_offline "$@"; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

DATA=sample_data
REWARD="$DATA/reward.py:kindness"
OUT="${WORKDIR:-gvpo-run/round2}"
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== round 1: precompute-ref + train (reference: stories260K)"
gvpo-offline precompute-ref "$DATA/groups.jsonl" --model "$DATA/stories260K" --workdir "$OUT/round1" \
    --eval-fraction 0.1
gvpo-offline train --workdir "$OUT/round1" --beta 0.1 --lr 2e-4 --max-steps 20 --groups-per-step 8 \
    --save-every 0

echo "== round 2, 1/4 sample: 4 responses per prompt from the round-1 model, scored by the same reward"
head -n 40 "$DATA/prompts.txt" >"$OUT/prompts.txt"
gvpo-offline sample "$OUT/prompts.txt" --model "$OUT/round1/model" --k 4 --reward "$REWARD" \
    --max-new-tokens 64 --seed 1 -o "$OUT/round2_groups.jsonl"

echo "== round 2, 2/4 precompute-ref: the round-1 model is the new reference, in a new workdir"
gvpo-offline precompute-ref "$OUT/round2_groups.jsonl" --model "$OUT/round1/model" --workdir "$OUT/round2" \
    --eval-fraction 0.2

echo "== round 2, 3/4 train (starts from the new reference)"
gvpo-offline train --workdir "$OUT/round2" --beta 0.1 --lr 2e-4 --max-steps 8 --groups-per-step 4 \
    --save-every 0

echo "== round 2, 4/4 eval: held-out groups + sampling on the held-out prompts (reference = round-1 model)"
gvpo-offline eval --workdir "$OUT/round2" --json "$OUT/round2/eval.json" --prompts eval --reward "$REWARD" \
    --samples-per-prompt 2 --max-new-tokens 64 --samples-out "$OUT/round2/samples.jsonl" \
    >"$OUT/round2/eval_table.txt"
cat "$OUT/round2/eval_table.txt"
echo "(every generated text with its reward: $OUT/round2/samples.jsonl)"
