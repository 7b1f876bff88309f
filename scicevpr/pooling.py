"""GeM and the 14-region multi-scale GeM pooling (docs/method.md, "Architecture", step 3).

Generalised mean pooling (Radenovic et al. 2018) of a region R of a (C, H, W) map:
``f_c = ( 1/|R| * sum_{(i,j) in R} max(x_cij, eps)^p )^(1/p)``, with one learnable ``p``
(init 3) shared by every region. ``p = 1`` is average pooling, ``p -> inf`` max pooling.

The 14 regions are the whole map, a 2 x 2 split and a 3 x 3 split, in that order, row-major.
At the paper's 16 x 16 grid the official slices are ``0:8, 8:16`` and ``0:5, 5:11, 11:16``;
:func:`region_boxes` keeps these proportions on any grid. All 14 regional means are one matrix
product with a (14, HW) averaging matrix.

CricaVPR (Lu et al. 2024) pools the same regions differently, and :class:`MultiRegionGeM` has
options for it: the whole map is left out (its slot holds the CLS token instead), each patch
vector is L2-normalised before pooling, and the regional vectors are not normalised after.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Split points as fractions of the side, from the official 16 x 16 slices.
_SPLITS = ((0.0, 1.0), (0.0, 8 / 16, 1.0), (0.0, 5 / 16, 11 / 16, 1.0))


def _cuts(n: int, fractions: tuple[float, ...]) -> list[int]:
    return [int(math.floor(f * n + 0.5)) for f in fractions]


def region_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The 14 pooling regions of an ``height`` x ``width`` grid as (row0, row1, col0, col1).

    Order: whole map, then the 2 x 2 split, then the 3 x 3 split, each row-major. At 16 x 16
    they are exactly the official slices.
    """
    if height < 3 or width < 3:
        raise ValueError(f"a {height} x {width} grid is too small for the 3 x 3 regions; use >= 3 x 3")
    boxes = []
    for fractions in _SPLITS:
        rows, cols = _cuts(height, fractions), _cuts(width, fractions)
        for r0, r1 in zip(rows[:-1], rows[1:]):
            for c0, c1 in zip(cols[:-1], cols[1:]):
                boxes.append((r0, r1, c0, c1))
    return boxes


def region_average_matrix(height: int, width: int) -> torch.Tensor:
    """(14, H*W) matrix whose row k averages the tokens of region k (row-major tokens)."""
    boxes = region_boxes(height, width)
    A = torch.zeros(len(boxes), height, width)
    for k, (r0, r1, c0, c1) in enumerate(boxes):
        A[k, r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
    return A.reshape(len(boxes), height * width)  # (14, H, W) -> (14, HW)


class MultiRegionGeM(nn.Module):
    """One GeM over the 14 regions: (B, C, H, W) -> (B, 14, C), each region L2-normalised.

    Args:
        grid: (H, W) of the input maps (fixes the averaging matrix).
        p, eps: GeM exponent init and clamp.
        whole_map: pool the whole map as region 0 (SciceVPR). False keeps only the 13 regions
            of the 2 x 2 and 3 x 3 splits (CricaVPR).
        normalize_input: L2-normalise every patch vector over its C channels before pooling
            (CricaVPR).
        normalize_output: L2-normalise every regional vector after pooling (SciceVPR).

    Computed in fp32 even under autocast: ``x^p`` with p = 3 loses precision in bf16.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        p: float = 3.0,
        eps: float = 1e-6,
        *,
        whole_map: bool = True,
        normalize_input: bool = False,
        normalize_output: bool = True,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps
        self.normalize_input = normalize_input
        self.normalize_output = normalize_output
        avg = region_average_matrix(*self.grid)  # (14, HW)
        if not whole_map:
            avg = avg[1:]  # (13, HW): the 2 x 2 and 3 x 3 splits only
        self.register_buffer("region_avg", avg, persistent=False)

    @property
    def num_regions(self) -> int:  # R: 14, or 13 without the whole map
        return self.region_avg.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, R, C), R = ``num_regions``."""
        B, C, H, W = x.shape  # (H, W) == self.grid: the model checked its input's size
        with torch.autocast(device_type=x.device.type, enabled=False):
            p = self.p.float()
            x = x.float().flatten(2)  # (B, C, H, W) -> (B, C, HW)
            if self.normalize_input:
                x = F.normalize(x, p=2, dim=1)  # each patch vector to unit norm over C
            x = x.clamp(min=self.eps).pow(p)  # (B, C, HW)
            x = torch.matmul(x, self.region_avg.t())  # (B, C, HW) @ (HW, R) -> (B, C, R)
            x = x.pow(1.0 / p).transpose(1, 2)  # (B, C, R) -> (B, R, C)
            return F.normalize(x, p=2, dim=-1) if self.normalize_output else x
