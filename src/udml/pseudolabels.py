"""The loop's clustering step: pseudo-labels for the training images from the current network (features in eval
mode with the test transform, optionally averaged with their nearest neighbours, spherical k-means in the
evaluation's geometry), and the statistics that metrics.jsonl records for each clustering. K-means itself is
udml.clustering's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed
from .clustering import assignment_nmi, confident_members, kmeans
from .errors import NonFiniteError
from .session import Session, extract_all


def cluster(s: Session, previous: torch.Tensor | None, seed: int):
    """Pseudo-labels: features in eval mode with the test transform, then cosine k-means; returns (labels, the
    confident images' mask, k-means result, stats). The mask (all True with ``confident_fraction=1``) says which
    images this round's batches draw from (clustering.confident_members).

    Every clustering works in one geometry, that of the evaluation: L2-normalised features, spherical k-means.
    The first clustering uses the pretrained pooled features (k-means++); later ones the embeddings,
    warm-started from the previous clusters' centres in the current feature space. Under torchrun the features
    are gathered from every process, the main process clusters and broadcasts the labels (the others get
    result None and stats {})."""
    cfg = s.cfg
    pooled, emb = extract_all(s, "train", pooled=previous is None)
    features = pooled if previous is None else emb
    if not bool(torch.isfinite(features).all()):
        raise NonFiniteError("the network's outputs on the training images are NaN or infinite")
    features = neighbour_averaged(F.normalize(features, dim=1), cfg.target_neighbours, cfg.target_alpha)
    result, stats, labels = None, {}, None
    if distributed.is_main():
        warm = previous is not None and cfg.recluster_init == "warm"
        init = warm_start(features, previous, cfg.num_clusters) if warm else None
        result = kmeans(
            features,
            cfg.num_clusters,
            niter=cfg.kmeans_iters,
            seed=seed,
            backend=cfg.kmeans_backend,
            init_centroids=init,
            spherical=True,
        )
        stats = cluster_stats(result, previous, cfg.images_per_cluster, s.train_labels)
        labels = torch.as_tensor(result.labels, dtype=torch.long)
        keep = confident_members(
            features.cpu(), labels, result.centroids, cfg.confident_fraction, cfg.images_per_cluster
        )
        stats["confident"], stats["confident_only"] = int(keep.sum()), bool(not keep.all())
        labels = torch.stack([labels, keep.long()]).to(features.device)
    labels = distributed.broadcast(labels, like=torch.empty(2, len(features), dtype=torch.long, device=features.device))
    labels = labels.cpu()
    return labels[0], labels[1].bool(), result, stats


def neighbour_averaged(x: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Each L2-normalised row averaged with its ``k`` nearest other rows, weights max(0, similarity)^alpha (1 for
    itself), normalised again: udml.refine's database-side augmentation, in torch on the features' device (the
    training loop runs where faiss may be missing). ``k=0``: ``x`` unchanged."""
    if not k:
        return x
    from .evaluation import knn

    sims, rows = knn(x, x, min(k, len(x) - 1), exclude=torch.arange(len(x), device=x.device))
    w = sims.clamp_min(0).pow(alpha)
    return F.normalize(x + (w.unsqueeze(2) * x[rows]).sum(1), dim=1)


def warm_start(features: torch.Tensor, previous_labels: torch.Tensor, k: int) -> torch.Tensor:
    """The previous clusters' centres in the current feature space (the features moved since they were made)."""
    d = features.shape[1]
    sums = torch.zeros(k, d, dtype=features.dtype, device=features.device)
    sums.index_add_(0, previous_labels.to(features.device), features)
    counts = torch.bincount(previous_labels.to(features.device), minlength=k).clamp_min(1).unsqueeze(1)
    return sums / counts


def cluster_stats(
    result, previous: torch.Tensor | None, images_per_cluster: int, true_labels: torch.Tensor | None
) -> dict:
    """The clustering record of metrics.jsonl: k-means' own statistics, the cluster sizes, how many clusters
    are smaller than M (the sampler repeats their images), the NMI to the previous assignment and, where the
    training split has class labels (benchmarks), the NMI to them. That last one is a diagnostic only: labels
    never reach training or the choice of a setting."""
    stats = result.stats()
    sizes = result.sizes()
    stats["sizes"] = sizes.tolist() if len(sizes) <= 1000 else None  # SOP's K = 10,000: summary only
    stats["smaller_than_m"] = int((sizes < images_per_cluster).sum())
    stats["nmi_previous"] = assignment_nmi(previous, result.labels) if previous is not None else None
    stats["diagnostic_nmi_true_classes"] = (
        assignment_nmi(true_labels, result.labels) if true_labels is not None else None
    )
    return stats


def describe_clusters(stats: dict) -> str:
    nmi_true = stats["diagnostic_nmi_true_classes"]
    return (
        f"sizes min {stats['min']} / median {stats['median']:g} / max {stats['max']}, {stats['smaller_than_m']} "
        f"smaller than M, {stats['n_reseeded']} re-seeded, NMI to previous "
        + ("-" if stats["nmi_previous"] is None else f"{stats['nmi_previous']:.3f}")
        + ("" if nmi_true is None else f", to the true classes {nmi_true:.3f} (diagnostic)")
        + (
            f", batches drawn from the {stats['confident']} most confident images"
            if stats.get("confident_only")
            else ""
        )
    )
