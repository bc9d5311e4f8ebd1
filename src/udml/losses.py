"""Metric losses by name (udml's multi-similarity, pytorch-metric-learning's others) and the rotation task."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from . import ms_loss
from .errors import InputError


@dataclass(frozen=True)
class LossSpec:
    """A loss with udml's defaults, and the miner that goes with it (or None): pytorch-metric-learning's, or
    udml's mask-based multi-similarity pair (udml.ms_loss)."""

    loss: type
    defaults: dict = field(default_factory=dict)
    miner: type | None = None
    miner_defaults: dict = field(default_factory=dict)


# name -> loss and miner. Defaults follow docs/method.md for multi-similarity and the usual settings for L2-normalised
# embeddings elsewhere. ``loss_params`` changes any keyword parameter of the loss (``alpha``) and, prefixed with
# ``miner_``, of the miner (``miner_epsilon``). ``multi_similarity`` is udml.ms_loss: the numbers of
# pytorch-metric-learning's miner and loss (``multi_similarity_pml``, kept for comparison) without their host-device
# synchronisations.
LOSSES: dict[str, LossSpec] = {
    "multi_similarity": LossSpec(
        ms_loss.MultiSimilarityLoss,
        {"alpha": 2.0, "beta": 40.0, "base": 0.5},
        ms_loss.MultiSimilarityMiner,
        {"epsilon": 0.1},
    ),
    "multi_similarity_pml": LossSpec(
        losses.MultiSimilarityLoss,
        {"alpha": 2.0, "beta": 40.0, "base": 0.5},
        miners.MultiSimilarityMiner,
        {"epsilon": 0.1},
    ),
    "contrastive": LossSpec(losses.ContrastiveLoss, {"pos_margin": 0.0, "neg_margin": 0.5}),
    "triplet": LossSpec(
        losses.TripletMarginLoss,
        {"margin": 0.1},
        miners.TripletMarginMiner,
        {"margin": 0.1, "type_of_triplets": "semihard"},
    ),
    "ntxent": LossSpec(losses.NTXentLoss, {"temperature": 0.07}),
    "npair": LossSpec(losses.NPairsLoss),
    "lifted_structure": LossSpec(losses.LiftedStructureLoss, {"pos_margin": 0.0, "neg_margin": 1.0}),
    "margin": LossSpec(
        losses.MarginLoss,
        {"margin": 0.2, "nu": 0.0, "beta": 1.2},
        miners.DistanceWeightedMiner,
        {"cutoff": 0.5, "nonzero_loss_cutoff": 1.4},
    ),
}
MINER_PREFIX = "miner_"


def _parameters(cls: type) -> list[str]:
    """The keyword parameters of a class's constructor (not its **kwargs, which take objects, not settings)."""
    return [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def loss_parameters(name: str) -> list[str]:
    """The keys ``loss_params`` accepts for loss ``name``: the loss's own, then the miner's with ``miner_``."""
    spec = LOSSES[name]
    return _parameters(spec.loss) + ([MINER_PREFIX + p for p in _parameters(spec.miner)] if spec.miner else [])


class MetricLoss(nn.Module):
    """A metric loss with its optional miner, called as ``loss(embeddings, labels)``."""

    def __init__(self, loss: nn.Module, miner=None):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, pairs)

    def across_processes(self) -> nn.Module:
        """The same loss and miner over the batch gathered from every torchrun process (pytorch-metric-learning's
        distributed wrappers, or AcrossProcesses for udml's own loss); the value is multiplied by the number of
        processes."""
        from pytorch_metric_learning.utils import distributed as pml_distributed

        if not isinstance(self.loss, losses.BaseMetricLossFunction):
            return AcrossProcesses(self)
        miner = pml_distributed.DistributedMinerWrapper(self.miner) if self.miner is not None else None
        return MetricLoss(pml_distributed.DistributedLossWrapper(self.loss), miner)


