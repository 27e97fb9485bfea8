"""Binary masks <-> 1 bit per entry on the wire (``numpy.packbits``, big-endian bit order).

A mask of ``n`` entries becomes a flat ``uint8`` tensor of ``ceil(n / 8)`` bytes; the shape
is not sent, because the receiver knows it from its own (identical) layer. The unused
low bits of the last byte must be zero, so a packed mask has exactly one valid encoding
and a corrupted tail is caught rather than silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from drdfl_flwr.payload import PayloadError


def packed_length(num_entries: int) -> int:
    """Bytes that ``num_entries`` bits take: ceil(n / 8)."""
    return (int(num_entries) + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a binary mask (bool, or 0/1 of any dtype) into a uint8 tensor, 8 entries a byte."""
    flat = mask.detach().flatten().cpu()
    if flat.dtype != torch.bool:
        if not bool(((flat == 0) | (flat == 1)).all()):
            raise ValueError("pack_bits expects a binary mask (only 0 and 1)")
        flat = flat != 0
    return torch.from_numpy(np.packbits(flat.numpy()))


def unpack_bits(packed: torch.Tensor, shape: Sequence[int], name: str = "mask") -> torch.Tensor:
    """The bool mask of ``shape`` packed in ``packed``; :class:`PayloadError` if it cannot be.

    Checks the dtype (uint8), the rank (1-D), the length (ceil(n / 8)) and that the
    padding bits of the last byte are zero before decoding anything.
    """
    if not isinstance(packed, torch.Tensor):
        raise PayloadError(f"payload '{name}' is a {type(packed).__name__}, not a tensor")
    if packed.dtype != torch.uint8:
        raise PayloadError(f"payload '{name}' has dtype {packed.dtype}, expected torch.uint8")
    if packed.dim() != 1:
        raise PayloadError(
            f"payload '{name}' has shape {tuple(packed.shape)}, expected a flat byte tensor"
        )
    n = math.prod(shape)
    expected = packed_length(n)
    if packed.numel() != expected:
        raise PayloadError(
            f"payload '{name}' holds {packed.numel()} bytes, expected {expected} "
            f"(ceil({n} entries / 8) for shape {tuple(shape)})"
        )
    spare = expected * 8 - n
    data = packed.detach().cpu().numpy()
    if spare and int(data[-1]) & ((1 << spare) - 1):
        raise PayloadError(f"payload '{name}' has non-zero padding bits in its last byte")
    bits = np.unpackbits(data, count=n).astype(bool)
    return torch.from_numpy(bits).view(*shape)
