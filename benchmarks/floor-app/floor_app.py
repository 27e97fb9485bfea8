"""The polling floor of a Flower 1.41 deployment: every round sends each node an empty
train message and waits for its empty reply. What a round costs here (the SuperNode's
3 s idle poll, SuperExec's 1 s task poll, starting a flwr-clientapp process, the gRPC
hops, the ServerApp's look for replies) is what any app pays; ours pays it plus its own
work. ``poll = "flower"`` waits with Flower's Grid.send_and_receive (3 s between looks),
``"fast"`` with drdfl-flwr's exchange (REPLY_POLL_SECONDS), so both floors are known."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def reply(msg: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=msg)


def fast_exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    from strategies.rounds import exchange  # the installed drdfl-flwr's

    return exchange(grid, messages, timeout)


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    wanted = int(context.run_config["num-nodes"])
    while len(nodes := list(grid.get_node_ids())) < wanted:
        time.sleep(0.5)
    seconds = []
    for server_round in range(1, rounds + 1):
        started = time.monotonic()
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in nodes
        ]
        if context.run_config["poll"] == "fast":
            replies = fast_exchange(grid, messages, 300)
        else:
            replies = list(grid.send_and_receive(messages, timeout=300))
        seconds.append(time.monotonic() - started)
        print(f"floor round {server_round}: {seconds[-1]:.2f}s, {len(replies)} replies")
    Path(str(context.run_config["out"])).write_text(json.dumps(seconds))
