# shellcheck shell=bash
# Shared by infer.sbatch and sweep.sbatch (sourced, not run): environment setup, the node
# layout and rendezvous, the run folder, job.env and the slurm log.
# Every function fails with one line starting "moeb-slurm:" on stderr.

moeb_die() { echo "moeb-slurm: error: $*" >&2; exit 2; }
moeb_say() { echo "moeb-slurm: $*" >&2; }

moeb_quote() { printf '%q ' "$@" | sed 's/ $//'; }  # words -> one line a shell reads back

moeb_posint() {  # NAME VALUE: VALUE must be a positive integer
    [[ $2 =~ ^[1-9][0-9]*$ ]] || moeb_die "$1 must be a positive integer, got '$2'"
}

# Run MOEB_SETUP (default: activate the repository's .venv when it has one) in this shell, so
# that srun passes the resulting environment to every node.
moeb_setup() {
    if [[ -z ${MOEB_SETUP+x} ]]; then
        if [[ -f .venv/bin/activate ]]; then MOEB_SETUP="source .venv/bin/activate"; else MOEB_SETUP=""; fi
    fi
    if [[ -n $MOEB_SETUP ]]; then
        moeb_say "setup: $MOEB_SETUP"
        set +u  # activate scripts and module functions read unset variables
        eval "$MOEB_SETUP" || { set -u; moeb_die "MOEB_SETUP failed: $MOEB_SETUP"; }
        set -u
    fi
    read -ra MOEB_TORCHRUN_WORDS <<<"$MOEB_TORCHRUN"
    ((${#MOEB_TORCHRUN_WORDS[@]} > 0)) || moeb_die "MOEB_TORCHRUN is empty"
    command -v "${MOEB_TORCHRUN_WORDS[0]}" >/dev/null 2>&1 \
        || moeb_die "'${MOEB_TORCHRUN_WORDS[0]}' not found on PATH after setup; set MOEB_SETUP (e.g. 'source .venv/bin/activate') or MOEB_TORCHRUN"
}

# Nodes, processes per node, device and rendezvous from SLURM's environment. Sets MOEB_HOSTS,
# MOEB_NNODES, MOEB_HEAD, MOEB_DEVICE, MOEB_GPUS_PER_NODE, MOEB_NPROC_PER_NODE, MOEB_CPUS_PER_TASK,
# MOEB_RDZV_PORT, MOEB_RDZV_ENDPOINT.
moeb_layout() {
    mapfile -t MOEB_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    ((${#MOEB_HOSTS[@]} > 0)) || moeb_die "scontrol show hostnames '$SLURM_JOB_NODELIST' listed no host"
    MOEB_NNODES=${SLURM_JOB_NUM_NODES:-${#MOEB_HOSTS[@]}}
    MOEB_HEAD=${MOEB_HOSTS[0]}

    # GPUs on this node: what SLURM allocated, else what CUDA_VISIBLE_DEVICES or nvidia-smi shows.
    local gpus=0
    if [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
        gpus=$SLURM_GPUS_ON_NODE
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != -1 && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
        gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    elif command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    MOEB_GPUS_PER_NODE=$gpus
    MOEB_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    if ((gpus > 0)); then
        MOEB_DEVICE=cuda
        MOEB_NPROC_PER_NODE=${MOEB_NPROC_PER_NODE:-$gpus}
    else
        # CPU fallback: one rank per allocated core, one thread per rank (gloo).
        MOEB_DEVICE=cpu
        MOEB_NPROC_PER_NODE=${MOEB_NPROC_PER_NODE:-$MOEB_CPUS_PER_TASK}
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
    moeb_posint MOEB_NPROC_PER_NODE "$MOEB_NPROC_PER_NODE"
    # A port per job, so that jobs sharing a first node do not collide.
    MOEB_RDZV_PORT=${MOEB_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
    moeb_posint MOEB_RDZV_PORT "$MOEB_RDZV_PORT"
    ((MOEB_RDZV_PORT < 65536)) || moeb_die "MOEB_RDZV_PORT must be below 65536, got $MOEB_RDZV_PORT"
    MOEB_RDZV_ENDPOINT=$MOEB_HEAD:$MOEB_RDZV_PORT
    MOEB_WORLD_SIZE=$((MOEB_NNODES * MOEB_NPROC_PER_NODE))
}

# Create the run folder MOEB_RUNS/JOBNAME-JOBID (absolute path in MOEB_RUNDIR); an existing one
# is an earlier run's and is never reused.
moeb_rundir() {
    local runs name
    runs=${MOEB_RUNS:-runs}
    mkdir -p -- "$runs" || moeb_die "cannot create the runs folder '$runs'"
    runs=$(cd -- "$runs" && pwd -P)
    name=$(printf '%s' "${SLURM_JOB_NAME:-job}" | tr -c 'A-Za-z0-9._+-' '_')
    MOEB_RUNDIR=$runs/$name-$SLURM_JOB_ID
    mkdir -- "$MOEB_RUNDIR" 2>/dev/null \
        || moeb_die "run folder $MOEB_RUNDIR already exists (an earlier run's); refusing to overwrite it: move it away or set MOEB_RUNS"
    moeb_say "run folder: $MOEB_RUNDIR"
}

# Move SLURM's log into the run folder. A hard link keeps the file slurmstepd writes to, so the
# rest of the log lands there; across file systems it is copied at exit instead.
MOEB_LOG_COPY=()
moeb_take_log() {
    local job field path dest
    job=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null || true)
    for field in StdOut StdErr; do
        path=$(tr ' ' '\n' <<<"$job" | sed -n "s/^$field=//p")
        [[ -n $path && -f $path ]] || continue
        dest=$MOEB_RUNDIR/slurm.out
        [[ $field == StdErr ]] && dest=$MOEB_RUNDIR/slurm.err
        [[ -e $dest ]] && continue  # StdErr is StdOut (the default)
        if ln -- "$path" "$dest" 2>/dev/null; then
            rm -f -- "$path"
        else
            MOEB_LOG_COPY+=("$path" "$dest")
        fi
    done
    MOEB_TIME_LIMIT=$(tr ' ' '\n' <<<"$job" | sed -n 's/^TimeLimit=//p')
}

moeb_copy_logs() {
    local i
    for ((i = 0; i + 1 < ${#MOEB_LOG_COPY[@]}; i += 2)); do
        cp -- "${MOEB_LOG_COPY[i]}" "${MOEB_LOG_COPY[i + 1]}" 2>/dev/null || true
    done
}

moeb_git_commit() {
    local c
    c=$(git rev-parse HEAD 2>/dev/null) || { echo unknown; return; }
    [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && c="$c+dirty"
    echo "$c"
}

# job.env: KEY=value lines a shell can source. Args: the command (words).
moeb_job_env() {
    local f=$MOEB_RUNDIR/job.env
    {
        printf '# %s\n' "SLURM job $SLURM_JOB_ID; source this file to read the values"
        printf 'JOB_ID=%q\n' "$SLURM_JOB_ID"
        printf 'JOB_NAME=%q\n' "${SLURM_JOB_NAME:-}"
        printf 'NODES=%q\n' "$MOEB_NNODES"
        printf 'NODELIST=%q\n' "$SLURM_JOB_NODELIST"
        printf 'GPUS_PER_NODE=%q\n' "$MOEB_GPUS_PER_NODE"
        printf 'NPROC_PER_NODE=%q\n' "$MOEB_NPROC_PER_NODE"
        [[ -n ${MOEB_WORLD_SIZE:-} ]] && printf 'WORLD_SIZE=%q\n' "$MOEB_WORLD_SIZE"
        printf 'CPUS_PER_TASK=%q\n' "$MOEB_CPUS_PER_TASK"
        printf 'DEVICE=%q\n' "$MOEB_DEVICE"
        printf 'PARTITION=%q\n' "${SLURM_JOB_PARTITION:-}"
        printf 'TIME_LIMIT=%q\n' "${MOEB_TIME_LIMIT:-}"
        printf 'RDZV_ENDPOINT=%q\n' "$MOEB_RDZV_ENDPOINT"
        printf 'SETUP=%q\n' "$MOEB_SETUP"
        printf 'GIT_COMMIT=%q\n' "$(moeb_git_commit)"
        printf 'WORKDIR=%q\n' "$PWD"
        printf 'COMMAND=%q\n' "$(moeb_quote "$@")"
        printf 'START=%q\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$f"
}

# At exit: the end time and exit code in job.env, and any log that could not be linked.
moeb_finish() {
    local rc=$?
    if [[ -n ${MOEB_RUNDIR:-} && -f $MOEB_RUNDIR/job.env ]]; then
        printf 'END=%q\nEXIT_CODE=%q\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rc" >>"$MOEB_RUNDIR/job.env"
        moeb_say "exit code $rc; results in $MOEB_RUNDIR"
    fi
    moeb_copy_logs
    exit "$rc"
}

# Everything before the command: checks, setup, layout, run folder, log, trap.
moeb_prepare() {
    [[ -n ${SLURM_JOB_ID:-} ]] || moeb_die "not inside a SLURM job (SLURM_JOB_ID is unset): submit this file with sbatch"
    MOEB_ROOT=${MOEB_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd -- "$MOEB_ROOT" 2>/dev/null || moeb_die "MOEB_ROOT '$MOEB_ROOT' is not a directory"
    [[ -f scripts/infer.py ]] \
        || moeb_die "$MOEB_ROOT has no scripts/infer.py: submit from the repository root or set MOEB_ROOT"
    MOEB_TORCHRUN=${MOEB_TORCHRUN:-torchrun}
    moeb_setup
    moeb_layout
    moeb_rundir
    trap moeb_finish EXIT
    trap 'moeb_say "terminated (scancel or the time limit)"; exit 143' TERM
    moeb_take_log
}
