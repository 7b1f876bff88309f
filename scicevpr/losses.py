"""Training losses (docs/method.md, "Training").

- ``L_MS``: the multi-similarity loss (Wang et al. 2019) with alpha = 1, beta = 50, base
  (lambda) = 0 on dot-product similarities, over the pairs chosen by the multi-similarity miner
  (epsilon = 0.1, cosine similarity). Both come from pytorch-metric-learning, as in the
  official code. For an anchor i with mined positives P_i and negatives N_i::

      L_MS = 1/B sum_i [ 1/alpha log(1 + sum_{k in P_i} exp(-alpha (S_ik - base)))
                       + 1/beta  log(1 + sum_{k in N_i} exp( beta  (S_ik - base))) ]

- ``L_D``: distillation, the squared L2 distance between the student's and the teacher's
  descriptors, summed over dimensions and averaged over the batch::

      L_D = 1/B sum_b || X_S[b] - X_T[b] ||^2

- ``L_T = gamma * L_MS + eta * L_D`` (stage 2; gamma = eta = 1 officially).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity

from .config import LossConfig


class MultiSimilarityLoss(torch.nn.Module):
    """``L_MS`` with online multi-similarity mining (pytorch-metric-learning)."""

    def __init__(self, config: LossConfig = LossConfig()) -> None:
        super().__init__()
        self.loss = losses.MultiSimilarityLoss(
            alpha=config.ms_alpha, beta=config.ms_beta, base=config.ms_base, distance=DotProductSimilarity()
        )
        self.miner = miners.MultiSimilarityMiner(epsilon=config.miner_epsilon, distance=CosineSimilarity())

    def forward(self, descriptors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, D) descriptors and (N,) place labels -> scalar loss (fp32).

        Autocast is turned off: ``exp(beta * S)`` with beta = 50 would amplify bf16 rounding of
        the similarities S."""
        with torch.autocast(descriptors.device.type, enabled=False):
            descriptors = descriptors.float()
            pairs = self.miner(descriptors, labels)
            return self.loss(descriptors, labels, pairs)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``L_D``: (N, D), (N, D) -> squared L2 distance summed over D, averaged over N."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} descriptors differ in shape")
    return (student.float() - teacher.float()).pow(2).sum(dim=1).mean()


class DistillationObjective(torch.nn.Module):
    """``L_T = gamma * L_MS(X_S) + eta * L_D(X_S, X_T)``; returns (L_T, L_MS, L_D)."""

    def __init__(self, config: LossConfig = LossConfig()) -> None:
        super().__init__()
        self.config = config
        self.ms = MultiSimilarityLoss(config)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l_ms = self.ms(student, labels)
        l_d = distillation_loss(student, teacher.detach())
        return self.config.gamma * l_ms + self.config.eta * l_d, l_ms, l_d
