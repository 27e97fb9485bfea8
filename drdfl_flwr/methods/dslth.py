"""DSLTH / MCE-PL (paper 003, released code ZhuoJTian/MCE-PL): personalized binary masks
over shared fixed random weights.

Every node builds the same fixed random weights ``w`` from the run seed (they never
cross the wire) and learns private real-valued scores ``z``; its model is ``w * m``,
where ``m`` keeps the top fraction of the fused scores ``|y|`` per layer,
``y = z + mean|z| * sign(z) * m_bar``, recomputed in every forward pass from the current
scores and the mean ``m_bar`` of the latest received masks (see
:mod:`drdfl_flwr.models.masked`). Absorbing masks changes ``m_bar`` only; the scores
are never overwritten by the fusion.

Keep ratios: ``dslth.keep-ratio-conv`` (0.3) for convolutions and ``dslth.keep-ratio-fc``
(0.9) for dense layers, as released; ``dslth-keep-ratios`` gives nodes their own
(node heterogeneity).

One round (``dslth-procedure = "released"``, the release's ``train_MCE.py``):

1. on receipt of the neighbours' new masks, the personalized fine-tuning step of the
   previous round: ``z <- z - dslth-finetune-scale * g * m_bar_new`` (the release's factor
   10), ``g`` being the score gradient of the previous round's training step;
2. one SGD step (lr ``dslth-score-lr`` = 10, momentum 0, weight decay 5e-4) on **one**
   mini-batch of ``batch-size`` local samples (the release: 128), fusing with those masks;
3. the binary mask top-r(|y|) is sent, packed 1 bit per entry.

On a synchronous graph this is the release's order exactly: the fine-tuning of round t
uses round t's gradient and the masks the neighbours sent in round t.

``dslth-procedure = "epochs"`` replaces step 2 by ``local-epochs`` epochs of the same
SGD steps (``g`` is then the last step's gradient): more local computation per
exchanged mask, for short runs.

Where it is scored. The release scores every client after the fine-tuning step, with
the new masks (``train_MCE.py``: ``client_update`` -> ``get_new_masks`` ->
``update_localpop`` -> ``run_test``). A node here runs absorb -> fit -> evaluate ->
send, and the masks of round t reach it only with round t + 1's message, so the
fine-tuned model of round t exists only between absorb and fit of round t + 1. ``fit``
therefore keeps a copy of the scores it starts from (what absorb's fine-tuning left,
fused with the masks just received, which fit does not change), and with
``dslth.scored-at = "release"`` :meth:`evaluate` scores the network with those scores
(:meth:`scored_model`), not with the ones the round's SGD step has just moved. The
default, ``"trained"``, scores the model the round's training produced, as every other
method is scored (a comparison table scores every method after the same local rounds).
With ``"release"``, the Local-T / Global-T a node reports in round t + 1 are thus the
release's scores of its round t, computed on the same model; round 1
reports the untrained network (the release has no score for it), and a run of R + 1
rounds reports the release's R scored rounds (``conf/dslth-released.toml``: 401).
The same holds for ``dslth-procedure = "epochs"``. Without a ``fit`` since the last
absorb (an evaluation message), :meth:`evaluate` scores the current model.

Before any mask arrives, every node fuses with the same initial neighbour mask, drawn
from the run seed only (:func:`initial_mask_seed`), as the release hands one
``mask_list`` to every client. An isolated node (``isolated = true``) fuses with nothing:
its m_bar is 0, so it trains a plain supermask, the clean no-sharing control.

An optional group lasso ``lambda * sum_filters ||y_filter||_2`` (``dslth-group-lasso``)
is added to the loss (the release only logs it; lambda = 0 reproduces that).

Health, every round: mean |score| per layer (bounded: weight decay, no fusion writes),
the fraction of this node's kept entries that the received masks also keep
(``health_mask_overlap``), and the fraction of mask bits that flipped since the mask
sent the round before (``health_bits_flipped``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from drdfl_flwr.bitpack import pack_bits, unpack_bits
from drdfl_flwr.config import ConfigError, MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner, LossMeans
from drdfl_flwr.models.masked import WEIGHT_INITS, build_masked_classifier
from drdfl_flwr.payload import Incoming, PayloadError, Tensors
from drdfl_flwr.spec import MethodSpec

MASK_PREFIX = "mask."
PROCEDURES = ("released", "epochs")
SCORED_AT = ("trained", "release")


@dataclass(frozen=True)
class DSLTHOptions(MethodOptions):
    """Section ``[dslth]``: defaults are the release's (ZhuoJTian/MCE-PL)."""

    SECTION: ClassVar[str] = "dslth"
    procedure: str = "released"
    keep_ratio_conv: float = 0.3
    keep_ratio_fc: float = 0.9
    keep_ratios: str = ""
    score_lr: float = 10.0
    weight_decay: float = 5e-4
    finetune_scale: float = 10.0
    group_lasso: float = 0.0
    weight_init: str = "kaiming-uniform"
    scored_at: str = "trained"

    def __post_init__(self) -> None:
        self.check_choice("procedure", PROCEDURES)
        self.check_choice("scored-at", SCORED_AT)
        self.check_unit("keep-ratio-conv", "keep-ratio-fc", open_low=True)
        self.node_keep_ratio_list()  # raises on malformed entries
        self.check_positive("score-lr")
        self.check_non_negative("weight-decay", "finetune-scale", "group-lasso")
        self.check_choice("weight-init", WEIGHT_INITS)

    def node_keep_ratio_list(self) -> list[tuple[float, float]]:
        """``keep-ratios`` as (conv, fc) pairs, one per node, cycled over partition ids.

        Each comma-separated entry is ``conv/fc`` or ``conv`` (fc then stays
        ``keep-ratio-fc``). Empty: every node uses the two global ratios.
        """
        pairs = []
        for entry in (e.strip() for e in self.keep_ratios.split(",")):
            if not entry:
                continue
            conv, _, fc = entry.partition("/")
            try:
                pair = (float(conv), float(fc) if fc else self.keep_ratio_fc)
            except ValueError:
                self.fail("keep-ratios", f"entry {entry!r} is not 'conv' or 'conv/fc' numbers")
            if not all(0.0 < r <= 1.0 for r in pair):
                self.fail("keep-ratios", "every ratio must lie in (0, 1]")
            pairs.append(pair)
        return pairs


