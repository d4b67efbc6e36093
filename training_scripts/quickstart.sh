#!/usr/bin/env bash
# Quickstart: set up .venv (once), train a small Long-CLIP on generated long-caption scenes (about a minute or two on
# a laptop CPU), print held-out retrieval before and after, then load the saved model with AutoModel and use it.
# Extra arguments go to the trainer (hf_longclip.train; `--help` lists them), e.g.
# `bash training_scripts/quickstart.sh --variant finelip`. A variant with its own quickstart recipe
# (training_scripts/configs/quickstart-<variant>.yaml: FineLIP, Fix-CLIP, beta-CLIP; docs/finegrained.md) trains
# with that recipe instead of quickstart.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export HF_HUB_OFFLINE=1
recipe=quickstart
previous=""
for word in "$@"; do
    case "$word" in --variant=*) variant="${word#--variant=}" ;; esac
    if [ "$previous" = "--variant" ]; then variant="$word"; fi
    previous="$word"
done
if [ -n "${variant:-}" ] && [ -f "training_scripts/configs/quickstart-${variant}.yaml" ]; then
    recipe="quickstart-${variant}"
fi
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m hf_longclip.train --config "$recipe" "$@"
.venv/bin/python examples/quickstart_inference.py
