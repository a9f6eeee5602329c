#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (slurmctld, slurmd and munged on localhost,
# CPU only), for trying and testing the batch files in this folder.
#
#   scripts/slurm/local_cluster.sh start    # install slurm-wlm if missing (root + apt), start
#   scripts/slurm/local_cluster.sh status   # daemons and node state; exit 0 when up
#   scripts/slurm/local_cluster.sh env      # prints: export SLURM_CONF=...
#   scripts/slurm/local_cluster.sh stop     # cancel jobs, stop the daemons by their pid files
#
#   eval "$(scripts/slurm/local_cluster.sh env)"; sbatch --wait scripts/slurm/infer.sbatch ...
#
# All state (config, munge key and socket, spool, logs, pid files) lives in one directory:
# MOEB_SLURM_DIR (default /tmp/moeb-slurm-$USER). The controller and node daemon listen on the
# first free ports from 6817 (MOEB_SLURM_PORT to start elsewhere). Exit codes: 0 ok, 1 failure,
# 2 usage, 3 slurm not available (not installed and cannot be installed), 4 not running (status).
set -euo pipefail

PROG=local_cluster.sh
DIR=${MOEB_SLURM_DIR:-/tmp/moeb-slurm-${USER:-$(id -un)}}
CONF=$DIR/slurm.conf
START_TIMEOUT=${MOEB_SLURM_START_TIMEOUT:-30}
DAEMONS=(slurmd slurmctld munged)

die() { echo "$PROG: $*" >&2; exit "${CODE:-1}"; }
log() { echo "$PROG: $*" >&2; }

pidfile() { echo "$DIR/run/$1.pid"; }

