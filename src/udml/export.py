"""ONNX export of a trained embedding network (images -> L2-normalised embeddings).

The exported graph contains the normalisation, so callers only resize and centre-crop to the
model's ``image_size`` (shorter side to ``resize_size`` first) and pass RGB pixels in NCHW order:
``uint8`` input (0-255), or ``float`` input (float32, still 0-255, not normalised). The batch size
is dynamic.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import InputError, MissingPackage

INPUT_KINDS = ("uint8", "float")


class _EmbeddingGraph(nn.Module):
    """forward(x) = embedding of x, with pixels in 0-255 of the chosen input type."""

    def __init__(self, model: nn.Module, input_kind: str):
        super().__init__()
        self.model, self.input_kind = model, input_kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_kind == "float":  # same arithmetic as UDMLNet.normalize does for uint8 input
            x = (x - self.model.mean) / self.model.std
        return self.model.embed(self.model.pooled(x))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_kind: str = "uint8",
    opset: int = 17,
    check: bool = True,
    batch: int = 2,
) -> float | None:
    """Write ``model`` (a UDMLNet in eval mode, see :func:`udml.inference.load_model`) as ONNX to ``path``.

    Inputs are named ``images`` ([B, 3, S, S], S = model.image_size), outputs ``embeddings`` ([B, D]).
    The image size and resize size are stored as metadata properties. With ``check`` (and onnxruntime
    installed) the file is run on random images and the largest absolute difference from PyTorch
    is returned.
    """
    if input_kind not in INPUT_KINDS:
        raise InputError(f"input_kind must be one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")
    require_onnx(runtime=check)
    model = model.cpu().eval()
    size = int(model.image_size)
    graph = _EmbeddingGraph(model, input_kind).eval()
    dummy = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    example = dummy if input_kind == "uint8" else dummy.float()
    path = Path(path)
    with warnings.catch_warnings():
        # The TorchScript-based exporter: the torch.export-based one needs the onnxscript package.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["embeddings"],
            opset_version=opset,
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
        )
    _add_metadata(
        path,
        {
            "udml_image_size": str(size),
            "udml_resize_size": str(model.image.resize_size),
            "udml_input": input_kind,
            "udml_embedding_dim": str(model.embedding_dim),
        },
    )
    if not check:
        return None
    x = torch.randint(0, 256, (batch + 1, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_onnx(path, x.numpy() if input_kind == "uint8" else x.float().numpy())
    return float(np.abs(got - expected).max())


def require_onnx(runtime: bool = True) -> None:
    """ONNX export needs onnx (and onnxruntime to check the file); both are udml dependencies, but an environment
    assembled by hand may lack them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime")[: 2 if runtime else 1] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackage(
            f"udml export needs the package(s) {', '.join(missing)}, which are not installed in this "
            f"Python environment; install udml with its dependencies (pip install -e . in a checkout, "
            f"or pip install {' '.join(missing)})"
        )


def _add_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def run_onnx(path: str | Path, images: np.ndarray) -> np.ndarray:
    """Embeddings of ``images`` ([B, 3, S, S], the dtype the file was exported for) by onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embeddings"], {"images": images})[0]


def onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
