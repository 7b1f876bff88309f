"""Multi-layer feature fusion (docs/method.md, "Architecture", step 2; paper Fig. 5).

The M fused DINOv2 layers arrive as one (B, M*C, H, W) map. Two steps mix them:

1. **Channel fusion** (Fig. 5a): a 1x1 convolution ``M*C -> C_mix`` followed by ReLU, a learned
   per-location combination of the layers' channels.
2. **Token mixing** (Fig. 5b): blocks that mix along the *spatial* axis, as in MLP-Mixer and
   MixVPR: ``X <- X + W_2 ReLU(W_1 LN(X))`` where ``LN`` normalises each token over its
   ``C_mix`` channels and ``W_1 (HW x HW*r)``, ``W_2 (HW*r x HW)`` act on the HW token axis.
   A token mixer therefore fixes the grid size (16 x 16 = 256 tokens at 224 px).
"""

from __future__ import annotations

import torch
from torch import nn


class TokenMixer(nn.Module):
    """One token-mixing block (official ``Tokenmixen``; keys ``norm``, ``mix.0``, ``mix.2``).

    Args:
        channels: ``C_mix``, normalised by the LayerNorm.
        num_tokens: ``HW``, the axis mixed by the MLP.
        mlp_ratio: ``r``, hidden width ``HW * r``.
    """

    def __init__(self, channels: int, num_tokens: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        hidden = int(num_tokens * mlp_ratio)
        self.norm = nn.LayerNorm(channels)
        self.mix = nn.Sequential(nn.Linear(num_tokens, hidden), nn.ReLU(), nn.Linear(hidden, num_tokens))
        for m in self.mix:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_mix, HW) -> (B, C_mix, HW)."""
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)  # (B, HW, C) LN over C -> (B, C, HW)
        return x + self.mix(h)


class MultiLayerFusion(nn.Module):
    """1x1 channel fusion + ReLU + token mixers (Fig. 5).

    Args:
        in_channels: ``M * C`` (concatenated DINOv2 layers).
        mix_dim: ``C_mix``.
        grid: (H, W) patch grid, fixing the token mixers' width ``HW``.
        num_token_mixers: how many token-mixer blocks.
        mlp_ratio: ``r``.
    """

    def __init__(
        self,
        in_channels: int,
        mix_dim: int,
        grid: tuple[int, int],
        num_token_mixers: int = 2,
        mlp_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.conv = nn.Conv2d(in_channels, mix_dim, kernel_size=1)
        num_tokens = self.grid[0] * self.grid[1]
        self.token_mixers = nn.Sequential(
            *[TokenMixer(mix_dim, num_tokens, mlp_ratio) for _ in range(num_token_mixers)]
        )

    def channel_fusion(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M*C, H, W) -> (B, C_mix, H, W): ``ReLU(conv1x1(x))``."""
        return torch.relu(self.conv(x))

    def mix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_mix, H, W) -> (B, C_mix, H, W) through the token mixers."""
        B, C, H, W = x.shape  # (H, W) == self.grid: the model checked its input's size
        x = self.token_mixers(x.flatten(2))  # (B, C, H, W) -> (B, C, HW)
        return x.reshape(B, C, H, W)  # (B, C, HW) -> (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M*C, H, W) -> (B, C_mix, H, W)."""
        return self.mix_tokens(self.channel_fusion(x))
