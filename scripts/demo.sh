#!/usr/bin/env bash
# Main job: fit a sparse head intervention for antonyms on the embedded SmolLM2-135M from 20
# examples (the layer at 53% depth; head set and mode chosen by cross-validation on those 20) and
# compare it with zero-shot and 5-shot prompting.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
exec lens-laai fit --task "${TASK:-antonym}" --model smollm2-135m --layer auto --n-train 20 --seed 0 \
  --out "${OUT:-runs/antonym}" "$@"
