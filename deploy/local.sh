#!/usr/bin/env bash
# A SuperLink and N SuperNodes on this host, for trials (insecure, loopback by default).
# Devices on a network, one role per machine: deploy/device.sh (docs/devices.md).
#
#   deploy/local.sh start 3            # SuperLink on :8000 + SuperNodes 0..2, state in .deploy/
#   TLS=1 deploy/local.sh certs 3      # a CA, the SuperLink's certificate, 3 node key pairs
#   TLS=1 deploy/local.sh start 3      # ... with TLS and SuperNode authentication: the nodes'
#                                      # public keys are registered before they connect
#   deploy/local.sh connection         # write the [superlink.drdfl-local] entry flwr run needs
#   deploy/local.sh stop               # stop exactly the processes this script started
#   deploy/local.sh kill-node 1        # stop one SuperNode (a crash, for trials)
#   deploy/local.sh start-node 1 3     # start SuperNode 1 of 3 again (it gets a new node id)
#   deploy/local.sh kill-superlink     # stop the SuperLink alone; start-superlink restarts it
#
# Every process runs in its own session, its PID in .deploy/<name>.pid; stop kills those
# process groups and nothing else (pkill -f would end every SuperLink on the machine).
# Environment: DEPLOY_DIR (.deploy), SUPERLINK_PORT (8000), SUPERLINK_HOST (127.0.0.1;
# 0.0.0.0 to accept other devices), NODE_PORT_BASE (9094: SuperNode k serves its
# ClientApps on NODE_PORT_BASE + k), TLS (0; 1: certificates and node keys from
# DEPLOY_DIR/certs), SUPERLINK_NAME (an extra DNS name for the SuperLink's certificate),
# CHECKPOINTS (1: each node keeps its state and decoded data in DEPLOY_DIR/node-k; 0: none),
# NODE_THREADS (1: torch threads per ClientApp process, as the nodes share this host),
# OWN_DATA (a folder of node-<k>/ folders, python -m drdfl_flwr.experiments.presplit: node k
# trains on OWN_DATA/node-k whole, scored on OWN_DATA/global-test too if it is there).
set -euo pipefail

DEPLOY_DIR=${DEPLOY_DIR:-.deploy}
SUPERLINK_PORT=${SUPERLINK_PORT:-8000}
SUPERLINK_HOST=${SUPERLINK_HOST:-127.0.0.1}
NODE_PORT_BASE=${NODE_PORT_BASE:-9094}
TLS=${TLS:-0}
mkdir -p "$DEPLOY_DIR"
DEPLOY_DIR=$(cd "$DEPLOY_DIR" && pwd)  # absolute: node configs and the connection name files
CERTS="$DEPLOY_DIR/certs"
# shellcheck source=deploy/processes.sh
. "$(dirname "$0")/processes.sh"

superlink_security() {
    if [[ $TLS == 1 ]]; then
        echo --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/superlink.pem" \
            --ssl-keyfile "$CERTS/superlink.key" --enable-supernode-auth
    else
        echo --insecure
    fi
}

node_security() {  # partition-id
    if [[ $TLS == 1 ]]; then
        echo --root-certificates "$CERTS/ca.crt" --auth-supernode-private-key "$CERTS/node-$1"
    else
        echo --insecure
    fi
}

make_certs() {  # num-partitions
    mkdir -p "$CERTS"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=drdfl-flwr trial CA" \
        -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=superlink" \
        -keyout "$CERTS/superlink.key" -out "$CERTS/superlink.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost%s\n' "${SUPERLINK_NAME:+,DNS:$SUPERLINK_NAME}" \
        >"$CERTS/superlink.ext"
    openssl x509 -req -in "$CERTS/superlink.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
        -CAcreateserial -days 30 -extfile "$CERTS/superlink.ext" -out "$CERTS/superlink.pem" 2>/dev/null
    for k in $(seq 0 $(($1 - 1))); do
        rm -f "$CERTS/node-$k" "$CERTS/node-$k.pub"
        ssh-keygen -t ecdsa -b 384 -N "" -q -f "$CERTS/node-$k"
    done
    echo "CA, SuperLink certificate and $1 node key pairs in $CERTS"
}

