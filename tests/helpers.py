"""Plain helpers that several test files share. The fixtures, and the helpers that find the shared data, are in
conftest.py."""

import numpy as np
import torch
from PIL import Image

from udml.checkpoint import save_model
from udml.config import make_config
from udml.devices import Precision
from udml.models import model_from_config

# The CPU fast path's two precisions (udml.devices): bfloat16 or float32, both channels_last.
BF16_CL = Precision("cpu", torch.bfloat16, channels_last=True)
FP32_CL = Precision("cpu", torch.float32, channels_last=True)


def make_model(tmp_path, backbone="smallconv", size=32, resize=None):
    """A seeded untrained network saved as tmp_path/model.pt; returns the path and the network (eval mode)."""
    cfg = make_config(
        None,
        {
            "backbone": backbone,
            "pretrained": backbone != "smallconv",
            "embedding_dim": 24,
            "image_size": size,
            "resize_size": resize,
        },
    )
    torch.manual_seed(0)
    model = model_from_config(cfg)
    if backbone == "smallconv":  # non-trivial BatchNorm statistics, so that eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "model.pt"
    save_model(model, cfg, path)
    return path, model.eval()


def photos(n, seed=0):
    """``n`` random RGB images of random sizes (30 to 59 px a side)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (rng.integers(30, 60), rng.integers(30, 60), 3), dtype=np.uint8))
        for _ in range(n)
    ]


def brute_force_neighbours(x: np.ndarray, query: np.ndarray, k: int, exclude: int | None = None):
    """The ``k`` rows of ``x`` nearest ``query`` by float64 inner product (``exclude`` left out), and their scores."""
    scores = x.astype(np.float64) @ query.astype(np.float64)
    if exclude is not None:
        scores[exclude] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]
