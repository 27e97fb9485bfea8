#!/usr/bin/env bash
# A SuperLink and N SuperNodes on this host, for trials (insecure, loopback by default).
#
#   deploy/local.sh start 3            # SuperLink on :8000 + SuperNodes 0..2, state in .deploy/
#   deploy/local.sh connection         # add the [superlink.drdfl-local] entry flwr run needs
#   deploy/local.sh stop               # stop exactly the processes this script started
#   deploy/local.sh kill-node 1        # stop one SuperNode (a crash, for trials)
#   deploy/local.sh start-node 1 3     # start SuperNode 1 of 3 again (it gets a new node id)
#
# Every process runs in its own session, its PID in .deploy/<name>.pid; stop kills those
# process groups and nothing else (pkill -f would end every SuperLink on the machine).
# Environment: DEPLOY_DIR (.deploy), SUPERLINK_PORT (8000), SUPERLINK_HOST (127.0.0.1;
# 0.0.0.0 to accept other devices), NODE_PORT_BASE (9094: SuperNode k serves its
# ClientApps on NODE_PORT_BASE + k), DATA_DIR (a dataset folder every node reads, optional),
# CHECKPOINTS (1: each node keeps its state and decoded data in DEPLOY_DIR/node-k; 0: none).
set -euo pipefail

DEPLOY_DIR=${DEPLOY_DIR:-.deploy}
SUPERLINK_PORT=${SUPERLINK_PORT:-8000}
SUPERLINK_HOST=${SUPERLINK_HOST:-127.0.0.1}
NODE_PORT_BASE=${NODE_PORT_BASE:-9094}
mkdir -p "$DEPLOY_DIR"

spawn() {  # name, command...: start in a new session, remember the PID
    local name=$1
    shift
    setsid "$@" >"$DEPLOY_DIR/$name.log" 2>&1 < /dev/null &
    echo $! >"$DEPLOY_DIR/$name.pid"
    echo "started $name (pid $!), log $DEPLOY_DIR/$name.log"
}

stop_one() {  # name: stop its process group, wait for it
    local pidfile="$DEPLOY_DIR/$1.pid"
    [[ -f $pidfile ]] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "stopped $1 (pid $pid)"
    fi
    rm -f "$pidfile"
}

start_node() {  # partition-id, num-partitions
    local k=$1 n=$2
    local config="partition-id=$k num-partitions=$n"
    if [[ ${CHECKPOINTS:-1} == 1 ]]; then config="$config checkpoint-dir=\"$DEPLOY_DIR/node-$k\""; fi
    if [[ -n ${DATA_DIR:-} ]]; then config="$config data-dir=\"$DATA_DIR\""; fi
    spawn "supernode-$k" flower-supernode --insecure \
        --superlink "127.0.0.1:$SUPERLINK_PORT" \
        --port $((NODE_PORT_BASE + k)) \
        --node-config "$config"
}

case ${1:-} in
start)
    n=${2:?usage: $0 start N}
    spawn superlink flower-superlink --insecure \
        --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" \
        --database "$DEPLOY_DIR/superlink.db" \
        --disable-runtime-dependency-installation
    for k in $(seq 0 $((n - 1))); do start_node "$k" "$n"; done
    ;;
start-node) start_node "${2:?partition-id}" "${3:?num-partitions}" ;;
kill-node) stop_one "supernode-${2:?partition-id}" ;;
stop)
    for pidfile in "$DEPLOY_DIR"/supernode-*.pid; do
        [[ -e $pidfile ]] && stop_one "$(basename "$pidfile" .pid)"
    done
    stop_one superlink
    ;;
connection)  # add [superlink.drdfl-local] to the Flower configuration, once
    config="${FLWR_HOME:-$HOME/.flwr}/config.toml"
    [[ -f $config ]] || flwr config list > /dev/null  # flwr creates it on first use
    if grep -q '^\[superlink.drdfl-local\]' "$config"; then
        echo "$config already has [superlink.drdfl-local]:"
        sed -n '/^\[superlink.drdfl-local\]/,/^$/p' "$config"
    else
        printf '\n[superlink.drdfl-local]\naddress = "127.0.0.1:%s"\ninsecure = true\n' \
            "$SUPERLINK_PORT" >> "$config"
        echo "added [superlink.drdfl-local] (127.0.0.1:$SUPERLINK_PORT, insecure) to $config"
    fi
    ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
