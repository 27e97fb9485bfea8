"""DFedPGP (arXiv 2405.17876; code YingqiLiu1999/DFedPGP): decentralized partial
personalization. The classifier's last linear layer is the node's personal head and never
leaves it; everything else (the body) is shared with the out-neighbours and averaged.

One round for node i (release: ``dfedpgp_api.py``, ``client.py``, ``my_model_trainer.py``):

1. ``absorb``: body <- uniform average (weight 1 / |set|, as released; the senders'
   example counts are ignored) over {own body} U the bodies received from the
   in-neighbours the topology names (ring, bi-ring, full, random-k); the own head is
   kept bit for bit.
2. ``fit``: ``dfedpgp.head-epochs`` epochs on the head with the body frozen, then
   ``dfedpgp.body-epochs`` epochs on the body with the head frozen (release: 1 and 5).
3. The payload is the body: every floating-point state entry except the head's.

Where we deviate from the release, and why:

- Optimizer: Adam at ``learning-rate`` for both phases (one persistent Adam per part, so
  its moments survive between rounds through the node's state). The release uses SGD,
  momentum 0.9, weight decay 5e-4, lr_head = 0.001 * 0.99^t and lr_body = 0.1 * 0.99^t,
  with gradient-norm clipping at 10. The project runs every method on the small CNN
  with the same Adam so that the comparison measures the methods, not their optimizers.
- ``local-epochs`` is not used: the two phase lengths are DFedPGP's own keys.
- Neighbour choice belongs to the relay's topology (``random-k`` draws k in-neighbours
  per round and node from the run seed, like the release's ``cs=random`` with seed t + i).
- "Body frozen" in the head phase includes BatchNorm running statistics (with
  ``classifier-norm = "batch"``; the release's GroupNorm has none): norm layers run in
  eval mode during the head phase, so the head phase changes the head and nothing else.

Health, every round: ``health_body_spread``, the mean relative distance
||body_j - body_own|| / ||body_own|| of the received bodies before averaging (0 with
nothing received): the disagreement that the averaging removes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from baselines.common import HeadBodyLearner
from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.payload import Incoming, check_payload
from drdfl_flwr.spec import MethodSpec


@dataclass(frozen=True)
class DFedPGPOptions(MethodOptions):
    """Section ``[dfedpgp]``: phase lengths as released (``--head_epochs``, ``--body_epochs``)."""

    SECTION: ClassVar[str] = "dfedpgp"
    head_epochs: int = 1
    body_epochs: int = 5

    def __post_init__(self) -> None:
        self.check_non_negative("head-epochs", "body-epochs")
        if self.head_epochs + self.body_epochs == 0:
            self.fail("body-epochs", "head-epochs and body-epochs cannot both be 0")


class _NormStatsFrozen(nn.Module):
    """The classifier as seen by the head phase: ``train()`` leaves BatchNorm layers in
    eval mode, so the frozen body's running statistics do not move either."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def train(self, mode: bool = True) -> _NormStatsFrozen:
        super().train(mode)
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DFedPGPLearner(HeadBodyLearner):
    """Private head (last linear layer), body averaged uniformly with the in-neighbours."""

    OPTIONS = DFedPGPOptions

    def setup(self) -> None:
        super().setup()
        self._body_spread = 0.0  # computed by absorb, reported by the same round's fit

    @torch.no_grad()
    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Body <- mean over {own} U received bodies (uniform); the head is untouched."""
        self._body_spread = 0.0
        if not incoming:
            return
        own = self.shared_payload()
        for item in incoming:
            check_payload(item.tensors, own)  # missing, extra (a head key), shape, NaN
        spreads = []
        for item in incoming:
            diff = sum(
                float((item.tensors[k].float() - v.float()).pow(2).sum()) for k, v in own.items()
            )
            norm = sum(float(v.float().pow(2).sum()) for v in own.values())
            spreads.append(math.sqrt(diff) / max(math.sqrt(norm), 1e-12))
        self._body_spread = sum(spreads) / len(spreads)
        averaged = {
            key: torch.stack(
                [value, *(item.tensors[key].to(value.dtype) for item in incoming)]
            ).mean(0)
            for key, value in own.items()
        }
        self.load_shared(averaged)

    def train_round(self, data: ClientData) -> dict[str, float]:
        gen = self.round_generator()
        opts = self.opts
        head_loss, head_steps = self.train_only(
            self.head_params,
            self.head_optimizer,
            data,
            gen,
            opts.head_epochs,
            model=_NormStatsFrozen(self.classifier),
        )
        body_loss, body_steps = self.train_only(
            self.body_params, self.body_optimizer, data, gen, opts.body_epochs
        )
        metrics = {
            "l_ce": body_loss if body_steps else head_loss,
            "local_steps": float(head_steps + body_steps),
            "health_body_spread": self._body_spread,
        }
        if head_steps:
            metrics["l_ce_head"] = head_loss
        if body_steps:
            metrics["l_ce_body"] = body_loss
        self._body_spread = 0.0
        return metrics


SPEC = MethodSpec(
    name="dfedpgp",
    title="DFedPGP",
    sends="the body (all but the last layer)",
    keeps="the head (last linear layer)",
    personalized="output layer (head)",
    learner=DFedPGPLearner,
)
