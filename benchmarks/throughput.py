"""Training throughput on one device, three numbers from one run on the same machine:

(a) the ceiling: the backbone's bare forward+backward on random tensors of the training batch shape;
(b) udml's full training step: real data loading, P x M sampling, both losses and the optimiser;
(c) one re-clustering pass: embedding the training set (test transform) and k-means.

    python -m benchmarks.throughput --config cub_lite0 --data ../shared/data/CUB_200_2011
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from udml import distributed
from udml.config import make_config
from udml.data import make_loader
from udml.devices import resolve_device
from udml.pseudolabels import cluster
from udml.samplers import ClusterBatchSampler
from udml.session import prepare, resolve_num_clusters
from udml.training import train_round

from .harness import base_parser, sync, write_results


def ceiling(s, iters: int, warmup: int = 5) -> float:
    """Iterations per second of forward+backward through the backbone alone."""
    cfg = s.cfg
    n = cfg.clusters_per_batch * cfg.images_per_cluster + (4 * cfg.rotation_images if cfg.rotation_weight > 0 else 0)
    size = s.model.image_size
    x = s.precision.layout(torch.randn(n, 3, size, size, device=s.device))
    s.model.train()
    for i in range(warmup + iters):
        if i == warmup:
            sync()
            t = time.perf_counter()
        with s.precision.autocast():
            out = s.model.backbone(x)
        out.float().square().mean().backward()
    sync()
    return iters / (time.perf_counter() - t)


# operators that make the host wait for the device on a GPU: a scalar read, or an output whose size depends on the data
SYNC_OPS = {
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
}
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def where(event) -> str:
    """The part of a training round an operator ran in, from its enclosing ranges."""
    while event is not None:
        if event.name == "udml::training_step":
            return "training step: forward and losses"
        if event.name.startswith("autograd::engine::evaluate_function"):
            return "training step: backward"
        if event.name.startswith("Optimizer."):
            return "optimizer"
        event = event.cpu_parent
    return "the round's loop"


def count_syncs(events) -> dict[str, dict[str, int]]:
    """{part of the round: {operator: calls}} of the operators that synchronise, each counted once where one
    calls another (aten::item -> aten::_local_scalar_dense, boolean indexing -> aten::nonzero)."""
    counts: dict[str, dict[str, int]] = {}
    for e in events:
        if e.name not in SYNC_OPS and e.name not in CUDA_SYNCS:
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None and not nested:
            nested = parent.name in SYNC_OPS
            parent = parent.cpu_parent
        if not nested:
            part = counts.setdefault(where(e), {})
            part[e.name] = part.get(e.name, 0) + 1
    return counts


def profile_steps(s, loader, sampler, labels, steps: int) -> dict:
    """Print the top operators of ``steps`` udml training steps and the host-device synchronisations among them,
    by part of the round; returns the synchronisations per training step (forward, losses and backward)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from udml.methods import udml_ss as training

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    sampler.num_batches = steps
    sampler.reset(labels.numpy(), seed=99)
    step = training.training_step

    def marked_step(*args, **kwargs):  # the range tells the step's operators from the loop's
        with record_function("udml::training_step"):
            return step(*args, **kwargs)

    training.training_step = marked_step
    try:
        with profile(activities=activities) as prof:
            train_round(s, loader, labels, 0)
            sync()
    finally:
        training.training_step = step
    key = "self_cuda_time_total" if s.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))
    counts = count_syncs(prof.events())
    in_step = sum(n for part, ops in counts.items() if part.startswith("training step") for n in ops.values())
    print(f"host-device synchronisations in {steps} steps (loss {s.cfg.loss}, device {s.device.type}):")
    for part in sorted(counts):
        print(f"  {part}: " + ", ".join(f"{op} x {n}" for op, n in sorted(counts[part].items())))
    if s.device.type == "cpu":
        print(
            "  (on the CPU, the optimizer's item() reads its CPU step counters, and the loop checks each loss for "
            "non-finite values: neither happens on the device on a GPU)"
        )
    print(f"per training step (forward, losses, backward): {in_step / steps:g}")
    return {"syncs_per_step": in_step / steps, "syncs_by_part": counts, "profiled_steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(
        __doc__,
        results=True,
        flag="--output",
        results_help="write the results as JSON here",
        overrides="configuration overrides (key=value)",
    )
    p.add_argument("--config", default="cub_lite0")
    p.add_argument("--data", help="data set root")
    p.add_argument("--iters", type=int, default=60, help="timed iterations for (a); (b) times whole rounds")
    p.add_argument("--rounds", type=int, default=3, help="timed training rounds for (b), after one warm-up round")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS training steps (torch.profiler) and print where the time goes, "
        "including the host-device synchronisations inside the step",
    )
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"data_root={args.data}"] if args.data else [])
    cfg = resolve_num_clusters(make_config(args.config, overrides))
    t0 = time.perf_counter()
    s = prepare(cfg, distributed.init(resolve_device(cfg.device)))
    setup_s = time.perf_counter() - t0
    images = cfg.clusters_per_batch * cfg.images_per_cluster
    print(
        f"{cfg.backbone} at {s.model.image_size} px, batch {images} + {4 * cfg.rotation_images} rotated, "
        f"device {s.device}, {s.workers} loader workers; data and model ready in {setup_s:.1f}s"
    )
    a = ceiling(s, args.iters)
    print(f"(a) ceiling, bare forward+backward: {a:.2f} it/s")
    measured = full_step(s, args.rounds, a)
    record = {
        "config": args.config,
        "overrides": overrides,
        "backbone": cfg.backbone,
        "image_size": s.model.image_size,
        "batch": images,
        "rotation_images": cfg.rotation_images,
        "ceiling_it_s": a,
        **measured.record,
        "setup_s": setup_s,
        "workers": s.workers,
    }
    if args.profile:
        record.update(profile_steps(s, measured.loader, measured.sampler, measured.labels, args.profile))
    if args.output:
        write_results(args.output, record, block="flat")
    return 0


