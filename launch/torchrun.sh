#!/usr/bin/env bash
# torchrun for syncbn.train, with one Hydra output directory shared by every rank and the app's
# one-line reports instead of torchrun's (see syncbn/torchrun.py):
#
#   launch/torchrun.sh --standalone --nproc-per-node=4 -- norm=syncbn train.epochs=5
#   SYNCBN_RUN_DIR=outputs/exp1 launch/torchrun.sh --standalone --nproc-per-node=2
#
# Flags before "--" go to torchrun, the rest are Hydra overrides. c10d's C++ warnings and errors (each
# with its stack trace, many for one peer gone) are left out: the wrapper's one line says what
# happened (TORCH_CPP_LOG_LEVEL=INFO brings them back).
export TORCH_CPP_LOG_LEVEL="${TORCH_CPP_LOG_LEVEL:-FATAL}"
exec python -m syncbn.torchrun "$@"
