"""A Grid that delivers every message to the app's real ClientApp in this process.

The ServerApp's round loop pushes messages and pulls replies through a
:class:`flwr.serverapp.Grid`; Flower's simulation engine answers them from ClientApps in
Ray actors, a deployment from SuperNodes. :class:`ClientAppGrid` answers them by calling
``drdfl_flwr.client_app.app`` (the ClientApp ``flwr run`` loads) with one persistent
:class:`flwr.app.Context` per node, as a SuperNode would: its node config names the
partition, its run config is the run's, its ``state`` lives from message to message.
Every message and every reply goes through Flower's wire format on the way, so nothing
is shared by reference between the server and the nodes. No Ray, no processes: the whole
server path of a run in seconds (tests/test_every_method_inprocess.py).

A handler that raises fails the test with its own traceback (Flower would turn it into
an error reply and the round loop would skip the node).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid

from drdfl_flwr.client_app import app as CLIENT_APP


def over_the_wire(message: Message) -> Message:
    """The message as the other side receives it: serialized and parsed again."""
    return message_from_proto(message_to_proto(message))


class ClientAppGrid(Grid):
    """``num_nodes`` SuperNodes in this process, each answering with ``client_app``."""

    def __init__(
        self,
        run_config: dict,
        num_nodes: int,
        run_id: int = 1,
        client_app: ClientApp = CLIENT_APP,
    ):
        self.run_id = run_id
        self.client_app = client_app
        # node ids deliberately not in partition order, as Flower's are not
        self.contexts = {
            5000 + 11 * (num_nodes - p): Context(
                run_id=run_id,
                node_id=5000 + 11 * (num_nodes - p),
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for p in range(num_nodes)
        }
        self.pending: dict[str, Message] = {}
        self.pushed = 0
        self.handled: Counter[str] = Counter()  # message type -> messages answered

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            self.pushed += 1
            message_id = f"m{self.pushed}"
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self.run_id
            self.pending[message_id] = over_the_wire(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Every pending message asked for is answered now, by its node's ClientApp."""
        replies = []
        for message_id in message_ids:
            message = self.pending.pop(message_id, None)
            if message is None:
                continue
            context = self.contexts[message.metadata.dst_node_id]
            run_config = dict(context.run_config)
            reply = self.client_app(message, context)
            assert dict(context.run_config) == run_config, "a handler changed the run config"
            self.handled[message.metadata.message_type] += 1
            reply = over_the_wire(reply)
            reply.metadata.__dict__["_reply_to_message_id"] = message_id
            replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    # the round loop never uses these
    def set_run(self, run_id):  # pragma: no cover
        self.run_id = run_id

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError
