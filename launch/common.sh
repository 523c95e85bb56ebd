# shellcheck shell=bash
# What single_node.sbatch and multi_node.sbatch share: the signal handling, the checks
# before a launch, the device settings, the run directory, and what to do once the trainer
# has exited (finish, requeue, or report). Sourced by both scripts from the submit
# directory: sbatch runs a copy of a batch script from its spool folder, so the script
# cannot look for this file beside itself.
#
# A script that sources this file defines `signal_trainer PID`, which hands USR1 on to the
# trainer's worker processes started under PID (how depends on how the script started
# them), and sets `launcher` to that PID once it has started them.

# ---- signals ----
# Traps go in first: USR1's default action would end the batch script at once.

launcher=""  # pid of what runs the trainer: torchrun, or srun starting one torchrun per node
preempted=0  # USR1 came: checkpoint, stop, requeue
ending=0     # TERM came: Slurm is ending or preempting the job
trapped=0    # a trap ran while the script sat in `wait`

# shellcheck disable=SC2317 # (trap handlers: called indirectly)
on_usr1() {
    trapped=1
    preempted=1
    echo "launch: USR1 at $(date +%T): asking the trainer to save a checkpoint and stop"
    # The trainer's ranks agree on the stop at the next step boundary, save, and exit with
    # 75. torchrun has no USR1 handler: it is started with USR1 ignored, so that a USR1 sent
    # to the whole job cannot kill it and leave its workers running.
    if [[ -z "$launcher" ]] || ! signal_trainer "$launcher"; then
        echo "launch: no trainer process to signal"
    fi
}

# shellcheck disable=SC2317
on_term() {
    trapped=1
    ending=1
    # scancel, the time limit or preemption: Slurm signals every process of the job itself.
    # Staying alive lets the trainer finish its checkpoint before Slurm's KillWait (or the
    # partition's GraceTime, for preemption) runs out.
    echo "launch: TERM at $(date +%T): Slurm is ending the job; waiting for the trainer to save"
}

trap on_usr1 USR1
trap on_term TERM

# `wait` returns early, with 128 + the signal number, when a trapped signal arrives. Wait
# again until the process has really exited, and return its exit status.
wait_for() {
    local rc status=""
    while :; do
        trapped=0
        wait "$1" && rc=0 || rc=$?
        # 127 after a round that a trap cut short: the status was collected then. (In the
        # first round 127 is the command's own: "command not found", say.)
        [[ $rc == 127 && -n $status ]] || status=$rc
        ((trapped)) || return "$status"
    done
}

# ---- before the launch ----

# Stops the job (exit 2) where it cannot work: outside Slurm, outside the project root,
# without torchrun, or with an --out or --resume of the user's own among the arguments.
check_launch() {
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "launch: not in a Slurm job; submit this script with sbatch" >&2
        exit 2
    fi
    if [[ ! -f train.py ]]; then
        echo "launch: no train.py in $PWD; submit from the project root" >&2
        exit 2
    fi
    if ! command -v torchrun >/dev/null; then
        echo "launch: torchrun is not on PATH; activate the project's environment before sbatch" >&2
        exit 2
    fi
    local arg
    for arg in "$@"; do
        case "$arg" in
        --out | --out=* | --resume | --resume=*)
            # a requeued job must find its own checkpoints again: the script sets both
            echo "launch: $arg is set by this script (--out \$RUN_DIR --resume auto). Choose the run" \
                "directory with RUN_DIR=DIR; to start from other weights, pass --init-from" >&2
            exit 2
            ;;
        esac
    done
}

# set_device CPUS: NPROC_PER_NODE and device_flags from DEVICE, where CPUS is how many CPUs
# one node's processes share.
set_device() {
    DEVICE="${DEVICE:-cuda}"
    # shellcheck disable=SC2034 # (device_flags is read by the script that sources this file)
    case "$DEVICE" in
    cuda)
        NPROC_PER_NODE="${NPROC_PER_NODE:-gpu}" # torchrun counts the GPUs it can see
        device_flags=()
        ;;
    cpu)
        NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
        device_flags=(--device cpu)
        # share the node's CPUs out between its processes; torchrun would give each one thread
        local threads=$(($1 / NPROC_PER_NODE))
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"
        ;;
    *)
        echo "launch: DEVICE must be cuda or cpu, not '$DEVICE'" >&2
        exit 2
        ;;
    esac
}

set_run_dir() {
    RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
    mkdir -p "$RUN_DIR"
}

# ---- after the launch ----

# finish STATUS NAME: the job's end once the launcher NAME has exited with STATUS. Success
# ends the job; after USR1 any exit requeues it, so a run stopped in the middle of a
# checkpoint still goes on from the one before; after TERM the job ends and says how to go on.
finish() {
    local status=$1 name=$2
    if ((status == 0)); then
        echo "launch: training finished"
        exit 0
    fi
    if ((preempted)); then
        local latest
        latest=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo "none")
        echo "launch: trainer stopped ($name exit $status), latest checkpoint: $latest;" \
            "requeueing job $SLURM_JOB_ID to resume"
        # (a failure here would end the script without a word under `set -e`)
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        echo "launch: could not requeue job $SLURM_JOB_ID (some sites and partitions forbid it);" \
            "to go on, submit again with RUN_DIR=$RUN_DIR and the same flags" >&2
        exit "$status"
    fi
    if ((ending)); then
        # TERM does not say why it came. A preemption under PreemptMode=REQUEUE puts the job
        # back in the queue on Slurm's side, under the same id and so the same RUN_DIR: a second
        # submission would train there at the same time. scancel and the time limit end it.
        echo "launch: stopped by Slurm ($name exit $status). After a preemption on a partition" \
            "with PreemptMode=REQUEUE, Slurm requeues the job itself and it resumes: check" \
            "\`squeue -j $SLURM_JOB_ID\` and submit nothing while it is listed. Otherwise (scancel," \
            "the time limit), to go on, submit again with RUN_DIR=$RUN_DIR" >&2
    else
        echo "launch: training failed ($name exit $status)" >&2
    fi
    exit "$status"
}
