"""Pictures of a run and of search results (matplotlib, Agg backend: no display needed).

- :func:`retrieval_grid`: one row per query, the query then its results, framed green or red
  where it is known whether a result shares the query's class.
- :func:`training_curves`: losses, Recall@1 and NMI against training steps, from metrics.jsonl.
- :func:`embedding_map`: a 2-D t-SNE map of embeddings coloured by class.
- :func:`write_run_pictures`: the three for a finished run, written into its folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import InputError, MissingPath
from .rundir import METRICS, MetricsFile

log = logging.getLogger("udml")

GREEN, RED, GREY = "#1a9641", "#d7191c", "#bdbdbd"
RUN_PICTURES = ("curves.png", "retrieval.png", "embeddings.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def as_array(image) -> np.ndarray:
    """A displayable HxWx3 uint8 array from a path, a PIL image, a uint8 [3, H, W] tensor or an HxWx3 array."""
    from PIL import Image

    from .images import open_rgb

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise InputError(f"cannot show an array of shape {image.shape} as an image; expected HxWx3 or 3xHxW")
        return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    if isinstance(image, (str, Path, Image.Image)):
        return np.asarray(open_rgb(image))
    raise InputError(f"cannot show an object of type {type(image).__name__} as an image")


def _thumb(image, cell: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(as_array(image).astype(np.uint8))
    img.thumbnail((cell, cell), Image.BILINEAR)
    return np.asarray(img)


def retrieval_grid(
    queries: Sequence,
    results: Sequence[Sequence],
    path: str | Path,
    *,
    matches: Sequence[Sequence[bool | None]] | None = None,
    captions: Sequence[Sequence[str]] | None = None,
    query_captions: Sequence[str] | None = None,
    cell: int = 128,
    title: str | None = None,
    palette: bool = True,
) -> Path:
    """Write a PNG with one row per query: the query (blue frame), then its results in rank order.

    ``matches[i][j]`` True/False frames result j of query i green/red; None (or no ``matches``) grey.
    Images may be paths, PIL images or uint8 tensors; ``cell`` is the size of one image in pixels.
    ``palette`` stores 256 colours (dithered) instead of full colour: photos then take a third of the bytes.
    """
    if len(queries) != len(results):
        raise InputError(f"retrieval_grid: {len(queries)} queries but {len(results)} result lists")
    if len(queries) == 0:
        raise InputError("retrieval_grid: no queries to show")
    plt = _pyplot()
    cols = 1 + max(len(r) for r in results)
    dpi = 100
    height = len(queries) * (cell + 30) / dpi + (0.3 if title else 0)
    fig, axes = plt.subplots(len(queries), cols, squeeze=False, figsize=(cols * (cell + 8) / dpi, height), dpi=dpi)
    for i, (q, res) in enumerate(zip(queries, results)):
        row = [(q, "#2b83ba", query_captions[i] if query_captions else "query")]
        for j, r in enumerate(res):
            ok = matches[i][j] if matches is not None else None
            colour = GREY if ok is None else (GREEN if ok else RED)
            row.append((r, colour, captions[i][j] if captions else f"#{j + 1}"))
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            image, colour, caption = row[j]
            ax.imshow(_thumb(image, cell))
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(caption, fontsize=7, pad=2)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.05 / height)
        top = 1 - 0.3 / height
    fig.tight_layout(pad=0.3, w_pad=0.2, h_pad=0.4, rect=(0, 0, 1, top))
    path = Path(path)
    if palette:
        from PIL import Image

        fig.canvas.draw()
        img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
        # a median-cut palette, then the image mapped onto it with dithering (no banding in skies)
        colours = img.quantize(256, method=Image.Quantize.MEDIANCUT)
        img.quantize(palette=colours, dither=Image.Dither.FLOYDSTEINBERG).save(path, format="PNG", optimize=True)
    else:
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (rundir.MetricsFile reads it); a missing file is an error here."""
    path = Path(path)
    if not path.is_file():
        raise MissingPath(f"no metrics file at {path}; it is written by udml train into the run folder")
    return MetricsFile(path).read()


