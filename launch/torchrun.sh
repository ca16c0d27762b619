#!/usr/bin/env bash
# torchrun for syncbn.train, with one Hydra output directory shared by every rank.
#
#   launch/torchrun.sh --standalone --nproc-per-node=4 -- norm=syncbn train.epochs=5
#   SYNCBN_RUN_DIR=outputs/exp1 launch/torchrun.sh --standalone --nproc-per-node=2
#
# Flags before "--" go to torchrun, the rest are Hydra overrides. torchrun starts every rank with
# the same command and each rank runs the Hydra app: left alone, each would stamp its own
# outputs/DATE/TIME directory. The directory is chosen here, once, and handed to all ranks
# (only rank 0 writes into it).
set -euo pipefail
torchrun_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
  torchrun_args+=("$1")
  shift
done
[[ $# -gt 0 ]] && shift
run_dir="${SYNCBN_RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S-%6N)}"
exec torchrun "${torchrun_args[@]}" -m syncbn.train "hydra.run.dir=$run_dir" "hydra.sweep.dir=$run_dir" "$@"
