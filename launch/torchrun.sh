#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh 4 experiment=t2v_tiny parallel.tp=2 parallel.cp=2
# Another entry point after -m, e.g. sampling on a mesh:
#   launch/torchrun.sh 4 -m trainer.sample checkpoint=runs/t2v_tiny prompt="..." \
#       parallel.tp=2 parallel.cp=2
# The backend follows trainer.device (trainer.sample: device=; gloo on cpu, nccl on
# cuda); the product of parallel.dp_replicate × dp_shard × cp × tp must equal N
# (dp_shard=-1 fills the rest; trainer.sample: 2 with cfg_parallel × cp × tp).
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC [-m MODULE] [overrides...]}"
shift
module=trainer.train
if [ "${1:-}" = "-m" ]; then
    module="${2:?usage: launch/torchrun.sh NPROC -m MODULE [overrides...]}"
    shift 2
fi
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --standalone \
    --nproc_per_node="$nproc" -m "$module" "$@"