def training_curves(records: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Metric and rotation losses per clustering round, and Recall@1 / NMI of every evaluation, against steps.

    ``records`` are the lines of a run's metrics.jsonl (kinds "train" and "eval").
    """
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("features", "embedding") == "embedding"]
    pooled = [r for r in records if r.get("kind") == "eval" and r.get("features") == "pooled"]
    if not train and not evals:
        raise InputError("training_curves: the metrics hold no training or evaluation records")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    ax = axes[0]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["metric_loss"] for r in train], label="metric loss", color="#2b83ba")
        if any(r.get("rotation_loss", 0) for r in train):
            ax.plot(steps, [r["rotation_loss"] for r in train], label="rotation loss", color="#fdae61")
        ax.legend(fontsize=8)
    ax.set(title="losses (mean per round)", xlabel="step")
    for ax, key, name in ((axes[1], "recall@1", "Recall@1"), (axes[2], "nmi", "NMI")):
        pts = [(r["step"], 100 * r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color="#1a9641", label="embedding")
            pp = [(r["step"], 100 * r[key]) for r in pooled if key in r]
            if pp:
                ax.plot(*zip(*pp), marker="s", ls="", color="#7b3294", label="pooled features (start)")
            ax.legend(fontsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                "no labelled test split:\nnot evaluated",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="#636363",
            )
        ax.set(title=f"{name} on the test split (%)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def tsne_2d(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float32)
    if len(x) < 5:
        raise InputError(f"a t-SNE map needs at least 5 points, got {len(x)}")
    perplexity = float(min(30, (len(x) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def embedding_map(
    embeddings: np.ndarray,
    labels: np.ndarray | None,
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    max_points: int = 2000,
    max_classes: int = 20,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """A t-SNE map of (at most ``max_points`` of) the embeddings.

    With labels, ``max_classes`` classes (all when there are that few) get distinct colours and a
    legend; the others stay as small grey points, so the picture stays readable for 100+ classes.
    """
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    n = len(embeddings)
    keep = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    xy = tsne_2d(np.asarray(embeddings)[keep], seed)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, color="#2b83ba", alpha=0.7)
    else:
        lab = np.asarray(labels)[keep]
        classes = np.unique(lab)
        shown = classes if len(classes) <= max_classes else np.sort(rng.choice(classes, max_classes, replace=False))
        rest = ~np.isin(lab, shown)
        ax.scatter(
            xy[rest, 0],
            xy[rest, 1],
            s=3,
            color=GREY,
            alpha=0.5,
            label=f"{len(classes) - len(shown)} other classes" if rest.any() else None,
        )
        cmap = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20")
        for i, c in enumerate(shown):
            m = lab == c
            name = class_names[c] if class_names is not None else str(c)
            ax.scatter(xy[m, 0], xy[m, 1], s=9, color=cmap(i % cmap.N), label=name[:24])
        ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(keep)} embeddings", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def sample_retrievals(
    embeddings: torch.Tensor, labels: np.ndarray | None, n_queries: int = 6, k: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(query indices, their top-k neighbours excluding themselves, the similarities, match flags or None)."""
    from .evaluation import knn

    n = len(embeddings)
    k = min(k, n - 1)
    if k < 1:
        raise InputError("sample_retrievals: need at least 2 embeddings")
    q = np.sort(np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False))
    qt = torch.as_tensor(q)
    sims, nn = knn(embeddings[qt], embeddings, k, exclude=qt)
    nn = nn.cpu().numpy()
    matches = None if labels is None else np.asarray(labels)[nn] == np.asarray(labels)[q][:, None]
    return q, nn, sims.cpu().numpy(), matches


