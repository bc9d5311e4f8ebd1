"""Run by tests/test_distributed.py, once plainly and once under torchrun (2 CPU processes, gloo).

Builds a session on the digits data set, embeds the training images (sharded and gathered under torchrun),
clusters them (labels broadcast from the main process) and takes one training step; the main process saves
the gathered embeddings, the pseudo-labels, the step's losses and the weights after the step to OUT. With a second
argument ``stml``: the STML method instead, whose round builds the teacher's neighbour graph (broadcast from the
main process), and whose step also moves the teacher; the teacher's weights are saved too.
"""

import sys

import torch

from udml import distributed
from udml.config import make_config
from udml.data import make_loader
from udml.pseudolabels import cluster
from udml.samplers import ClusterBatchSampler
from udml.session import extract_all, prepare
from udml.training import train_round


def main(out: str, method: str = "udml_ss") -> None:
    torch.manual_seed(0)
    # freeze_bn: per-sample forward passes, so a split batch computes exactly what the whole batch does.
    # rotation_images = P: every cluster of the batch gives one rotated image, on whichever process holds it.
    # amp=false: float32, where a batch split over processes gives the numbers of the whole batch to 1e-7.
    cfg = make_config(
        "digits",
        [
            "device=cpu",
            "amp=false",
            "freeze_bn=true",
            "num_workers=0",
            "clusters_per_batch=8",
            "images_per_cluster=4",
            "rotation_images=8",
            "num_clusters=20",
            "kmeans_iters=10",
            f"method={method}",
            *(["method_params={wide_dim: 32, momentum: 0.5}"] if method == "stml" else []),
        ],
    )
    s = prepare(cfg, distributed.init(torch.device("cpu")))
    _, emb = extract_all(s, s.train_plain, pooled=False)
    if method == "stml":
        targets = s.method.round_targets(s, None, 1)
        sampler = s.method.sampler(s, targets, 1, seed=5)
        labels = targets.labels
    else:
        labels, _, _, _ = cluster(s, None, seed=3)
        sampler = ClusterBatchSampler(
            labels.numpy(),
            cfg.clusters_per_batch,
            cfg.images_per_cluster,
            1,
            seed=5,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )
        targets = labels
    loader = make_loader(s.aug, batch_sampler=sampler)
    _, means, bad = train_round(s, loader, targets, 0)
    teacher = s.method.state_dict().get("teacher")
    # every process's own teacher, as a list of its weights: one teacher means equal lists
    teachers = distributed.gather_objects([v.clone() for v in teacher.values()] if teacher else None)
    if distributed.is_main():
        torch.save(
            {
                "world_size": distributed.world_size(),
                "embeddings": emb,
                "labels": labels,
                "means": means,
                "bad": bad,
                "weights": {k: v.clone() for k, v in s.model.state_dict().items()},
                "grads": {k: p.grad.clone() for k, p in s.model.named_parameters() if p.grad is not None},
                "teacher": teacher,
                "teachers": teachers,
            },
            out,
        )
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
