"""A plain dense linear layer with the ``PackedLinear`` interface, for any device and for autograd.

The packed CPU kernels in ``ops`` are for fast inference on this CPU; training a drafter (which
backpropagates through nothing of the target but runs it on whatever device is at hand, a GPU
included) uses this float layer instead: ``DecoderModel(config, weights, fmt="dense")``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())  # [out, in]
        self.out_features, self.in_features = weight.shape
        self.fmt = "dense"

    @classmethod
    def from_weight(cls, weight: torch.Tensor, fmt: str = "dense", group_size: int = 32):
        return cls(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return F.linear(x, self.weight.to(x.dtype))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:  # [L] -> [L, in]
        return self.weight[idx]

    def dequantized(self) -> torch.Tensor:
        return self.weight

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
