"""The slow link of the multi-host test (tests/delay_proxy.py) delays, keeps order, and
can be slowed down and sped up while connections are open."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PROXY = Path(__file__).with_name("delay_proxy.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_server() -> int:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def round_trip(conn: socket.socket, message: bytes) -> float:
    started = time.perf_counter()
    conn.sendall(message)
    got = b""
    while len(got) < len(message):
        got += conn.recv(1 << 16)
    assert got == message
    return time.perf_counter() - started


def test_each_direction_is_held_for_the_delay_in_the_file_read_as_chunks_come(tmp_path):
    delay_file = tmp_path / "delay"
    delay_file.write_text("0")
    listen = free_port()
    proxy = subprocess.Popen(
        [sys.executable, str(PROXY), "--listen", f"127.0.0.1:{listen}"]
        + ["--to", f"127.0.0.1:{echo_server()}", "--delay-file", str(delay_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout.readline().startswith("delaying")
        with socket.create_connection(("127.0.0.1", listen), timeout=10) as conn:
            fast = round_trip(conn, b"x" * 1000)
            delay_file.write_text("0.3")  # slowed down mid-connection
            slow = [round_trip(conn, bytes([i]) * 50_000) for i in range(3)]
            delay_file.write_text("")
            again = round_trip(conn, b"y" * 1000)
        assert fast < 0.2 and again < 0.2
        assert all(0.6 <= s < 1.5 for s in slow), slow  # 0.3 s each way
    finally:
        proxy.kill()
        proxy.wait()


def test_with_nothing_behind_it_the_proxy_resets_the_connection_as_a_refusal_would(tmp_path):
    listen = free_port()
    proxy = subprocess.Popen(
        [sys.executable, str(PROXY), "--listen", f"127.0.0.1:{listen}"]
        + ["--to", f"127.0.0.1:{free_port()}"],  # nobody listens there
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout.readline().startswith("delaying")
        # the proxy resets as soon as it has accepted, so under load the reset can reach
        # the client while it connects or sends, not only when it reads
        try:
            with socket.create_connection(("127.0.0.1", listen), timeout=10) as conn:
                conn.sendall(b"hello")
                got = conn.recv(10)
        except (ConnectionResetError, BrokenPipeError):
            got = None
        assert got is None  # a reset, not a clean end of stream (b"")
    finally:
        proxy.kill()
        proxy.wait()
