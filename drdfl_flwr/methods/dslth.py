"""DSLTH / MCE-PL (paper 003): personalized binary masks over shared fixed random weights.

Every node builds the same fixed random weights ``w`` from the run seed (they never
cross the wire) and learns private real-valued scores ``s``; its model is
``w * m(s)``, ``m`` keeping the top ``r`` fraction of ``|s|`` per layer, trained with
straight-through gradients (see :mod:`drdfl_flwr.models.masked`). ``r`` may differ per
node (node heterogeneity): ``dslth-keep-ratios`` lists one ratio per partition.
An optional group lasso ``lambda * sum_filters ||s_filter||_2`` (``dslth-group-lasso``)
pushes whole filters out of the mask (structured sparsity).

Shared each round: the binary mask, 1 bit per entry (``numpy.packbits``, one uint8
tensor per layer, key ``mask.<layer>``; the shape is implied by the receiver's own,
identical layer). :meth:`DSLTHLearner.paper_payload_bits` gives the paper's count
(the number of ones, 1 bit each) beside the bytes the relay measures on the wire.

On receipt (:meth:`absorb`) the masks are fused into the scores through the paper's
intermediate tensor, per layer ``y = s + mean|s| * sign(s) * mean_j(m_j)``, ``s <- y``;
then :meth:`fit` first runs ``dslth-finetune-steps`` mini-batch steps of personalized
fine-tuning of the scores on local data, followed by the usual ``local-epochs`` of
local training. Both steps train the scores only; ``w`` never changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice

import torch
import torch.nn.functional as F

from drdfl_flwr.bitpack import pack_bits, unpack_bits
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.models.masked import build_masked_classifier
from drdfl_flwr.payload import PayloadError, Tensors

MASK_PREFIX = "mask."


def keep_ratio_for(cfg: RunConfig, partition_id: int) -> float:
    """This node's r: ``dslth-keep-ratios[partition_id % len]`` if set, else
    ``dslth-keep-ratio``."""
    ratios = cfg.keep_ratio_list()
    if ratios:
        return ratios[partition_id % len(ratios)]
    return cfg.dslth_keep_ratio


class DSLTHLearner(Learner):
    def setup(self) -> None:
        cfg, input_shape, num_classes = self.cfg, self.input_shape, self.num_classes
        partition_id = self.partition_id
        self.keep_ratio = keep_ratio_for(cfg, partition_id)
        self.group_lasso = cfg.dslth_group_lasso
        self.finetune_steps = cfg.dslth_finetune_steps
        try:
            net = build_masked_classifier(
                cfg.classifier,
                input_shape,
                num_classes,
                self.keep_ratio,
                weight_seed=cfg.seed,  # shared by every node: the fixed weights
                score_seed=cfg.seed * 1_000_033 + 7_919 * partition_id + 1,  # private
                init=cfg.dslth_weight_init,
            )
        except ValueError as err:
            raise ConfigError("classifier", cfg.classifier, str(err)) from None
        self.net = net.to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.learning_rate)

    # -- communication -------------------------------------------------------------
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

    def mask_entries(self) -> int:
        """Entries of the whole mask (bits on the wire before byte padding and headers)."""
        return sum(layer.num_entries for layer in self.net.masked_layers().values())

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

    def absorb(self, payloads: Sequence[Tensors]) -> None:
        if not payloads:
            return
        decoded = [self.decode_payload(p) for p in payloads]  # validate all, change nothing
        with torch.no_grad():
            for name, layer in self.net.masked_layers().items():
                mean_mask = torch.stack([d[name] for d in decoded]).float().mean(0)
                s = layer.scores
                # y = s + mean|s| * sign(s) * mean_j(m_j): entries the neighbours keep grow
                # in magnitude, so they are more likely to enter this node's top-r.
                s.add_(s.abs().mean() * s.sign() * mean_mask.to(s.device))
            self.net.pending_finetune.fill_(True)

    # -- training --------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        ce = F.cross_entropy(self.net(x), y)
        loss = ce
        parts = {"l_ce": ce.item()}
        if self.group_lasso > 0:
            penalty = self.net.group_lasso()
            loss = loss + self.group_lasso * penalty
            parts["l_group_lasso"] = penalty.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return parts

    def endless_batches(
        self, data: ClientData, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.batches(data, generator)

    def fit(self, data: ClientData) -> dict[str, float]:
        self.net.train()
        sums: dict[str, float] = {}
        steps: dict[str, int] = {}

        def record(prefix: str, parts: dict[str, float]) -> None:
            for k, v in parts.items():
                key = k if not prefix else f"{prefix}_{k}"
                sums[key] = sums.get(key, 0.0) + v
                steps[key] = steps.get(key, 0) + 1

        generator = self.round_generator()
        if len(data.y_train) and bool(self.net.pending_finetune) and self.finetune_steps:
            # Personalized fine-tuning right after fusion (paper 003, section III-C).
            for x, y in islice(self.endless_batches(data, generator), self.finetune_steps):
                record("finetune", self.step(x, y))
        self.net.pending_finetune.fill_(False)
        for x, y in self.batches(data, generator):
            record("", self.step(x, y))
        self.rounds_trained += 1
        metrics = {k: v / steps[k] for k, v in sums.items()}
        # The paper's communication count (ones x 1 bit), beside the relay's wire bytes.
        metrics["paper_payload_bytes"] = self.paper_payload_bits() / 8
        metrics["keep_ratio"] = self.keep_ratio
        return metrics

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.net(x)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.net.check_weights()