# pid of a daemon from its pid file, when that process is alive
live_pid() {
    local f pid
    f=$(pidfile "$1")
    [[ -r $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

have_slurm() {
    local t
    for t in slurmctld slurmd munged mungekey sinfo sbatch scontrol; do
        command -v "$t" >/dev/null 2>&1 || return 1
    done
}

ensure_slurm() {
    # Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
    export PATH="$PATH:/usr/sbin:/sbin"
    have_slurm && return 0
    if [[ $(id -u) -ne 0 ]]; then
        CODE=3 die "slurm is not installed (slurmctld, slurmd, munged, sbatch) and installing it needs root: apt-get install slurm-wlm"
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        CODE=3 die "slurm is not installed and there is no apt-get to install slurm-wlm with"
    fi
    mkdir -p "$DIR"
    log "installing slurm-wlm with apt-get (log: $DIR/apt.log)"
    if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm; } \
        >"$DIR/apt.log" 2>&1; then
        CODE=3 die "apt-get could not install slurm-wlm: $(grep -E '^(E|Err):' "$DIR/apt.log" | head -n1 || true) (log: $DIR/apt.log)"
    fi
    have_slurm || CODE=3 die "slurm-wlm installed but its commands are missing (log: $DIR/apt.log)"
}

port_busy() {
    local p=$1
    if command -v ss >/dev/null 2>&1; then
        [[ -n $(ss -Hltn "sport = :$p" 2>/dev/null) ]]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null
    fi
}

free_port() {  # first free port from $1 that is not $2
    local p=$1
    while port_busy "$p" || [[ $p == "${2:-}" ]]; do
        p=$((p + 1))
        ((p < 65000)) || die "no free TCP port found from $1"
    done
    echo "$p"
}

write_conf() {
    local node ctld_port slurmd_port node_line mem
    node=$(hostname -s)
    ctld_port=$(free_port "${MOEB_SLURM_PORT:-6817}")
    slurmd_port=$(free_port $((ctld_port + 1)) "$ctld_port")
    # The node's real layout, less the volatile UpTime; memory set below what slurmd measures
    # (a node that reports less memory than configured is marked invalid).
    node_line=$(slurmd -C | head -n1 | sed -E 's/ UpTime=[^ ]*//')
    [[ $node_line == NodeName=* ]] || die "slurmd -C printed no node line: $node_line"
    mem=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$node_line")
    node_line=$(sed -E "s/^NodeName=[^ ]+/NodeName=$node/; s/RealMemory=[0-9]+/RealMemory=$((mem * 9 / 10))/" <<<"$node_line")
    cat >"$CONF.tmp" <<EOF
# Written by $PROG: single-node cluster on localhost, CPU only, state in $DIR.
ClusterName=moeb-local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# sbatch --wait polls every 2 s only while MinJobAge is at most 4 s (up to 32 s otherwise).
MinJobAge=4
MailProg=/bin/true
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

node_state() { SLURM_CONF=$CONF sinfo -h -N -o %T 2>/dev/null | head -n1; }

running() {  # all three daemons alive and the node answering
    live_pid munged >/dev/null && live_pid slurmctld >/dev/null && live_pid slurmd >/dev/null \
        && [[ -n $(node_state) ]]
}

print_logs() {
    local f
    for f in "$DIR"/log/*.log; do
        [[ -r $f ]] || continue
        echo "--- $f (last lines)" >&2
        tail -n 15 "$f" >&2
    done
}

cmd_start() {
    ensure_slurm
    if running; then
        log "already running ($(node_state)); state in $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    # A partial or crashed earlier start: stop what is left, keep the state (job ids go on).
    cmd_stop >/dev/null 2>&1 || true
    mkdir -p "$DIR"/{munge,state,spool,log,run}
    DIR=$(cd "$DIR" && pwd -P)
    CONF=$DIR/slurm.conf
    # munged refuses a socket under a folder that not everyone may enter.
    local up=$DIR
    while [[ $up != / ]]; do
        up=$(dirname "$up")
        ((8#$(stat -c %a "$up") & 1)) \
            || die "munged needs every folder above its socket searchable by all, and $up is not (mode $(stat -c %a "$up")): set MOEB_SLURM_DIR elsewhere, e.g. under /tmp"
    done
    # munged wants its socket directory reachable by everyone (x) and writable only by itself.
    chmod 755 "$DIR" "$DIR/munge"
    [[ -s $DIR/munge/munge.key ]] || mungekey -c -k "$DIR/munge/munge.key" >/dev/null
    chmod 600 "$DIR/munge/munge.key"
    write_conf

    munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
        --pid-file="$(pidfile munged)" --seed-file="$DIR/munge/munge.seed" \
        --log-file="$DIR/log/munged.log" \
        || { print_logs; die "munged failed to start (log: $DIR/log/munged.log)"; }
    slurmctld -f "$CONF" || { print_logs; cmd_stop >/dev/null 2>&1; die "slurmctld failed to start (log: $DIR/log/slurmctld.log)"; }
    slurmd -f "$CONF" || { print_logs; cmd_stop >/dev/null 2>&1; die "slurmd failed to start (log: $DIR/log/slurmd.log)"; }

    local state="" deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle | mixed | allocated) break ;;
            *) sleep 0.2 ;;
        esac
    done
    case $state in
        idle | mixed | allocated) ;;
        *)
            print_logs
            cmd_stop >/dev/null 2>&1 || true
            die "the node did not come up within ${START_TIMEOUT}s (state: ${state:-no answer}); logs in $DIR/log"
            ;;
    esac
    log "started: node $(hostname -s) $state, controller port $(sed -nE 's/^SlurmctldPort=//p' "$CONF"), state in $DIR"
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {  # TERM to all at once (each takes ~2 s to exit), wait up to 10 s, then KILL
    local name pid i alive
    local -A pids=()
    for name in "$@"; do
        if pid=$(live_pid "$name"); then
            pids[$name]=$pid
            kill "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignored TERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name ($pid)"
    done
    for name in "$@"; do rm -f "$(pidfile "$name")"; done
}

cmd_stop() {
    export PATH="$PATH:/usr/sbin:/sbin"
    [[ -d $DIR ]] || { log "nothing to stop in $DIR"; return 0; }
    # Jobs first: their slurmstepd processes would outlive slurmd.
    if live_pid slurmctld >/dev/null && command -v squeue >/dev/null 2>&1; then
        local jobs i
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one id per word
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [[ -z $(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    stop_daemons "${DAEMONS[@]}"
}

cmd_status() {
    export PATH="$PATH:/usr/sbin:/sbin"
    local d pid up=0
    for d in munged slurmctld slurmd; do
        if pid=$(live_pid "$d"); then
            echo "$d: running (pid $pid)"
        else
            echo "$d: not running"
            up=1
        fi
    done
    if ((up == 0)) && [[ -n $(node_state) ]]; then
        SLURM_CONF=$CONF sinfo
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    echo "local cluster in $DIR is not running"
    return 4
}

cmd_env() {
    [[ -r $CONF ]] || die "no cluster configured in $DIR; run: $0 start"
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) CODE=2 die "usage: $0 {start|stop|status|env} (state directory: MOEB_SLURM_DIR, now $DIR)" ;;
esac