def write_run_pictures(
    run_dir: str | Path,
    model,
    data,
    labels=None,
    *,
    class_names: Sequence[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = True,
    max_gallery: int = 10_000,
    seed: int = 0,
    embeddings: torch.Tensor | None = None,
) -> list[Path]:
    """curves.png, retrieval.png and embeddings.png in ``run_dir``, for a finished run.

    ``data``: the test images with the test transform, a stacked uint8 tensor [N, 3, S, S] or a Dataset of
    (uint8 tensor, index); ``labels`` their classes, or None (e.g. training images when no labelled test split
    was given: grey frames, one colour). At most ``max_gallery`` images are used. ``embeddings``: those of all of
    ``data`` when already computed (the final evaluation's), used instead of embedding ``data`` again. A picture
    that fails is logged, never raised: the run itself is done.
    """
    from .inference import extract

    run_dir = Path(run_dir)
    written = []
    try:
        written.append(training_curves(read_metrics(run_dir / METRICS), run_dir / "curves.png", title=run_dir.name))
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw curves.png: %s: %s", type(e).__name__, e)
    try:
        n = len(data)
        subset = (
            np.sort(np.random.default_rng(seed).choice(n, max_gallery, replace=False))
            if n > max_gallery
            else np.arange(n)
        )
        if isinstance(data, torch.Tensor):
            source = data[torch.as_tensor(subset, device=data.device)] if len(subset) < n else data
        else:
            source = torch.utils.data.Subset(data, subset.tolist()) if len(subset) < n else data
        if embeddings is not None and len(embeddings) == n:
            emb = embeddings.cpu()[torch.as_tensor(subset)]
        else:
            _, emb = extract(model, source, batch_size=batch_size, num_workers=num_workers, amp=amp, pooled=False)
            emb = emb.cpu()
        lab = None if labels is None else np.asarray(torch.as_tensor(labels).cpu())[subset]

        def image(i):
            return source[i] if isinstance(source, torch.Tensor) else source[i][0]

        q, nn, sims, matches = sample_retrievals(emb, lab, n_queries=4, k=6, seed=seed)
        what = "test queries" if lab is not None else "queries (no labels: grey frames)"
        written.append(
            retrieval_grid(
                [image(i) for i in q],
                [[image(j) for j in row] for row in nn],
                run_dir / "retrieval.png",
                matches=matches,
                cell=96,
                captions=[[f"#{j + 1}  {v:.3f}" for j, v in enumerate(row)] for row in sims],
                title=f"{run_dir.name}: {what} and their nearest neighbours",
            )
        )
        written.append(
            embedding_map(
                emb.numpy(),
                lab,
                run_dir / "embeddings.png",
                class_names=class_names,
                seed=seed,
                title=f"t-SNE of the {'test ' if lab is not None else ''}embeddings",
            )
        )
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw the retrieval pictures: %s: %s", type(e).__name__, e)
    if written:
        log.info("pictures: %s", ", ".join(str(p) for p in written))
    return written


# The 2-D map of a collection (udml serve): t-SNE, fitted on a sample when the collection is large.
MAP_FIT_POINTS = 5000
MAP_NEIGHBOURS = 10


def map_method(n: int, fit_points: int) -> str:
    if n < 5:
        return f"{n} images are too few for t-SNE: shown in a row"
    if n <= fit_points:
        return f"t-SNE of all {n} embeddings"
    return (
        f"t-SNE fitted on a random sample of {fit_points} of the {n} embeddings; every other image is placed "
        f"at the similarity-weighted mean of its {MAP_NEIGHBOURS} nearest sampled images"
    )


def map_2d(vectors: np.ndarray, fit_points: int = MAP_FIT_POINTS, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates [N, 2] of L2-normalised vectors, and how they were made.

    t-SNE (scikit-learn) costs minutes beyond a few thousand points on a CPU, and cannot place new points;
    so above ``fit_points`` it is fitted on a random sample and the rest are interpolated from their
    nearest sampled neighbours (exact inner-product search with faiss).
    """
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(x)
    method = map_method(n, fit_points)
    if n < 5:
        return np.c_[np.arange(n), np.zeros(n)].astype(np.float32), method
    if n <= fit_points:
        return tsne_2d(x, seed).astype(np.float32), method
    fit = np.sort(np.random.default_rng(seed).choice(n, fit_points, replace=False))
    xy_fit = tsne_2d(x[fit], seed).astype(np.float32)
    sample = faiss.IndexFlatIP(x.shape[1])
    sample.add(x[fit])
    scores, nearest = sample.search(x, MAP_NEIGHBOURS)
    weights = np.exp((scores - scores[:, :1]) / 0.05)  # softmax over similarities, temperature 0.05
    weights /= weights.sum(1, keepdims=True)
    xy = np.einsum("nk,nkd->nd", weights, xy_fit[nearest])
    xy[fit] = xy_fit
    return xy.astype(np.float32), method
