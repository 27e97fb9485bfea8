#!/usr/bin/env bash
# One role per machine: the SuperLink on one host, a SuperNode on each device, found by
# address. docs/devices.md walks through it; deploy/local.sh is everything on one host.
#
# On the SuperLink host (ADDRESS: the IP or DNS name the devices connect to):
#   deploy/device.sh certs ADDRESS [NAME...]   # a CA and the SuperLink's certificate, valid
#                                              # for ADDRESS and every NAME (IP: or DNS: each);
#                                              # run again, it keeps the CA (enrolled devices
#                                              # trust it) and issues a new certificate;
#                                              # --replace-ca first moves the old CA aside
#   deploy/device.sh superlink                 # the SuperLink, TLS, SuperNode authentication
#   deploy/device.sh connection ADDRESS        # the [superlink.drdfl] entry flwr run needs
#   deploy/device.sh register KEY.pub          # accept one device's public key
# On each device (copy ca.crt from the SuperLink host first):
#   deploy/device.sh node-key                  # this device's key pair; send the .pub over
#   deploy/device.sh supernode ADDRESS PARTITION NUM-PARTITIONS [DATA-DIR]
# Anywhere:
#   deploy/device.sh stop                      # stop what this script started here, by PID
#
# State lives in DEPLOY_DIR (default ~/.local/state/drdfl-flwr): certs/, node-key,
# node/ (the SuperNode's checkpoint-dir: private state and decoded data, kept across
# restarts), superlink.db, *.log, *.pid. Environment: DEPLOY_DIR, PORT (8000: the
# SuperLink's one HTTPS port, where devices, flwr run and flwr supernode connect),
# BIND (0.0.0.0: the SuperLink's listening address), CA (the CA certificate a device
# trusts; default DEPLOY_DIR/certs/ca.crt), FEDERATION (drdfl: the flwr config entry),
# NODE_THREADS (torch threads per ClientApp process; unset: torch decides), FOREGROUND
# (1: run the Flower process in place of this script, for systemd: deploy/systemd/),
# OWN_DATA (the device's own folder, used whole: docs/devices.md) and GLOBAL_TEST (a
# common test set's folder, optional).
# Needs bash, Python with this project installed (docs/devices.md), openssl and
# ssh-keygen for keys; no setsid (macOS has none).
set -euo pipefail

DEPLOY_DIR=${DEPLOY_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/drdfl-flwr}
PORT=${PORT:-8000}
BIND=${BIND:-0.0.0.0}
FEDERATION=${FEDERATION:-drdfl}
mkdir -p "$DEPLOY_DIR"
DEPLOY_DIR=$(cd "$DEPLOY_DIR" && pwd)
CERTS="$DEPLOY_DIR/certs"
CA=${CA:-$CERTS/ca.crt}
PYTHON=${PYTHON:-python3}
# shellcheck source=deploy/processes.sh
. "$(dirname "$0")/processes.sh"

usage() {
    sed -n '2,31p' "$0"
    exit 2
}

is_ip() {  # an IPv4 or IPv6 literal, as opposed to a DNS name
    [[ $1 =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $1 == *:* ]]
}


make_certs() {  # address, names...
    # 127.0.0.1 and localhost too: the SuperLink's own ServerApp and SuperExec processes
    # reach it over loopback, with TLS verified like everyone else's
    local sans="" name
    for name in "$@" 127.0.0.1 localhost; do
        if is_ip "$name"; then sans="$sans,IP:$name"; else sans="$sans,DNS:$name"; fi
    done
    mkdir -p "$CERTS"
    if [[ -f "$CERTS/ca.crt" ]]; then
        # every enrolled device trusts this CA: a new one would lock them all out
        if [[ ! -f "$CERTS/ca.key" ]]; then
            echo "error: $CERTS/ca.crt has no ca.key beside it (a device's copy?): cannot" \
                "sign with it; run certs on the SuperLink host, or --replace-ca" >&2
            exit 1
        fi
        echo "kept the existing CA $CERTS/ca.crt (devices that trust it keep working;" \
            "--replace-ca to start a new one)"
    else
        openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=drdfl-flwr CA" \
            -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2>/dev/null
    fi
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$1" \
        -keyout "$CERTS/superlink.key" -out "$CERTS/superlink.csr" 2>/dev/null
    printf 'subjectAltName=%s\n' "${sans#,}" >"$CERTS/superlink.ext"
    openssl x509 -req -in "$CERTS/superlink.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
        -CAcreateserial -days 365 -extfile "$CERTS/superlink.ext" \
        -out "$CERTS/superlink.pem" 2>/dev/null
    echo "CA and SuperLink certificate in $CERTS, valid for ${sans#,}"
    echo "copy $CERTS/ca.crt to every device (the CA key stays here)"
}

