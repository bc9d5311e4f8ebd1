"""STML (Kim, Kim, Cho and Kwak, "Self-Taught Metric Learning without Labels", CVPR 2022; docs/method.md), written
here from the paper's description.

A teacher, the exponential moving average of the student (it starts as a copy of it), embeds the un-augmented
training images at every round; each image's nearest neighbours there form the round's neighbour graph. A batch
holds P query images with their M - 1 nearest neighbours, each image in two augmented views. The teacher embeds
the views too, and every pair of the batch gets a soft target (:func:`stml_targets`): the mean of a Gaussian kernel
of the teacher's distance and of a contextual similarity (how far the two images' mutual-neighbour sets within the
batch overlap). The student's embedding, and a wider head beside it, learn these targets by the relaxed
contrastive loss, and the embedding also learns the wide head's relations (self-distillation). After every step
the teacher moves towards the student by ``1 - momentum``. The rotation loss can be added on top
(``rotation_weight``), as in UDML-SS.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import distributed
from ..errors import InputError
from ..evaluation import knn
from ..losses import distillation_loss, relaxed_contrastive_loss, rotation_batch, rotation_loss
from ..samplers import NeighbourBatchSampler
from .base import Method, RoundTargets


class STML(Method):
    name = "stml"
    views = 2

    @property
    def topk(self) -> int:
        return self.params["topk"] or self.cfg.images_per_cluster * self.views

    def attach(self, s) -> None:
        self.teacher = copy.deepcopy(s.model).eval().requires_grad_(False)

    def round_targets(self, s, previous, rnd):
        """Every image's M - 1 nearest neighbours in the teacher's embedding of the un-augmented training images,
        averaged first with their own nearest neighbours where ``target_neighbours`` asks (the main process finds
        them and broadcasts the table)."""
        from ..pseudolabels import neighbour_averaged
        from ..session import extract_all

        m = s.cfg.images_per_cluster
        emb = teacher_embedding(self.teacher, *extract_all(s, "train", pooled=True, model=self.teacher))
        emb = neighbour_averaged(F.normalize(emb.float(), dim=1), s.cfg.target_neighbours, s.cfg.target_alpha)
        table, record = None, None
        if distributed.is_main():
            sims, table = knn(emb, emb, max(1, m - 1), exclude=torch.arange(len(emb), device=emb.device))
            record = {"kind": "neighbours", **neighbour_stats(sims, table, s.train_labels)}
        table = distributed.broadcast(
            table, like=torch.empty(len(emb), max(1, m - 1), dtype=torch.long, device=emb.device)
        )
        summary = None
        if record is not None:
            summary = (
                f"neighbour graph: {m - 1} nearest of each image, median similarity {record['median_similarity']:.3f}"
            )
            if record["diagnostic_neighbour_precision"] is not None:
                summary += f", {record['diagnostic_neighbour_precision']:.3f} of them of the query's class (diagnostic)"
        return RoundTargets(table.cpu(), None, record, summary)

    def sampler(self, s, targets, num_batches, seed):
        cfg = s.cfg
        return NeighbourBatchSampler(
            targets.labels.numpy(),
            cfg.clusters_per_batch,
            cfg.images_per_cluster,
            num_batches,
            seed=seed,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
            views=self.views,
        )

    def loss(self, s, x, idx):
        cfg, p = s.cfg, self.params
        world = distributed.world_size()
        net = s.model
        idx = idx.to(s.device, non_blocking=True)
        inp, frozen_input = x, s.views is not None
        with s.precision.autocast():
            if not frozen_input and net.frozen_stages:  # the frozen stages once, for the student and the teacher
                inp, frozen_input = net.frozen_features(x), True
            rotated = None
            if cfg.rotation_weight > 0:  # the query of each of the first R neighbourhoods, first view, rotated
                n = len(idx) // self.views
                first = slice(0, n, cfg.images_per_cluster)
                source = s.plain_images(idx[first]) if s.views is not None else x[first]
                rotated, rotation_labels = rotation_batch(source[: max(1, cfg.rotation_images // world)].to(x.device))
            wide = net.wide is not None
            out = s.train_model(inp, rotated, frozen_input=frozen_input, wide=wide, trained_float32=cfg.train_float32)
            with torch.no_grad():
                target_space = self.teacher(inp, frozen_input=frozen_input, wide=wide)
        out = out if isinstance(out, tuple) else (out,)
        emb = out[0]
        wide_emb = out[1] if wide else None
        teacher_emb = (target_space[1] if wide else target_space).float()
        # the whole batch, gathered from every process in rank order (gradients flow into this process's share)
        emb = distributed.gather_rows_with_grad(emb.float())
        ids = distributed.gather_rows(idx)
        targets = stml_targets(distributed.gather_rows(teacher_emb), ids, p["sigma"], self.topk)
        contrastive = relaxed_contrastive_loss(emb, targets, p["margin"])
        terms = {}
        total = contrastive
        if wide:
            wide_emb = distributed.gather_rows_with_grad(wide_emb.float())
            contrastive = (contrastive + relaxed_contrastive_loss(wide_emb, targets, p["margin"])) / 2
            distill = distillation_loss(emb, wide_emb)
            total = contrastive + p["distill_weight"] * distill
            terms["distill_loss"] = distill.detach()
        terms["contrastive_loss"] = contrastive.detach()
        total = total * world  # DDP averages gradients; each process back-propagates only through its share
        if rotated is not None:
            logits = out[-1]
            rotation = rotation_loss(logits, rotation_labels)
            terms["rotation_loss"] = rotation.detach()
            terms["rotation_accuracy"] = (logits.argmax(1) == rotation_labels).float().mean()
            total = total + cfg.rotation_weight * rotation
        return total, terms

    def after_step(self, s) -> None:
        moving_average(self.teacher, s.model, self.params["momentum"])

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "teacher" not in state:
            raise InputError(
                "the checkpoint holds no STML teacher (it was written by another method or an older udml); resume "
                "it with the method it was trained with, or start a new run"
            )
        self.teacher.load_state_dict(state["teacher"])


def teacher_embedding(teacher, pooled: torch.Tensor | None, emb: torch.Tensor) -> torch.Tensor:
    """The teacher's target space of images whose pooled features and embeddings are given: the wide head's
    embedding where the network has one, else the embedding."""
    if teacher.wide is None:
        return emb
    return teacher.embed_wide(pooled)


@torch.no_grad()
def moving_average(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum x teacher + (1 - momentum) x student, for every floating-point parameter and buffer
    (``lerp``: a weight the student has not changed, such as a frozen stage's, stays exactly as it is); integer
    buffers (BatchNorm's counter) are copied."""
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        if t.is_floating_point():
            t.lerp_(s, 1 - momentum)
        else:
            t.copy_(s)