class AcrossProcesses(nn.Module):
    """``loss`` over the embeddings and labels gathered from every torchrun process, this process's first, times
    the number of processes: what pytorch-metric-learning's DistributedLossWrapper and DistributedMinerWrapper
    compute (with its gather: the gradient flows into this process's embeddings only), gathering once."""

    def __init__(self, loss: MetricLoss):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from pytorch_metric_learning.utils import distributed as pml_distributed

        if not pml_distributed.is_distributed() or torch.distributed.get_world_size() <= 1:
            return self.loss(embeddings, labels)
        world_size = torch.distributed.get_world_size()
        all_embeddings, all_labels, _ = pml_distributed.gather(embeddings, labels)
        return self.loss(all_embeddings, all_labels) * world_size


def create_loss(name: str, params: dict | None = None) -> MetricLoss:
    """The metric loss ``name`` (a key of LOSSES) with its miner; ``params`` as described at LOSSES."""
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; valid names are {', '.join(LOSSES)}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(loss_parameters(name)))
    if unknown:
        raise InputError(
            f"loss_params: {', '.join(unknown)} not a parameter of loss {name!r}; valid: "
            f"{', '.join(loss_parameters(name))} (miner_... go to its miner)"
        )
    spec = LOSSES[name]
    loss_kwargs = {**spec.defaults, **{k: v for k, v in params.items() if not k.startswith(MINER_PREFIX)}}
    miner_kwargs = {
        **spec.miner_defaults,
        **{k[len(MINER_PREFIX) :]: v for k, v in params.items() if k.startswith(MINER_PREFIX)},
    }
    try:
        return MetricLoss(spec.loss(**loss_kwargs), spec.miner(**miner_kwargs) if spec.miner else None)
    except (TypeError, ValueError) as e:  # a value of the wrong kind, as pytorch-metric-learning reports it
        raise InputError(f"loss {name!r}: bad loss_params {params}: {e}") from e


def rotation_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image rotated by 0, 90, 180 and 270 degrees: ([4R, C, H, W], labels [4R] in 0..3)."""
    if images.shape[-1] != images.shape[-2]:
        raise InputError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def relative_distances(emb: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``emb`` [n, d], each row divided by its mean distance to the other
    n - 1 rows; the diagonal is 0. The square root is taken of squared distances clamped away from 0, so that the
    gradient stays finite for coinciding rows (two views of a blank image)."""
    n = emb.shape[0]
    sq = emb.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * emb @ emb.t()).clamp_min(1e-12)
    off = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    d = torch.where(off, d2.sqrt(), torch.zeros_like(d2))
    return d / (d.sum(1, keepdim=True) / (n - 1)).clamp_min(1e-12)


def relaxed_contrastive_loss(emb: torch.Tensor, targets: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """STML's relaxed contrastive loss (Kim et al., CVPR 2022): every pair of rows is pulled together in proportion
    to its target w (a soft similarity in [0, 1]) and pushed to at least ``margin`` apart in proportion to 1 - w,
    on distances relative to each row's mean (:func:`relative_distances`), so that only their order matters:

        sum over i != j of  w_ij d_ij^2 + (1 - w_ij) max(0, margin - d_ij)^2,  divided by n (n - 1).

    For one pair, with d below the margin, the minimum is at d = margin (1 - w)."""
    n = emb.shape[0]
    d = relative_distances(emb.float())
    off = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    w = targets.float()
    per_pair = w * d.pow(2) + (1 - w) * F.relu(margin - d).pow(2)
    return per_pair[off].sum() / (n * (n - 1))


def distillation_loss(narrow: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """STML's self-distillation: for every row i, the KL divergence from the wide embedding's distribution over the
    other rows (softmax of minus the relative distances, :func:`relative_distances`) to the narrow embedding's,
    averaged over rows. The wide side is the target: no gradient reaches it through this term."""
    n = narrow.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=narrow.device)
    log_q = F.log_softmax(-relative_distances(narrow.float())[off].view(n, n - 1), dim=1)
    log_p = F.log_softmax(-relative_distances(wide.detach().float())[off].view(n, n - 1), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum() / n
