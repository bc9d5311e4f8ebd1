"""udml against plain PyTorch on the CPU: the embedding pass and the training step, side by side in one process.

    python -m benchmarks.cpu_ceiling --cub ../shared/data/CUB_200_2011          # Lite0 224 px and the smallconv

For each model (EfficientNet-Lite0 at 224 px as the CPU recipe trains it, ``freeze_stages=5``; the default job's
smallconv at 28 px), three ways of running the same network on the same real images, in alternating rounds
(``--rounds`` for Lite0, ``--small-rounds`` for the smallconv; every column is measured back to back within a round,
and the ratios are given two ways: of the columns' medians over the rounds, and the median of each round's own
ratio, which cancels the machine's slow drifts between rounds):

- ``udml``: udml's own code path with its default precision (``amp=true``: bfloat16 autocast where the CPU has
  native bfloat16, channels_last). Embedding pass: ``inference.extract`` over stacked uint8 images, as every
  clustering and evaluation runs it. Training step, two ways: ``step`` is ``training.train_round`` over the
  P x M sampler and its loader (data loading and augmentation included, the two losses, backward, Adam);
  ``step_only`` is ``training.training_step`` (both tasks' forward, the two losses), backward and Adam on a batch
  already loaded, which is what the ceiling does.
- ``ceiling``: plain PyTorch on the same model, batch, layout and precision, with nothing else: the backbone's
  own ``forward`` on tensors already normalised in memory, then the heads; for training a forward of the batch
  and its rotated copies, a simple loss, backward and Adam. What the hardware gives this network.
- ``float32_nchw``: udml's code path with ``amp=false``: float32 in the NCHW layout, which is what udml ran on the
  CPU before the fast path (issue #18).

The process runs with udml's CPU allocator setting (``devices.keep_freed_memory``) unless
``UDML_CPU_KEEP_MEMORY=0``; it applies to every column alike.

Writes ``benchmarks/results/cpu_ceiling.json`` (``--output``) and prints images/s and the ratios.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from udml import distributed
from udml.config import make_config
from udml.data import make_loader
from udml.devices import keep_freed_memory, precision_for
from udml.inference import extract
from udml.losses import rotation_batch
from udml.methods.udml_ss import StepSettings, training_step
from udml.models import after_stages, stem_and_stages
from udml.samplers import ClusterBatchSampler, one_per_cluster
from udml.session import prepare, resolve_num_clusters
from udml.training import train_round

from .harness import RESULTS, base_parser, cub_images, link_photos, write_results


def setups(args, tmp: Path) -> dict[str, list[str]]:
    """{name: [preset, overrides...]}; the CUB photos linked under ``tmp``."""
    rows = {}
    if args.cub:
        folder = link_photos(cub_images(args.cub, "test")[: args.images], tmp / "cub")
        rows["efficientnet_lite0_224"] = [
            "folder",
            f"data_root={folder}",
            "image_size=224",
            "freeze_stages=5",
            "rotation_images=8",
            "num_clusters=16",
        ]
    rows["smallconv_28"] = ["omniglot_mini", "num_clusters=16"]
    return rows


def session(argv: list[str], amp: bool):
    cfg = make_config(argv[0], argv[1:] + ["device=cpu", f"amp={str(amp).lower()}", "num_workers=2"])
    cfg = resolve_num_clusters(cfg)
    return prepare(cfg, torch.device("cpu"))


def udml_embed(s, images: torch.Tensor) -> float:
    t = time.perf_counter()
    extract(s.model, images, batch_size=s.cfg.eval_batch_size, amp=s.cfg.amp, pooled=False)
    return len(images) / (time.perf_counter() - t)


def ceiling_embed(s, images: torch.Tensor) -> float:
    """The backbone's own forward and the embedding head, on normalised float tensors, in parts of 32."""
    p = precision_for("cpu", s.cfg.amp)
    model = p.prepare(s.model.eval())
    x = p.layout(model.normalize(images))
    t = time.perf_counter()
    with torch.no_grad(), p.autocast():
        for part in x.split(32):
            F.normalize(model.embedding(model.backbone(part).flatten(1).float()), dim=1)
    return len(images) / (time.perf_counter() - t)


