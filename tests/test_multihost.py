"""SuperNodes on separate hosts, on this machine: the SuperLink and three SuperNodes each in
a network namespace of its own (``ip netns``, veth pairs on a bridge), reachable only by
those namespaces' addresses; TLS verified by IP, SuperNode authentication, every device
with its own copy of the data (node config ``data-dir``) and its own checkpoint folder,
all started with deploy/device.sh as docs/devices.md says.

One DRDFL run goes through what a field deployment meets:

* a slow link: node 2 reaches the SuperLink through a delaying TCP proxy
  (tests/delay_proxy.py; this kernel has no ``netem``), slowed down for some rounds: the
  round time grows by about the added delay, no round times out;
* a device that freezes: node 1's processes are stopped (SIGSTOP) for longer than the
  round timeout, then continued: the ring bypasses it (``failed``), then takes it back
  (``rejoined``), its private state intact;
* the SuperLink restarted mid-run: the run is submitted again with ``resume = true``
  and finishes from its last completed round, the nodes from their checkpoints.

Needs root (``ip netns``), openssl and ssh-keygen; skipped otherwise. Marked
``deployment`` and ``slow`` (about 5 minutes on 2 cores): ``pytest -m deployment -s
tests/test_multihost.py`` prints the log the closing note quotes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_deployment import records, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "deploy" / "device.sh"
PROXY = ROOT / "tests" / "delay_proxy.py"
PORT, SLOW_PORT = 8000, 8100
ROUND_TIMEOUT = 40  # seconds (a round takes about 20 s on these 2 cores)
SLOW_DELAY = 0.25  # seconds per chunk and direction on node 2's link, while slowed
ROUNDS = 12

pytestmark = [pytest.mark.slow, pytest.mark.deployment]


def sh(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, **kwargs)


def can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    name = f"drdfl-probe-{os.getpid()}"
    made = sh("ip", "netns", "add", name, check=False).returncode == 0
    if made:
        sh("ip", "netns", "del", name, check=False)
    return made


needs_netns = pytest.mark.skipif(
    not can_make_namespaces() or not shutil.which("openssl") or not shutil.which("ssh-keygen"),
    reason="needs root with ip netns, openssl and ssh-keygen",
)


class Network:
    """A bridge and one namespace per host on it; every host's address is its own."""

    def __init__(self, hosts: list[str]) -> None:
        tag = f"{os.getpid() % 10000}"
        self.subnet = random.randint(20, 250)
        self.bridge = f"drbr{tag}"
        self.namespaces = {host: f"drdfl-{host}-{tag}" for host in hosts}
        self.addresses = {host: f"10.{self.subnet}.0.{10 + i}" for i, host in enumerate(hosts)}
        try:
            self._build()
        except BaseException:
            self.remove()
            raise

    def _build(self) -> None:
        tag = self.bridge.removeprefix("drbr")
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for i, (host, ns) in enumerate(self.namespaces.items()):
            outside, inside = f"dv{tag}h{i}", f"dv{tag}n{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            sh("ip", "link", "set", inside, "netns", ns)
            sh("ip", "link", "set", outside, "master", self.bridge)
            sh("ip", "link", "set", outside, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addresses[host]}/24",
               "dev", inside)  # fmt: skip
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def run(self, host: str, *args: str, env: dict[str, str], check: bool = True, **kw):
        """A command on ``host`` (in its namespace), its output kept and printed."""
        done = sh("ip", "netns", "exec", self.namespaces[host], *args, env=env, check=False, **kw)
        print(done.stdout, end="")
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} on {host} failed: {done.stderr}")
        return done

    def remove(self) -> None:
        tag = self.bridge.removeprefix("drbr")
        for i, ns in enumerate(self.namespaces.values()):
            sh("ip", "netns", "del", ns, check=False)
            # the pair goes with the namespace, unless a process still holds it
            sh("ip", "link", "del", f"dv{tag}h{i}", check=False)
        sh("ip", "link", "del", self.bridge, check=False)


def environment(state: Path, flwr_home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "DEPLOY_DIR": str(state),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_DATASETS_OFFLINE": "1",
        "NODE_THREADS": "1",  # three devices share these 2 cores
        **extra,
    }


def device_data(folder: Path, rows: int) -> Path:
    """A device's own copy of the dataset: the first ``rows`` 8x8 digits, as parquet."""
    from drdfl_flwr.data import _digits_splits

    train, test = _digits_splits(0)
    folder.mkdir(parents=True)
    train.select(range(rows)).to_parquet(str(folder / "train.parquet"))
    test.to_parquet(str(folder / "test.parquet"))
    return folder


