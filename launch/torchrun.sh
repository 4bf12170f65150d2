#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh 4 experiment=t2v_tiny parallel.tp=2 parallel.cp=2
# The backend follows trainer.device (gloo on cpu, nccl on cuda); the product of
# parallel.dp_replicate × dp_shard × cp × tp must equal N (dp_shard=-1 fills the rest).
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC [hydra overrides...]}"
shift
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --standalone \
    --nproc_per_node="$nproc" -m trainer.train "$@"
