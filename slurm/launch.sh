# Sourced by slurm/*.sbatch after they set their defaults; not a job of its own.
#
# Builds the `fineregion-pl` command for this allocation and starts it with `srun`, one task per
# device: Lightning's SLURMEnvironment reads the ranks from srun (SLURM_PROCID, SLURM_LOCALID,
# SLURM_NODELIST), so --trainer.devices must equal the tasks per node and --trainer.num_nodes the
# nodes; both are taken from the allocation here, whatever the configs say.
#
# Reads: CONFIG, STRATEGY, EXTRA_ARGS, FINEREGION_CPU, PYTHON, FINEREGION_ROOT, DRY_RUN
# (documented at the top of each sbatch script).

set -euo pipefail
cd "${FINEREGION_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
PYTHON=${PYTHON:-python}

# Tasks per node and nodes of this allocation ("2(x3)" and "2,2" forms reduced to the first count).
FINEREGION_TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
FINEREGION_TASKS_PER_NODE=${FINEREGION_TASKS_PER_NODE%%(*}
FINEREGION_TASKS_PER_NODE=${FINEREGION_TASKS_PER_NODE%%,*}
FINEREGION_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

if [ "${FINEREGION_CPU:-0}" = 1 ]; then
  # CPU-only cluster: Lightning picks gloo for CPU processes; one thread each unless asked otherwise
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi

# fineregion_command VERB [CONFIG FILES...]: sets the array CMD to the full command line.
fineregion_command() {
  local verb=$1 config
  shift
  CMD=("$PYTHON" -m fineregion_pl "$verb")
  for config in "$@"; do
    CMD+=(--config "$config")
  done
  case "${STRATEGY:-none}" in
    none | "") ;;
    *.yaml) CMD+=(--config "$STRATEGY") ;;
    *) CMD+=(--config "configs/strategies/$STRATEGY.yaml") ;;
  esac
  if [ "${FINEREGION_CPU:-0}" = 1 ]; then
    CMD+=(--trainer.accelerator cpu)
  else
    CMD+=(--trainer.accelerator gpu)
  fi
  CMD+=(--trainer.devices "$FINEREGION_TASKS_PER_NODE" --trainer.num_nodes "$FINEREGION_NODES")
  local extra=()
  read -r -a extra <<< "${EXTRA_ARGS:-}"
  CMD+=("${extra[@]}")
}

# fineregion_run: srun CMD on every task of the allocation (prints it only with DRY_RUN=1).
fineregion_run() {
  echo "fineregion-pl: ${FINEREGION_NODES} node(s) x ${FINEREGION_TASKS_PER_NODE} task(s): ${CMD[*]}"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    return 0
  fi
  # --kill-on-bad-exit: one failed rank ends the step at once instead of leaving the others waiting
  srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} "${CMD[@]}"
}
