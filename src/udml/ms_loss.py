"""The multi-similarity miner and loss (Wang et al., CVPR 2019) computed with masks, without host-device syncs.

They give the numbers of pytorch-metric-learning's ``MultiSimilarityMiner`` + ``MultiSimilarityLoss`` (cosine
similarity, mean over the anchors; ``tests/test_ms_loss.py`` compares them) but keep everything as [N, N] masks
on the embeddings' device: no ``.item()``, no ``nonzero``, no boolean indexing and no Python branch on values,
so a CUDA training step does not wait here for the GPU (pytorch-metric-learning's pair indices cost about 20
``.item()`` and 4 ``nonzero`` per step). The miner returns masks, not index tuples, so it pairs only with this
loss. For a batch of N embeddings with labels y and cosine similarities S (the diagonal never counts):

- positives of anchor i: j != i with y_j = y_i; negatives: y_j != y_i;
- the miner keeps a positive (i, j) when S_ij - epsilon < max S over the negatives of i, and a negative when
  S_ij + epsilon > min S over the positives of i (pytorch-metric-learning's rule for a similarity);
- loss_i = log(1 + sum_pos exp(-alpha (S_ij - base))) / alpha + log(1 + sum_neg exp(beta (S_ij - base))) / beta
  over the kept pairs; the loss is the mean of loss_i over all N anchors, and 0 (with a zero gradient) when at
  most one positive and at most one negative pair were kept, as pytorch-metric-learning returns then.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


def cosine_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """[N, N] cosine similarities, computed as pytorch-metric-learning's CosineSimilarity does."""
    x = F.normalize(embeddings, p=2, dim=1)
    return x @ x.t()


def pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean [N, N] masks of a batch's labels; an item is not its own positive."""
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _check(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise InputError(
            f"embeddings [N, D] and labels [N] expected, got {list(embeddings.shape)} and {list(labels.shape)}"
        )
    return labels.to(embeddings.device)


class MultiSimilarityMiner(nn.Module):
    """The hard pairs of a batch as (positive, negative) masks [N, N]; no gradient flows through them."""

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = _check(embeddings, labels)
        with torch.no_grad():
            sim = cosine_similarity(embeddings)
            pos, neg = pair_masks(labels)
            # +-inf where an anchor has no negative (no positive): then no pair of it is kept
            hardest_neg = sim.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
            easiest_pos = sim.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
            return pos & (sim - self.epsilon < hardest_neg), neg & (sim + self.epsilon > easiest_pos)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


def _log_one_plus_sum_exp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log(1 + sum of exp(x) over ``keep``) per row, [N, 1]; 0 for a row without kept entries (exactly as
    pytorch-metric-learning's ``logsumexp(..., add_one=True)``: a zero column joins the row)."""
    x = F.pad(x.masked_fill(~keep, float("-inf")), (0, 1))
    out = torch.logsumexp(x, dim=1, keepdim=True)
    return out.masked_fill(~keep.any(dim=1, keepdim=True), 0)


class MultiSimilarityLoss(nn.Module):
    """``loss(embeddings, labels, pairs=None)``: the multi-similarity loss over ``pairs`` = (positive, negative)
    masks from MultiSimilarityMiner, or over every pair of the batch without them."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5):
        super().__init__()
        self.alpha, self.beta, self.base = alpha, beta, base

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        labels = _check(embeddings, labels)
        pos, neg = pair_masks(labels) if pairs is None else pairs
        sim = cosine_similarity(embeddings)
        pos_loss = (1.0 / self.alpha) * _log_one_plus_sum_exp(self.alpha * (self.base - sim), pos)
        neg_loss = (1.0 / self.beta) * _log_one_plus_sum_exp(self.beta * (sim - self.base), neg)
        loss = (pos_loss + neg_loss).mean()
        enough_pairs = (pos.sum() > 1) | (neg.sum() > 1)
        return torch.where(enough_pairs, loss, torch.sum(embeddings * 0))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}"