def keep_ratios_for(opts: DSLTHOptions, partition_id: int) -> tuple[float, float]:
    """This node's (conv, fc) keep ratios: ``keep-ratios[partition_id % len]`` if set,
    else (``keep-ratio-conv``, ``keep-ratio-fc``)."""
    pairs = opts.node_keep_ratio_list()
    if pairs:
        return pairs[partition_id % len(pairs)]
    return opts.keep_ratio_conv, opts.keep_ratio_fc


def initial_mask_seed(seed: int) -> int:
    """The seed of the initial neighbour mask: the run seed's, the same on every node, and
    a stream of its own (neither the fixed weights' ``seed`` nor any node's scores)."""
    digest = hashlib.sha256(f"dslth:initial-neighbour-mask:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DSLTHLearner(Learner):
    OPTIONS = DSLTHOptions

    # the mask a node sends is the top of its own scores; the fixed weights and the
    # initial neighbour mask are common (tests/test_dslth.py)
    NODE_SPECIFIC = (MASK_PREFIX,)

    def setup(self) -> None:
        cfg, partition_id = self.cfg, self.partition_id
        self.keep_ratios = keep_ratios_for(self.opts, partition_id)
        try:
            net = build_masked_classifier(
                cfg.classifier,
                self.input_shape,
                self.num_classes,
                self.keep_ratios,
                weight_seed=cfg.seed,  # shared by every node: the fixed weights
                score_seed=cfg.seed * 1_000_033 + 7_919 * partition_id + 1,  # private
                mask_seed=initial_mask_seed(cfg.seed),  # shared: the initial m_bar
                init=self.opts.weight_init,
            )
        except ValueError as err:
            raise ConfigError("classifier", cfg.classifier, str(err)) from None
        self.net = net.to(self.device)
        if cfg.isolated:
            # No neighbour, no fusion: m_bar = 0 makes y = z, plain supermask training
            # (a frozen random initial m_bar would still steer every node's mask).
            self.net.set_neighbour_masks(
                {
                    name: torch.zeros_like(layer.neighbour_mean)
                    for name, layer in self.net.masked_layers().items()
                }
            )
        self.optimizer = torch.optim.SGD(
            self.net.parameters(),
            lr=self.opts.score_lr,
            momentum=0.0,
            weight_decay=self.opts.weight_decay,
        )
        # The scores this round's fit started from: the model the release scores.
        self.scored_scores: dict[str, torch.Tensor] | None = None

    # -- communication -------------------------------------------------------------
    def private_state(self) -> Tensors:
        """The real-valued scores the masks are cut from, and their last gradients."""
        return {
            f"net.{k}": v
            for k, v in self.net.state_dict().items()
            if k.endswith((".scores", ".last_grad"))
        }

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Payload key -> shape of that layer's mask (known to every node alike)."""
        return {
            MASK_PREFIX + name: tuple(layer.weight.shape)
            for name, layer in self.net.masked_layers().items()
        }

    def shared_payload(self) -> Tensors:
        return {
            MASK_PREFIX + name: pack_bits(layer.binary_mask())
            for name, layer in self.net.masked_layers().items()
        }

    def paper_payload_bits(self) -> int:
        """The paper's communication count: ones in the mask, 1 bit each."""
        return int(
            sum(layer.binary_mask().sum().item() for layer in self.net.masked_layers().values())
        )

    def decode_payload(self, payload: Tensors) -> dict[str, torch.Tensor]:
        """The bool masks in ``payload``, by layer name; :class:`PayloadError` if malformed."""
        if not isinstance(payload, dict):
            raise PayloadError(f"DSLTH payload must be a dict of tensors, got {type(payload)}")
        shapes = self.layer_shapes()
        missing = sorted(set(shapes) - set(payload))
        extra = sorted(set(payload) - set(shapes))
        if missing or extra:
            raise PayloadError(
                f"DSLTH payload keys differ: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        return {
            key.removeprefix(MASK_PREFIX): unpack_bits(payload[key], shape, name=key)
            for key, shape in shapes.items()
        }

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Store the received masks' mean as m_bar, then run the fine-tuning step."""
        if not incoming:
            return
        decoded = [self.decode_payload(i.tensors) for i in incoming]  # validate all, change nothing
        means = {
            name: torch.stack([d[name] for d in decoded]).float().mean(0)
            for name in self.net.masked_layers()
        }
        self.net.set_neighbour_masks(means)
        self.net.has_received.fill_(True)
        if bool(self.net.has_grad):
            self.finetune()
        self.scored_scores = None  # the current model is now the fine-tuned one

    @torch.no_grad()
    def finetune(self) -> None:
        """z <- z - scale * g * m_bar: the previous step's gradient, restricted to the
        entries the neighbours keep (the release's personalized fine-tuning)."""
        scale = self.opts.finetune_scale
        for layer in self.net.masked_layers().values():
            layer.scores.sub_(scale * layer.last_grad * layer.neighbour_mean)

    # -- training --------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        ce = F.cross_entropy(self.net(x), y)
        loss = ce
        parts = {"l_ce": ce.item()}
        if self.opts.group_lasso > 0:
            penalty = self.net.group_lasso()
            loss = loss + self.opts.group_lasso * penalty
            parts["l_group_lasso"] = penalty.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for layer in self.net.masked_layers().values():
                layer.last_grad.copy_(layer.scores.grad)
        self.optimizer.step()
        self.net.has_grad.fill_(True)
        return parts

    def train_round(self, data: ClientData) -> dict[str, float]:
        # What absorb's fine-tuning left, with the masks just received: scored this round.
        self.scored_scores = {
            name: layer.scores.detach().clone() for name, layer in self.net.masked_layers().items()
        }
        self.net.train()
        losses = LossMeans()
        batches = self.batches(data, self.round_generator())
        if self.opts.procedure == "released":
            batches = iter([next(batches)]) if len(data.y_train) else iter([])
        for x, y in batches:
            losses.add(self.step(x, y))
        metrics = losses.means()
        # The paper's communication count (ones x 1 bit), beside the relay's wire bytes.
        metrics["paper_payload_bytes"] = self.paper_payload_bits() / 8
        metrics["keep_ratio_conv"], metrics["keep_ratio_fc"] = self.keep_ratios
        metrics.update(self.mask_health())
        with torch.no_grad():  # what is sent this round, to count flipped bits next round
            for layer in self.net.masked_layers().values():
                layer.last_sent.copy_(layer.binary_mask())
            self.net.has_sent.fill_(True)
        return metrics

    @torch.no_grad()
    def mask_health(self) -> dict[str, float]:
        """Scores bounded, masks moving, masks sharing entries with the neighbours'."""
        metrics: dict[str, float] = {}
        kept = overlap = flipped = entries = 0.0
        score_abs_sum = 0.0
        for name, layer in self.net.masked_layers().items():
            mask = layer.binary_mask()
            score_abs = layer.scores.abs().mean().item()
            metrics[f"health_score_abs.{name}"] = score_abs
            score_abs_sum += layer.scores.abs().sum().item()
            kept += mask.sum().item()
            overlap += (mask.float() * layer.neighbour_mean).sum().item()
            flipped += (mask != layer.last_sent).sum().item()
            entries += mask.numel()
        metrics["health_score_abs_mean"] = score_abs_sum / entries
        if bool(self.net.has_received):
            metrics["health_mask_overlap"] = overlap / max(kept, 1.0)
        if bool(self.net.has_sent):
            metrics["health_bits_flipped"] = flipped / entries
        return metrics

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.net(x)

    @contextmanager
    def scored_model(self) -> Iterator[None]:
        """Inside: the network as the release scores it, i.e. with the scores this round's
        :meth:`fit` started from (after the fine-tuning step with the new masks); the
        current scores are put back on exit. The current model if no fit ran since the
        last absorb."""
        if self.scored_scores is None:
            yield
            return
        layers = self.net.masked_layers()
        current = {name: layer.scores.detach().clone() for name, layer in layers.items()}
        with torch.no_grad():
            for name, layer in layers.items():
                layer.scores.copy_(self.scored_scores[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.scores.copy_(current[name])

    def evaluate(self, data: ClientData) -> dict[str, float]:
        """``dslth.scored-at = "trained"`` (default): the model this round's training
        produced, as every other method is scored, after the same number of local
        rounds. ``"release"``: after the fine-tuning step with the new masks, as the
        release scores them (see the module docstring): the model :meth:`fit` started
        from this round, one local round behind."""
        if self.opts.scored_at == "trained":
            return super().evaluate(data)
        with self.scored_model():
            return super().evaluate(data)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.net.check_weights()
        self.scored_scores = None


SPEC = MethodSpec(
    name="dslth",
    title="DSLTH",
    sends="binary top-r mask of every layer, bit-packed (1 bit per weight)",
    keeps=(
        "real-valued scores z the mask is cut from; the fixed random weights are built from the "
        "run seed on every node and never sent"
    ),
    personalized="binary mask (scores)",
    learner=DSLTHLearner,
    classifiers=("small-cnn", "alexnet-dslth"),
    # no reducer: a bit-packed mask is never averaged by anyone but its receiver
)