register_node() {  # partition-id: the SuperLink accepts this node's key from now on
    for _ in $(seq 30); do
        if flwr supernode register "$CERTS/node-$1.pub" drdfl-local >/dev/null 2>&1; then
            echo "registered node-$1.pub"
            return 0
        fi
        sleep 2
    done
    echo "could not register node-$1.pub (is the SuperLink up, and 'connection' done?)" >&2
    return 1
}


start_node() {  # partition-id, num-partitions
    local k=$1 n=$2
    local config="partition-id=$k num-partitions=$n"
    if [[ ${CHECKPOINTS:-1} == 1 ]]; then config="$config checkpoint-dir=\"$DEPLOY_DIR/node-$k\""; fi
    if [[ -n ${OWN_DATA:-} ]]; then  # each node its own folder, as the pre-split writes them
        config="$config own-data=\"$OWN_DATA/node-$k\""
        if [[ -d $OWN_DATA/global-test ]]; then config="$config global-test=\"$OWN_DATA/global-test\""; fi
    fi
    # Several SuperNodes share this host's cores: each ClientApp process gets NODE_THREADS
    # torch threads (1 by default: 3 nodes x 2 threads on 2 cores oversubscribe them).
    # shellcheck disable=SC2046
    OMP_NUM_THREADS=${NODE_THREADS:-1} spawn "supernode-$k" flower-supernode $(node_security "$k") \
        --superlink "127.0.0.1:$SUPERLINK_PORT" \
        --port $((NODE_PORT_BASE + k)) \
        --node-config "$config"
}

case ${1:-} in
start)
    n=${2:?usage: $0 start N}
    # shellcheck disable=SC2046
    spawn superlink flower-superlink $(superlink_security) \
        --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" \
        --database "$DEPLOY_DIR/superlink.db" \
        --disable-runtime-dependency-installation
    if [[ $TLS == 1 ]]; then
        "$0" connection
        for k in $(seq 0 $((n - 1))); do register_node "$k"; done
    fi
    for k in $(seq 0 $((n - 1))); do start_node "$k" "$n"; done
    ;;
certs) make_certs "${2:?usage: $0 certs N}" ;;
register) register_node "${2:?partition-id}" ;;
start-node) start_node "${2:?partition-id}" "${3:?num-partitions}" ;;
kill-superlink) stop_one superlink ;;
start-superlink)  # again, on the same database (after kill-superlink)
    # shellcheck disable=SC2046
    spawn superlink flower-superlink $(superlink_security) \
        --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" \
        --database "$DEPLOY_DIR/superlink.db" \
        --disable-runtime-dependency-installation
    ;;
kill-node) stop_one "supernode-${2:?partition-id}" ;;
stop)
    for pidfile in "$DEPLOY_DIR"/supernode-*.pid; do
        [[ -e $pidfile ]] && stop_one "$(basename "$pidfile" .pid)"
    done
    stop_one superlink
    ;;
connection)  # write [superlink.drdfl-local] into the Flower configuration (replacing it)
    config="${FLWR_HOME:-$HOME/.flwr}/config.toml"
    [[ -f $config ]] || flwr config list > /dev/null  # flwr creates it on first use
    if [[ $TLS == 1 ]]; then security="root-certificates = \"$CERTS/ca.crt\""; else security="insecure = true"; fi
    # drop an earlier entry (another port, TLS or not), keep everything else as it is
    awk '/^\[/ { skip = ($0 == "[superlink.drdfl-local]") } !skip' "$config" > "$config.new"
    printf '\n[superlink.drdfl-local]\naddress = "127.0.0.1:%s"\n%s\n' \
        "$SUPERLINK_PORT" "$security" >> "$config.new"
    mv "$config.new" "$config"
    echo "[superlink.drdfl-local] in $config: 127.0.0.1:$SUPERLINK_PORT, $security"
    ;;
*)
    sed -n '2,24p' "$0"
    exit 2
    ;;
esac