def stml_targets(teacher_emb: torch.Tensor, ids: torch.Tensor, sigma: float, topk: int) -> torch.Tensor:
    """The soft target of every pair of a batch, in [0, 1] and symmetric, from the teacher's embeddings [n, d] of
    the batch's items (views) and the image each comes from (``ids`` [n]).

    - Semantic: exp(-|t_i - t_j|^2 / sigma) on the L2-normalised embeddings.
    - Contextual: each item's ``topk`` nearest items of the batch by that kernel (itself and the other views of
      its image always among them) and, of those, its mutual neighbours R(i) (each in the other's ``topk``,
      :func:`contextual_neighbours`). For j in R(i) the overlap |R(i) & R(j)| / |R(i)|, else 0; averaged over
      i's ceil(topk / 2) nearest (a query expansion), then symmetrised.
    - The target: the mean of the two."""
    semantic = semantic_similarity(teacher_emb, sigma)
    nearest, mutual = contextual_neighbours(teacher_emb, ids, topk)
    overlap = mutual * (mutual @ mutual.t()) / mutual.sum(1, keepdim=True)
    expanded = overlap[nearest[:, : (topk + 1) // 2]].mean(1)
    contextual = (expanded + expanded.t()) / 2
    return (semantic + contextual) / 2


def semantic_similarity(teacher_emb: torch.Tensor, sigma: float = 3.0) -> torch.Tensor:
    """exp(-|t_i - t_j|^2 / sigma) of the L2-normalised rows; the order of a row does not depend on sigma."""
    t = F.normalize(teacher_emb.float(), dim=1)
    return torch.exp(-(2 - 2 * t @ t.t()).clamp_min(0) / sigma)


def contextual_neighbours(teacher_emb: torch.Tensor, ids: torch.Tensor, topk: int):
    """(each item's ``topk`` nearest items [n, topk], nearest first, with the items of its own image first; the
    mutual-neighbour mask [n, n] as floats)."""
    semantic = semantic_similarity(teacher_emb)
    same_image = ids[:, None] == ids[None, :]  # ranked first: 2 is above any kernel value
    nearest = torch.where(same_image, torch.full_like(semantic, 2.0), semantic).topk(topk, dim=1).indices
    in_top = torch.zeros_like(semantic).scatter_(1, nearest, 1.0)
    return nearest, in_top * in_top.t()


def neighbour_stats(sims: torch.Tensor, table: torch.Tensor, true_labels: torch.Tensor | None) -> dict:
    """The neighbour graph's record for metrics.jsonl: its similarities and, where the training split has class
    labels (benchmarks), the fraction of neighbours of the query's class: a diagnostic only."""
    precision = None
    if true_labels is not None:
        labels = true_labels.to(table.device)
        precision = float((labels[table] == labels[:, None]).float().mean())
    return {
        "neighbours": table.shape[1],
        "median_similarity": float(sims.float().median()),
        "diagnostic_neighbour_precision": precision,
    }
