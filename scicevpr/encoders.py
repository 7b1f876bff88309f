"""The two region encoders (PAPER.md, "Architecture", step 4; paper Fig. 3).

Both stack ``nn.TransformerEncoderLayer`` (d_model ``C_mix``, 16 heads, FFN 2048, GELU,
dropout 0.1, post-norm) and map the (B, 14, C_mix) regional features to (B, 14, C_mix). They
differ only in what attends to what:

- :class:`CrossImageEncoder` (Super-CricaVPR, the teacher, 2 layers): for each region, the
  *sequence axis is the batch*: image b's region k attends to region k of every image in the
  batch. Its output for one image depends on which other images share the batch, and on how
  many: the instability of paper Fig. 1-2.
- :class:`SelfEnhancedEncoder` (SciceVPR, the student, 1 layer): each of the B x 14 regional
  features is a sequence of length 1. Attention over a single token is the identity on its
  value, so no image sees another and descriptors do not depend on the batch.

Keys: ``layers.{i}.*`` (the official ``nn.TransformerEncoder``'s names).
"""

from __future__ import annotations

import torch
from torch import nn


def _encoder_layers(dim: int, heads: int, ffn: int, dropout: float, num_layers: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(
            d_model=dim, nhead=heads, dim_feedforward=ffn, dropout=dropout,
            activation="gelu", batch_first=False,
        )
        for _ in range(num_layers)
    )


class _RegionEncoder(nn.Module):
    def __init__(self, dim: int, heads: int = 16, ffn: int = 2048, dropout: float = 0.1, num_layers: int = 1) -> None:
        super().__init__()
        self.layers = _encoder_layers(dim, heads, ffn, dropout, num_layers)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """(S, N, C) -> (S, N, C): attention along S, independently for each of the N columns."""
        for layer in self.layers:
            x = layer(x)
        return x


class CrossImageEncoder(_RegionEncoder):
    """Super-CricaVPR's encoder: attention across the images of the batch, per region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 14, C) -> (B, 14, C); sequence = the B images, one column per region."""
        return self._run(x)  # batch_first=False: (S=B, N=14, C)


class SelfEnhancedEncoder(_RegionEncoder):
    """SciceVPR's encoder: each regional feature is enhanced on its own (sequence length 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 14, C) -> (B, 14, C); every one of the B*14 features is its own sequence."""
        B, R, C = x.shape
        x = self._run(x.reshape(1, B * R, C))  # (B, 14, C) -> (S=1, N=B*14, C)
        return x.reshape(B, R, C)  # (1, B*14, C) -> (B, 14, C)
