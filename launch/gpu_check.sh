#!/usr/bin/env bash
# The CUDA path on this machine's GPUs, in one command (under 10 minutes), ending in a report to send
# back: gpu_check_report.md. Run it from a clone with the test extra installed:
#
#   pip install -e '.[test]' && launch/gpu_check.sh
#
# It runs the tests marked cuda (the layer against torch.nn.SyncBatchNorm on NCCL, ranks sharing one
# GPU over Gloo, DDP training on CUDA against CPU in float64) and the benchmark's quick cases on CUDA,
# both collectives on NCCL among them.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m syncbn.bench.gpu_check "$@"
