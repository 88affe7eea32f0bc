#!/usr/bin/env bash
# The whole experiment of docs/experiments.md: shared heads, then one comparison per task family.
# Each `caft compare` resumes where it stopped, so rerunning this script continues an interrupted run.
set -euo pipefail
export HF_HUB_OFFLINE=1
if [ ! -f experiments/heads-stories260k/run/heads/heads_config.json ]; then
  bash experiments/heads.sh
fi
for task in chebi20 cfp-gen dialogsum; do
  caft --log-level warning compare --config "experiments/$task.yaml"
done
