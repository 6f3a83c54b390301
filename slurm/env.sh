# Sourced by the sbatch scripts (and usable by hand inside an allocation): the rendezvous
# address and port from the Slurm environment, the Python environment and the NCCL settings.
#
#   MASTER_ADDR   NodeAddr of the first node of the allocation (works for real host names and
#                 for test clusters whose "nodes" share one host)
#   MASTER_PORT   20000 + job id % 20000 unless already set (two jobs sharing a node differ)
#   NNODES        $SLURM_NNODES
#   NPROC_PER_NODE  processes per node: $NPROC_PER_NODE, else the GPUs Slurm gave the node,
#                 else 1 (CPU)
#   CPUS_PER_RANK cores per process: the node task's (--cpus-per-task, else the node's
#                 allocation) over NPROC_PER_NODE, at least 1; OMP_NUM_THREADS defaults to it
#   DIST_REID_ROOT  the repository (the scripts set it; else the current folder)

# The project's virtual environment, if there is one and none is active.
DIST_REID_ROOT=${DIST_REID_ROOT:-$PWD}
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "${DIST_REID_VENV:-${DIST_REID_ROOT}/.venv}/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "${DIST_REID_VENV:-${DIST_REID_ROOT}/.venv}/bin/activate"
fi
# The repository's own package, whatever the job's folder (an installed copy would otherwise win).
export PYTHONPATH="${DIST_REID_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first_node" | grep -oP 'NodeAddr=\K\S+')}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NNODES=${SLURM_NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  gpus=${gpus##*:}  # "a100:4" -> 4
  NPROC_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
fi
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
CPUS_PER_RANK=$(( cpus / NPROC_PER_NODE > 0 ? cpus / NPROC_PER_NODE : 1 ))
export MASTER_ADDR MASTER_PORT NNODES NPROC_PER_NODE CPUS_PER_RANK DIST_REID_ROOT

# NCCL (GPU clusters; ignored by gloo on CPU). Defaults are left to NCCL unless set here:
#   NCCL_SOCKET_IFNAME  the interface of the inter-node network, e.g. ib0 or eth0 (NCCL may
#                       otherwise pick a docker/loopback interface and hang at init)
#   NCCL_IB_DISABLE=1   on clusters without InfiniBand
#   NCCL_DEBUG=INFO     when init hangs or is slow (prints the chosen transport per peer)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a dead peer aborts the collective instead of hanging
#                       (default in recent torch), so Slurm/torchrun can restart the job
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${CPUS_PER_RANK}}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