def plain_pooled(model, x: torch.Tensor) -> torch.Tensor:
    """The backbone on normalised images, with its frozen stages (if any) outside autograd, as anyone who
    freezes layers in plain PyTorch would run it (timm's modules, called one after the other)."""
    n = model.frozen_stages
    if not n:
        return model.backbone(x).flatten(1)
    with torch.no_grad():
        h = stem_and_stages(model.backbone, x, n)
    return after_stages(model.backbone, h, n).flatten(1)


class StepRunner:
    """udml's training round of ``steps`` steps over the P x M sampler and its loader."""

    def __init__(self, s, steps: int):
        self.s, self.steps = s, steps
        k = s.cfg.num_clusters
        self.labels = torch.arange(len(s.aug)) % k
        self.sampler = ClusterBatchSampler(
            self.labels.numpy(), s.cfg.clusters_per_batch, s.cfg.images_per_cluster, steps, seed=0
        )
        self.loader = make_loader(s.aug, batch_sampler=self.sampler, num_workers=s.workers, persistent=True)
        self.round = 0

    def __call__(self) -> float:
        self.round += 1
        self.sampler.reset(self.labels.numpy(), seed=self.round)
        t = time.perf_counter()
        train_round(self.s, self.loader, self.labels, 0)
        return self.steps / (time.perf_counter() - t)

    def batch(self):
        """(images, pseudo-labels) of one batch as the loader gives it."""
        self.sampler.reset(self.labels.numpy(), seed=0)
        x, idx = next(iter(self.loader))
        return x, self.labels[idx]


def udml_step(s, batch: tuple, steps: int) -> float:
    """udml's training step on a batch already loaded: training_step (both tasks, both losses), backward, Adam."""
    x, y = batch
    s.model.train()
    t = time.perf_counter()
    for _ in range(steps):
        loss, _ = training_step(
            s.train_model, s.metric_loss, x, y, StepSettings.of(s.cfg), s.precision, distributed.world_size()
        )
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
    return steps / (time.perf_counter() - t)


def ceiling_step(s, batch: torch.Tensor, steps: int) -> float:
    """Forward of the batch and its rotated copies through the backbone's own forward and the heads, a plain loss,
    backward, Adam: per step, nothing else."""
    cfg = s.cfg
    p = precision_for("cpu", cfg.amp)
    model = p.prepare(s.model)
    model.train()
    xr, yr = rotation_batch(one_per_cluster(batch, cfg.images_per_cluster)[: cfg.rotation_images])
    x = p.layout(model.normalize(torch.cat([batch, xr])))
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-6)
    n = len(batch)
    t = time.perf_counter()
    for _ in range(steps):
        with p.autocast():
            pooled = plain_pooled(model, x)
        emb = F.normalize(model.embedding(pooled[:n].float()), dim=1)
        loss = emb.square().mean() + F.cross_entropy(model.rotation(pooled[n:].float()), yr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t)


