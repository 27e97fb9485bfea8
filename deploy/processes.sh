# Sourced by deploy/local.sh and deploy/device.sh: start a process in a session of its own
# with its PID in DEPLOY_DIR/<name>.pid, and stop exactly what was started (its process
# group and everything below it), never by name (pkill -f would end every Flower process
# on the machine). Needs DEPLOY_DIR set; PYTHON (python3) starts the session. FOREGROUND=1
# runs the command in place of the script instead (for a supervisor such as systemd).

spawn() {  # name, command...: start in a session of its own, remember the PID
    local name=$1
    shift
    if [[ ${FOREGROUND:-0} == 1 ]]; then
        # under a supervisor (systemd: deploy/systemd/): it keeps the process, restarts
        # it after a crash and stops it; no session, no PID file, the log to its journal
        exec "$@"
    fi
    # a new session without setsid(1), which macOS lacks: Python's os.setsid, then exec
    "${PYTHON:-python3}" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" \
        >>"$DEPLOY_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$DEPLOY_DIR/$name.pid"
    echo "started $name (pid $!), log $DEPLOY_DIR/$name.log"
}

descendants() {  # pid: every process below it (pgrep -P, on Linux and macOS alike)
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

stop_one() {  # name: stop its process group and every process below it, wait for them
    local pidfile="$DEPLOY_DIR/$1.pid" pid others
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        # the SuperLink's SuperExec starts a session of its own: not in the group
        others=$(descendants "$pid")
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        # shellcheck disable=SC2086
        [[ -z $others ]] || kill -TERM $others 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        # shellcheck disable=SC2086
        [[ -z $others ]] || kill -KILL $others 2>/dev/null || true
        echo "stopped $1 (pid $pid${others:+ and $(echo $others | wc -w) below it})"
    fi
    rm -f "$pidfile"
}
