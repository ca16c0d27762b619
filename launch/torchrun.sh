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
# Checked once here, as rank 0 of the world torchrun will start sees it: bad input is one line and
# starts nothing, not a line per rank and torchrun's failure report. One node only: the nodes of a
# multi-node job would each check, and make and remove, the directory they share at once. Nor is
# --nproc-per-node=gpu or auto checked, whose count torchrun decides.
nproc=1 nnodes=1
for ((i = 0; i < ${#torchrun_args[@]}; i++)); do
  case "${torchrun_args[i]}" in
    --nproc-per-node=* | --nproc_per_node=*) nproc="${torchrun_args[i]#*=}" ;;
    --nproc-per-node | --nproc_per_node) nproc="${torchrun_args[i + 1]:-}" ;;
    --nnodes=*) nnodes="${torchrun_args[i]#*=}" ;;
    --nnodes) nnodes="${torchrun_args[i + 1]:-}" ;;
  esac
done
if [[ "$nproc" =~ ^[0-9]+$ && "$nnodes" == 1 ]]; then
  RANK=0 WORLD_SIZE="$nproc" LOCAL_WORLD_SIZE="$nproc" MASTER_ADDR=localhost MASTER_PORT=0 \
    python -m syncbn.train --check "hydra.run.dir=$run_dir" "hydra.sweep.dir=$run_dir" "$@"
fi
exec torchrun "${torchrun_args[@]}" -m syncbn.train "hydra.run.dir=$run_dir" "hydra.sweep.dir=$run_dir" "$@"
