"""8-bit float activations with one float32 scale per token (see docs/storage-format.md).

A token's scale is its largest absolute activation over the format's largest finite value, so
every token uses the 8-bit format's whole range: one outlier token does not flatten the others,
and within a token the error of an element is at most 2^-4 of its own magnitude (e4m3's three
mantissa bits), or 2^-10 of the scale where the element falls among the subnormals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SCALED_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn}
"""Stored activation dtypes that carry a per-token scale, by their names in metadata.json."""
HELD_DTYPE = torch.bfloat16
"""The dtype a collection holds scaled activations in before they are quantized (their
statistics are computed from it, so they equal those of the bfloat16 collection)."""
SAMPLE_ROWS = 4096
"""Rows of each shard whose quantization error the collection's report measures."""
E4M3_TO_FLOAT32_BITS = np.int32(-0x78100000)
"""0x87F00000: the sign bit and an e4m3 byte's 7 magnitude bits, once at float32's bits 27..20."""
E4M3_BIAS_GAP = 2.0**120
"""e4m3 magnitude bits at float32's bits 26..20 read as that value times 2^-120, exactly."""


def is_scaled(dtype: torch.dtype) -> bool:
    return dtype in SCALED_DTYPES.values()


def quantize(acts: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """acts [n, d] as (8-bit values [n, d] of `dtype`, float32 scales [n]) with
    acts ~= values * scales[:, None]; an all-zero token gets scale 1."""
    x = acts.float()
    top = torch.finfo(dtype).max
    amax = x.abs().amax(1)
    scales = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    values = (x / scales[:, None]).clamp_(-top, top).to(dtype)
    return values, scales


def dequantize(
    values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """values [n, d] * scales[:, None] in float32, then in `dtype`: the same arithmetic on
    every device, so a GPU decodes bit for bit as the CPU does."""
    wide = values.to(torch.float32).mul_(scales[:, None])
    return wide if dtype == torch.float32 else wide.to(dtype)


def dequantize_on_cpu(
    values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """`dequantize` of e4m3 values into a float32 CPU tensor `out`, bit for bit (the NaN
    bytes 0x7F and 0xFF, which quantize never writes, decode as 480 x scale), in four
    numpy passes on the calling thread (torch's CPU conversion from 8-bit floats is scalar, 3x
    slower here, and runs on the threads the trainer needs). The byte, sign-extended to int32
    and shifted left by 20, holds the sign at bit 31 and the magnitude bits at 26..20 once
    bits 30..27 are cleared; as a float32 that is the value times 2^-120, subnormals included."""
    if values.dtype != torch.float8_e4m3fn:
        raise ValueError(f"dequantize_on_cpu decodes float8_e4m3fn, not {values.dtype}")
    flat, bits = out.numpy(), out.numpy().view(np.int32)
    np.copyto(bits, values.view(torch.int8).numpy(), casting="unsafe")
    np.left_shift(bits, 20, out=bits)
    np.bitwise_and(bits, E4M3_TO_FLOAT32_BITS, out=bits)
    factors = scales.numpy()
    if len(factors) and float(factors.max()) < 2.0**7:  # scale x 2^120 stays finite
        np.multiply(flat, (factors * np.float32(E4M3_BIAS_GAP))[:, None], out=flat)
    else:
        np.multiply(flat, np.float32(E4M3_BIAS_GAP), out=flat)
        np.multiply(flat, factors[:, None], out=flat)
    return out


@dataclass
class QuantError:
    """Quantization error of sampled tokens, mergeable across shards and machines."""

    n: int
    sq_err: float
    """Sum over sampled elements of (stored - original)^2."""
    sq: float
    """Sum over sampled elements of original^2."""
    max_abs: float

    @classmethod
    def empty(cls) -> QuantError:
        return cls(0, 0.0, 0.0, 0.0)

    @classmethod
    def of(cls, acts: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> QuantError:
        """The error of the first SAMPLE_ROWS tokens of acts stored as (values, scales)."""
        x = acts[:SAMPLE_ROWS].double()
        err = dequantize(values[:SAMPLE_ROWS], scales[:SAMPLE_ROWS]).double() - x
        max_abs = float(err.abs().max()) if err.numel() else 0.0
        return cls(len(x), float((err**2).sum()), float((x**2).sum()), max_abs)

    def merge(self, other: QuantError) -> QuantError:
        return QuantError(
            self.n + other.n,
            self.sq_err + other.sq_err,
            self.sq + other.sq,
            max(self.max_abs, other.max_abs),
        )

    def to_json(self) -> dict:
        return {"n": self.n, "sq_err": self.sq_err, "sq": self.sq, "max_abs": self.max_abs}

    @classmethod
    def from_json(cls, obj: dict) -> QuantError:
        return cls(int(obj["n"]), float(obj["sq_err"]), float(obj["sq"]), float(obj["max_abs"]))

    def report(self) -> dict:
        """metadata.json's `quantization`: sampled tokens, relative RMS error
        (||stored - original|| / ||original|| over the sample) and largest element error."""
        return {
            "sample_tokens": self.n,
            "rel_rms_error": (self.sq_err / self.sq) ** 0.5 if self.sq > 0 else 0.0,
            "max_abs_error": self.max_abs,
        }