case ${1:-} in
certs)
    shift
    if [[ ${1:-} == --replace-ca ]]; then
        shift
        if [[ -d "$CERTS" ]]; then
            aside="$CERTS.$(date +%Y%m%d-%H%M%S)"
            mv "$CERTS" "$aside"
            echo "moved the old CA and certificates aside to $aside"
        fi
    fi
    [[ $# -ge 1 ]] || usage
    make_certs "$@"
    ;;
superlink)
    spawn superlink flower-superlink \
        --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/superlink.pem" \
        --ssl-keyfile "$CERTS/superlink.key" --enable-supernode-auth \
        --host "$BIND" --port "$PORT" \
        --database "$DEPLOY_DIR/superlink.db" \
        --disable-runtime-dependency-installation
    ;;
connection)  # write [superlink.$FEDERATION] into the Flower configuration (replacing it)
    address=${2:?usage: $0 connection ADDRESS}
    config="${FLWR_HOME:-$HOME/.flwr}/config.toml"
    [[ -f $config ]] || flwr config list >/dev/null  # flwr creates it on first use
    awk -v head="[superlink.$FEDERATION]" '/^\[/ { skip = ($0 == head) } !skip' "$config" \
        >"$config.new"
    printf '\n[superlink.%s]\naddress = "%s:%s"\nroot-certificates = "%s"\n' \
        "$FEDERATION" "$address" "$PORT" "$CA" >>"$config.new"
    mv "$config.new" "$config"
    echo "[superlink.$FEDERATION] in $config: $address:$PORT, CA $CA"
    ;;
register)
    key=${2:?usage: $0 register KEY.pub}
    for _ in $(seq 30); do
        if out=$(flwr supernode register "$key" "$FEDERATION" 2>&1); then
            echo "registered $key"
            exit 0
        fi
        sleep 2
    done
    echo "could not register $key: $out" >&2
    exit 1
    ;;
node-key)
    if [[ -f $DEPLOY_DIR/node-key ]]; then
        echo "$DEPLOY_DIR/node-key exists; its public key: $DEPLOY_DIR/node-key.pub"
    else
        ssh-keygen -t ecdsa -b 384 -N "" -q -f "$DEPLOY_DIR/node-key"
        echo "key pair in $DEPLOY_DIR/node-key; send node-key.pub to the SuperLink host"
    fi
    ;;
supernode)
    [[ $# -ge 4 ]] || usage
    address=$2 partition=$3 partitions=$4 data=${5:-}
    [[ -f $CA ]] || { echo "no CA certificate at $CA (copy ca.crt from the SuperLink host)" >&2; exit 1; }
    [[ -f $DEPLOY_DIR/node-key ]] || { echo "no node key: run '$0 node-key' first" >&2; exit 1; }
    config="partition-id=$partition num-partitions=$partitions checkpoint-dir=\"$DEPLOY_DIR/node\""
    if [[ -n $data ]]; then
        data=$(cd "$data" && pwd) || { echo "no data folder $5" >&2; exit 1; }
        config="$config data-dir=\"$data\""
    fi
    if [[ -n ${OWN_DATA:-} ]]; then  # the device's own files, used whole (no partitioner)
        own=$(cd "$OWN_DATA" && pwd) || { echo "no own-data folder $OWN_DATA" >&2; exit 1; }
        config="$config own-data=\"$own\""
        if [[ -n ${GLOBAL_TEST:-} ]]; then
            common=$(cd "$GLOBAL_TEST" && pwd) || { echo "no global-test folder $GLOBAL_TEST" >&2; exit 1; }
            config="$config global-test=\"$common\""
        fi
    fi
    if [[ -n ${NODE_THREADS:-} ]]; then export OMP_NUM_THREADS=$NODE_THREADS; fi
    spawn supernode flower-supernode \
        --root-certificates "$CA" --auth-supernode-private-key "$DEPLOY_DIR/node-key" \
        --superlink "$address:$PORT" \
        --node-config "$config"
    ;;
stop)
    stop_one supernode
    stop_one superlink
    ;;
*) usage ;;
esac
