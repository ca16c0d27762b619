#!/usr/bin/env bash
# The single-machine CPU simulation: NPROC Gloo ranks (default 4) started by PyTorch's elastic
# launcher from inside the app, no torchrun needed. Extra arguments are Hydra overrides.
#
#   launch/cpu_simulation.sh norm=bn train.epochs=5
#   NPROC=2 launch/cpu_simulation.sh +experiment=weight_scale_sweep
set -euo pipefail
exec python -m syncbn.train "dist.nproc=${NPROC:-4}" "$@"