def nodes_online(network: Network, env: dict[str, str]) -> str | None:
    """``flwr supernode list`` on the SuperLink host, when it lists three nodes online."""
    listed = network.run(
        "superlink", "flwr", "supernode", "list", "drdfl", "--format", "json",
        env=env, check=False,
    ).stdout  # fmt: skip
    return listed if listed.count('"online"') == 3 else None


def process_group(state: Path, name: str) -> int:
    return int((state / f"{name}.pid").read_text())


@pytest.fixture
def network():
    net = Network(["superlink", "device0", "device1", "device2"])
    try:
        yield net
    finally:
        net.remove()
        leftovers = sh("ip", "netns", "list").stdout
        assert not any(ns in leftovers for ns in net.namespaces.values())


@needs_netns
def test_three_devices_by_address_survive_a_slow_link_a_freeze_and_a_superlink_restart(
    network, tmp_path
):
    link = network.addresses["superlink"]
    print(
        "hosts:", {h: f"{a} (netns {network.namespaces[h]})" for h, a in network.addresses.items()}
    )
    flwr_home = tmp_path / "flwr"
    link_state = tmp_path / "superlink-host"
    on_link = environment(link_state, flwr_home)
    devices = {k: tmp_path / f"device{k}" for k in range(3)}
    started: list[tuple[str, dict[str, str]]] = []  # (host, env) to stop at the end
    proxy = None
    try:
        # -- the SuperLink host: certificate for its address, the SuperLink, the CLI entry
        network.run("superlink", str(DEVICE), "certs", link, "superlink.test", env=on_link)
        san = sh("openssl", "x509", "-in", str(link_state / "certs/superlink.pem"), "-noout",
                 "-ext", "subjectAltName").stdout  # fmt: skip
        print(san)
        assert f"IP Address:{link}" in san and "DNS:superlink.test" in san and "127.0.0.1" in san
        network.run("superlink", str(DEVICE), "superlink", env=on_link)
        started.append(("superlink", on_link))
        network.run("superlink", str(DEVICE), "connection", link, env=on_link)
        delay_file = tmp_path / "delay"
        delay_file.write_text("0")
        proxy_log = tmp_path / "proxy.log"
        namespace = network.namespaces["superlink"]
        proxy = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, str(PROXY)]
            + ["--listen", f"{link}:{SLOW_PORT}", "--to", f"{link}:{PORT}"]
            + ["--delay-file", str(delay_file)],
            stdout=proxy_log.open("w"),
        )
        wait_for(lambda: "delaying" in proxy_log.read_text(), 30, "the proxy")

        # -- each device: the CA copied over, its own key pair, data, checkpoint folder
        for k, state in devices.items():
            state.mkdir()
            shutil.copy(link_state / "certs/ca.crt", state / "ca.crt")
            env = environment(state, tmp_path / f"flwr-device{k}", CA=str(state / "ca.crt"))
            if k == 2:
                env["PORT"] = str(SLOW_PORT)  # node 2 dials the proxy
            host = f"device{k}"
            network.run(host, str(DEVICE), "node-key", env=env)
            network.run("superlink", str(DEVICE), "register", str(state / "node-key.pub"),
                        env=on_link)  # fmt: skip
            data = device_data(state / "data", rows=900)
            # TLS by IP, from the device's namespace, with the CA the device holds
            handshake = network.run(
                host, "openssl", "s_client", "-connect", f"{link}:{PORT}", "-CAfile",
                str(state / "ca.crt"), "-verify_ip", link, "-brief",
                env=env, input="", check=False,
            )  # fmt: skip
            print(f"device{k} -> {link}:{PORT}: {handshake.stderr.strip()}")
            assert "Verification: OK" in handshake.stderr
            network.run(host, str(DEVICE), "supernode", link, str(k), "3", str(data), env=env)
            started.append((host, env))
        listed = wait_for(lambda: nodes_online(network, on_link), 120, "three online")
        print(listed)

        # -- the run, submitted on the SuperLink host
        results = tmp_path / "results"
        run_config = (
            f"num-server-rounds={ROUNDS} local-epochs=1 round-timeout={ROUND_TIMEOUT} "
            f'results-dir="{results}" run-name="multihost" data-dir=""'
        )

        def submit(extra: str = "") -> None:
            network.run("superlink", "flwr", "run", ".", "drdfl", "--run-config",
                        f"{run_config} {extra}".strip(), env=on_link, cwd=ROOT)  # fmt: skip

        submit()
        run_dir = results / "multihost"
        wait_for(lambda: len(records(run_dir)) >= 2, 600, "round 2")
        slowed_from = len(records(run_dir)) + 1
        delay_file.write_text(str(SLOW_DELAY))  # node 2's link slows down
        wait_for(lambda: len(records(run_dir)) >= slowed_from + 2, 600, "two slowed rounds")
        delay_file.write_text("0")
        slow_connections = proxy_log.read_text().count(f"(delay {SLOW_DELAY:g} s)")
        slowed_to = len(records(run_dir)) + 1  # (the round under way when it sped up)

        frozen = process_group(devices[1], "supernode")
        os.killpg(frozen, signal.SIGSTOP)  # device 1 freezes, processes and all
        frozen_at = time.monotonic()
        wait_for(lambda: any(r["failed"] == [1] for r in records(run_dir)), 600, "a bypass")
        time.sleep(max(0.0, ROUND_TIMEOUT + 5 - (time.monotonic() - frozen_at)))
        os.killpg(frozen, signal.SIGCONT)
        print(f"device 1 frozen for {time.monotonic() - frozen_at:.0f}s")
        wait_for(lambda: any(r["rejoined"] == [1] for r in records(run_dir)), 600, "rejoin")

        # -- the SuperLink host restarts its SuperLink mid-run; the run is resumed
        done_before = len(records(run_dir))
        network.run("superlink", str(DEVICE), "stop", env=on_link)
        interrupted = records(run_dir)
        network.run("superlink", str(DEVICE), "superlink", env=on_link)
        wait_for(lambda: nodes_online(network, on_link), 180, "the devices back online")
        submit("resume=true")
        wait_for(lambda: (run_dir / "summary.json").is_file(), 900, "the end of the run")
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
        for host, env in reversed(started):
            network.run(host, str(DEVICE), "stop", env=env, check=False)
        for state in [link_state, *devices.values()]:
            assert not list(state.glob("*.pid")), state

    rounds = records(run_dir)
    for r in rounds:
        print(
            f"round {r['round']:2d}: {r['seconds']:5.1f}s failed={r['failed']} "
            f"rejoined={r['rejoined']} node_ids={r['node_ids']} rounds_trained="
            f"{ {p: m.get('rounds_trained') for p, m in r['nodes'].items()} }"
        )
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert rounds[: len(interrupted)] == interrupted  # the resumed run kept what was written
    assert done_before < ROUNDS  # the restart did fall mid-run

    # every device trained on its own copy: 900 images over three, not the 1,347 embedded
    first = rounds[0]["nodes"]
    assert sum(m["num-examples"] for m in first.values()) == 900

    # the slow link: slower rounds, none timed out, nobody skipped for it
    normal = [r["seconds"] for r in rounds[1 : slowed_from - 1]]
    slowed = [r["seconds"] for r in rounds[slowed_from : slowed_to - 1]]
    print(
        f"round seconds without the slow link {normal}, with it {slowed} "
        f"({SLOW_DELAY} s each way per chunk; node 2 opened {slow_connections} connections "
        "through the proxy while it was slow)"
    )
    assert slowed and min(slowed) > max(normal)
    assert max(slowed) < ROUND_TIMEOUT
    assert all(2 not in r["failed"] for r in rounds)

    # the freeze: bypassed, then back in the ring with its state
    bypassed = [r["round"] for r in rounds if r["failed"] == [1]]
    back = [r["round"] for r in rounds if r["rejoined"] == [1]]
    assert bypassed and back and back[0] > bypassed[-1]
    trained = [r["nodes"].get("1", {}).get("rounds_trained") for r in rounds]
    before, at_rejoin = trained[bypassed[0] - 2], trained[back[0] - 1]
    # not from scratch: on from where it froze (+1 for the round it was frozen in, which
    # it finished on waking, too late for the relay: a node keeps training the relay
    # never recorded), then one more each round (+1 for the round the SuperLink restart
    # cut short, if the node had trained it)
    assert at_rejoin in (before + 1, before + 2)
    assert trained[-1] - at_rejoin in (ROUNDS - back[0], ROUNDS - back[0] + 1)

    # the restart: the nodes went on from their checkpoints, not from scratch, and the
    # round the killed run was in is not trained twice (a node whose checkpoint holds it
    # answers from its record): one round trained per round taken part in
    resumed = rounds[len(interrupted)]
    for partition in ("0", "2"):  # (they trained every round; 1 sat some out, frozen)
        assert resumed["nodes"][partition]["rounds_trained"] == resumed["round"]