def measure(name: str, argv: list[str], rounds: int, steps: int) -> dict:
    sessions = {"udml": session(argv, True), "float32_nchw": session(argv, False)}
    s = sessions["udml"]
    images = s.train_plain if isinstance(s.train_plain, torch.Tensor) else None
    if images is None:  # kept as a Dataset (frozen stages' outputs cached instead): stack a copy here
        images = torch.stack([s.train_plain[i][0] for i in range(len(s.train_plain))])
    runners = {k: StepRunner(v, steps) for k, v in sessions.items()}
    batch = runners["udml"].batch()
    ceiling = session(argv, True)
    cols = {what: {"udml": [], "ceiling": [], "float32_nchw": []} for what in ("embed", "step")}
    cols["step_only"] = {"udml": [], "ceiling": []}
    passes = [  # ((what, column), measure): the columns of a pass run back to back
        [
            (("embed", "udml"), lambda: udml_embed(sessions["udml"], images)),
            (("embed", "ceiling"), lambda: ceiling_embed(ceiling, images)),
            (("embed", "float32_nchw"), lambda: udml_embed(sessions["float32_nchw"], images)),
        ],
        [
            (("step", "udml"), runners["udml"]),
            (("step", "ceiling"), lambda: ceiling_step(ceiling, batch[0], steps)),
            (("step", "float32_nchw"), runners["float32_nchw"]),
            (("step_only", "udml"), lambda: udml_step(sessions["udml"], batch, steps)),
        ],
    ]
    for r in range(rounds + 1):  # round 0 warms up
        got = {}
        for todo in passes:  # the order turns by one each round: no column always runs first or last
            k = r % len(todo)
            for key, fn in todo[k:] + todo[:k]:
                got[key] = fn()
        got[("step_only", "ceiling")] = got[("step", "ceiling")]
        if r:
            for (what, col), v in got.items():
                cols[what][col].append(v)
        print(f"  {name} round {r}: " + ", ".join(f"{w}/{c} {v:.2f}" for (w, c), v in got.items()), flush=True)
    out = {"config": argv, "images": len(images), "precision": str(s.precision), "batch": len(batch[0])}
    for what, unit in UNITS:
        med = {c: statistics.median(v) for c, v in cols[what].items()}
        paired = [u / c for u, c in zip(cols[what]["udml"], cols[what]["ceiling"])]
        out[what] = {
            unit: med,
            "rounds": cols[what],
            "udml_over_ceiling": med["udml"] / med["ceiling"],
            "udml_over_ceiling_paired": statistics.median(paired),
            "udml_over_ceiling_per_round": paired,
        }
        if "float32_nchw" in med:
            out[what]["udml_over_float32_nchw"] = med["udml"] / med["float32_nchw"]
    return out


UNITS = (("embed", "images_per_s"), ("step", "steps_per_s"), ("step_only", "steps_per_s"))


def main(argv: list[str] | None = None) -> int:
    ap = base_parser(__doc__, results=RESULTS / "cpu_ceiling.json", flag="--output")
    ap.add_argument("--cub", help="CUB_200_2011 root: also measure EfficientNet-Lite0 at 224 px on its images")
    ap.add_argument("--images", type=int, default=256, help="CUB test images to embed (default 256)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds for Lite0 (about a minute each)")
    ap.add_argument("--small-rounds", type=int, default=15, help="rounds for the small convnet (seconds each)")
    ap.add_argument("--steps", type=int, default=5, help="training steps per round")
    args = ap.parse_args(argv)
    results = {"cpu_allocator_keeps_freed_memory": keep_freed_memory(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="udml-ceiling-") as tmp:
        for name, setup in setups(args, Path(tmp)).items():
            rounds = args.small_rounds if name.startswith("smallconv") else args.rounds
            results["models"][name] = measure(name, setup, rounds, args.steps)
    write_results(args.output, results)
    print_table(results["models"], args.output)
    return 0


def print_table(models: dict, output: str) -> None:
    print(
        f"\n{'model':24} {'':9} {'udml':>9} {'ceiling':>9} {'fp32 NCHW':>10} {'udml/ceiling':>13} {'paired':>7} "
        f"{'udml/fp32':>10}"
    )
    for name, r in models.items():
        for what, unit in UNITS:
            m, ratio = r[what][unit], r[what].get("udml_over_float32_nchw")
            fp32 = f"{m['float32_nchw']:10.2f}" if "float32_nchw" in m else f"{'':10}"
            print(
                f"{name:24} {what:9} {m['udml']:9.2f} {m['ceiling']:9.2f} {fp32} "
                f"{r[what]['udml_over_ceiling']:13.2f} {r[what]['udml_over_ceiling_paired']:7.2f} "
                f"{'' if ratio is None else f'{ratio:10.2f}'}"
            )
    print(
        f"(images/s for embed, steps/s for step; udml's precision: {r['precision']}; step: with the loader, "
        f"step_only: on a loaded batch; udml/ceiling: of the medians over rounds; paired: the median of the "
        f"rounds' own ratios) -> {output}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
