#!/usr/bin/env bash
# Multi-node torchrun with c10d rendezvous. Run the same command on every node:
#
#   HEAD=node0.cluster:29500 NNODES=2 NPROC=8 RUN_ID=exp42 launch/multinode.sh norm=syncbn
#
# HEAD is one node's address and a free port; RUN_ID names the job for the rendezvous and the
# output directory outputs/RUN_ID, so every rank of every node agrees on it. Put outputs/ on a
# filesystem every node shares: only global rank 0 writes, every rank resumes from it, and ranks
# that find different checkpoints (or none) stop before training. With one rank per node on one
# machine, set OMP_NUM_THREADS (each rank would take every core). JOIN_TIMEOUT_S (default 600, torch's)
# is how long a node waits for the others to join: a node whose peers never come (their launcher
# died before the rendezvous) ends after it, in one line.
set -euo pipefail
: "${HEAD:?set HEAD=host:port of the rendezvous node}" "${NNODES:?set NNODES}" "${RUN_ID:?set RUN_ID}"
export SYNCBN_RUN_DIR="${SYNCBN_RUN_DIR:-outputs/$RUN_ID}"
exec "$(dirname "$0")/torchrun.sh" --nnodes="$NNODES" --nproc-per-node="${NPROC:-1}" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD" --rdzv-id="$RUN_ID" \
  --rdzv-conf="join_timeout=${JOIN_TIMEOUT_S:-600}" -- "$@"
