"""Metric losses by name (pytorch-metric-learning) and the rotation-prediction task."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners


def _multi_similarity(p):
    return (losses.MultiSimilarityLoss(alpha=p.get("alpha", 2.0), beta=p.get("beta", 40.0), base=p.get("base", 0.5)),
            miners.MultiSimilarityMiner(epsilon=p.get("miner_epsilon", 0.1)))


def _contrastive(p):
    return losses.ContrastiveLoss(pos_margin=p.get("pos_margin", 0.0), neg_margin=p.get("neg_margin", 0.5)), None


def _triplet(p):
    return (losses.TripletMarginLoss(margin=p.get("margin", 0.1)),
            miners.TripletMarginMiner(margin=p.get("miner_margin", 0.1), type_of_triplets=p.get("triplets", "semihard")))


def _ntxent(p):
    return losses.NTXentLoss(temperature=p.get("temperature", 0.07)), None


def _npair(p):
    return losses.NPairsLoss(), None


def _lifted_structure(p):
    return losses.LiftedStructureLoss(pos_margin=p.get("pos_margin", 0.0), neg_margin=p.get("neg_margin", 1.0)), None


def _margin(p):
    return (losses.MarginLoss(margin=p.get("margin", 0.2), nu=p.get("nu", 0.0), beta=p.get("beta", 1.2)),
            miners.DistanceWeightedMiner(cutoff=p.get("miner_cutoff", 0.5),
                                         nonzero_loss_cutoff=p.get("miner_nonzero_loss_cutoff", 1.4)))


# name -> factory(params) -> (loss, miner or None). Defaults follow METHOD.md for multi-similarity and the
# usual settings for L2-normalised embeddings elsewhere; every constant can be changed through loss_params.
LOSSES: dict[str, Callable[[dict], tuple[nn.Module, Any]]] = {
    "multi_similarity": _multi_similarity,
    "contrastive": _contrastive,
    "triplet": _triplet,
    "ntxent": _ntxent,
    "npair": _npair,
    "lifted_structure": _lifted_structure,
    "margin": _margin,
}


class MetricLoss(nn.Module):
    """A pytorch-metric-learning loss with its optional miner, called as ``loss(embeddings, labels)``."""

    def __init__(self, loss: nn.Module, miner=None):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, pairs)

    def across_processes(self) -> "MetricLoss":
        """The same loss and miner over the batch gathered from every torchrun process (pytorch-metric-learning's
        distributed wrappers); the value is multiplied by the number of processes."""
        from pytorch_metric_learning.utils import distributed as pml_distributed

        miner = pml_distributed.DistributedMinerWrapper(self.miner) if self.miner is not None else None
        return MetricLoss(pml_distributed.DistributedLossWrapper(self.loss), miner)


def create_loss(name: str, params: dict | None = None) -> MetricLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names are {', '.join(LOSSES)}")
    try:
        loss, miner = LOSSES[name](dict(params or {}))
    except TypeError as e:
        raise ValueError(f"loss {name!r}: bad loss_params {params}: {e}") from e
    return MetricLoss(loss, miner)


def rotation_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image rotated by 0, 90, 180 and 270 degrees: ([4R, C, H, W], labels [4R] in 0..3)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)
