"""A TCP proxy that holds every chunk for a set time before passing it on: a slow link
between one SuperNode and the SuperLink, for tests (this kernel has no ``netem``).

    python tests/delay_proxy.py --listen 10.0.0.10:8100 --to 10.0.0.10:8000 \\
        --delay-file /tmp/delay

Each direction keeps its order; each chunk leaves ``delay`` seconds after it arrived, so
a request and its response each take the delay once more than without the proxy. The
delay, in seconds, is read from ``--delay-file`` (missing or empty: 0) whenever a chunk
arrives, so a test can slow the link down and speed it up mid-run. TLS passes through
untouched: the SuperNode still verifies the SuperLink's certificate by the address it
dials. Each connection it accepts is a line on stdout (``connection N (delay D s)``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
from pathlib import Path


def read_delay(path: Path | None) -> float:
    if path is None:
        return 0.0
    try:
        return max(0.0, float(path.read_text().strip() or 0))
    except (OSError, ValueError):
        return 0.0


async def pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_file: Path | None
) -> None:
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def take() -> None:
        while True:
            chunk = await reader.read(1 << 16)
            await held.put((loop.time() + read_delay(delay_file), chunk))
            if not chunk:
                return

    async def give() -> None:
        while True:
            due, chunk = await held.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not chunk:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        await asyncio.gather(take(), give())


def refuse(writer: asyncio.StreamWriter) -> None:
    """Close with a reset, as a routed link to a host that is down answers (connection
    refused), not with a clean close, which a TLS client reads as a broken handshake
    (and Flower 1.41's SuperNode then gives up for good: docs/devices.md)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def serve(listen: str, target: str, delay_file: Path | None) -> None:
    to_host, to_port = target.rsplit(":", 1)

    connections = 0
    # asyncio keeps only weak references to tasks: a connection's task waiting on its own
    # queue would be collected mid-transfer ("Task was destroyed but it is pending")
    running: set[asyncio.Task] = set()

    async def handle(client_reader, client_writer) -> None:
        nonlocal connections
        connections += 1
        task = asyncio.current_task()
        running.add(task)
        task.add_done_callback(running.discard)
        print(f"connection {connections} (delay {read_delay(delay_file):g} s)", flush=True)
        try:
            server_reader, server_writer = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            refuse(client_writer)
            return
        await asyncio.gather(
            pipe(client_reader, server_writer, delay_file),
            pipe(server_reader, client_writer, delay_file),
        )
        for writer in (client_writer, server_writer):
            writer.close()

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port))
    print(f"delaying {listen} -> {target}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to accept on")
    parser.add_argument("--to", required=True, help="host:port to pass to")
    parser.add_argument("--delay-file", type=Path, help="seconds per chunk and direction")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.to, args.delay_file))


if __name__ == "__main__":
    main()