@dataclass
class Measured:
    record: dict  # (b), (c) and the schedule estimate
    loader: object  # the training loader and its sampler, and the pseudo-labels, for profile_steps
    sampler: ClusterBatchSampler
    labels: torch.Tensor


def full_step(s, rounds: int, ceiling_it_s: float) -> Measured:
    """(b) udml's training rounds after a warm-up one, (c) re-clustering passes, and the full schedule's estimate."""
    cfg = s.cfg
    iters = cfg.iterations_per_round()
    t = time.perf_counter()
    labels, _, _, _ = cluster(s, None, seed=cfg.seed)
    sync()
    first_cluster_s = time.perf_counter() - t
    sampler = ClusterBatchSampler(labels.numpy(), cfg.clusters_per_batch, cfg.images_per_cluster, iters, seed=1)
    loader = make_loader(s.aug, batch_sampler=sampler, num_workers=s.workers, device=s.device, persistent=True)
    step, _, _ = train_round(s, loader, labels, 0)  # warm-up: workers start, cudnn picks kernels
    t = time.perf_counter()
    for r in range(rounds):
        sampler.reset(labels.numpy(), seed=2 + r)
        step, _, _ = train_round(s, loader, labels, step)
    b = rounds * iters / (time.perf_counter() - t)
    print(f"(b) udml full training step: {b:.2f} it/s = {100 * b / ceiling_it_s:.1f}% of the ceiling")
    c = recluster_seconds(s, labels)
    print(
        f"(c) re-clustering pass ({len(s.aug)} images, K={cfg.num_clusters}): {c:.2f}s "
        f"(first clustering on pooled features, k-means++: {first_cluster_s:.2f}s)"
    )
    estimate = cfg.num_rounds() * (iters / b + c)
    print(
        f"full schedule estimate: {cfg.num_rounds()} rounds x ({iters} iterations + a re-clustering) = {estimate:.0f}s "
        "plus data loading and evaluations"
    )
    record = {"udml_it_s": b, "ratio": b / ceiling_it_s, "recluster_s": c, "first_cluster_s": first_cluster_s}
    return Measured({**record, "schedule_estimate_s": estimate}, loader, sampler, labels)


def recluster_seconds(s, labels) -> float:
    """The median of three re-clustering passes."""
    times = []
    for r in range(3):
        t = time.perf_counter()
        cluster(s, labels, seed=r)
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[1]


if __name__ == "__main__":
    raise SystemExit(main())
