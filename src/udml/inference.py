"""Embedding images with a trained network, and loading one from a model file or checkpoint."""

from __future__ import annotations

import torch

from .data import make_loader
from .devices import precision_of
from .rundir import RunDir

# On the CPU the model embeds a batch in parts of at most this many images: a forward pass holds about 16 MB of
# activations per image (EfficientNet-Lite0, 224 px), so 256 images at once cost 4 GB more than 32 and run no
# faster. The parts are of equal size (tensor_split), so that none has a single image unless the batch has:
# CPU convolutions of one image take another path and round differently, parts of 2 or more give the same
# numbers as the whole batch.
CPU_CHUNK = 32


def _batches(data, batch_size, num_workers, device):
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size]
    else:
        for x, _ in make_loader(data, batch_size=batch_size, num_workers=num_workers, device=device):
            yield x


def _parts(model, data, fn, *, batch_size, num_workers, progress):
    """``fn(x)`` of every batch of ``data`` in order, in eval mode without autograd; on the CPU in parts of at
    most CPU_CHUNK items. Returns the list of outputs."""
    device = next(model.parameters()).device
    chunk = batch_size if device.type == "cuda" else CPU_CHUNK
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in _batches(data, batch_size, num_workers, device):
                for x in batch.tensor_split(-(-len(batch) // chunk)):
                    out.append(fn(x.to(device, non_blocking=True)))
                    if progress is not None:
                        progress.update(len(x))
    finally:
        model.train(was_training)
    return out


def extract(
    model,
    dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = True,
    pooled: bool = True,
    progress=None,
    frozen: bool = False,
):
    """(pooled features, embeddings) of every item of ``dataset`` (a Dataset or a stacked uint8 tensor) in
    order, in eval mode, as float32 on the model's device. ``pooled=False`` returns None for the features.
    ``amp``: the device's fast path (udml.devices), else float32. ``frozen``: ``dataset`` holds the outputs of
    the model's frozen stages (:func:`frozen_features`), and only the layers after them run."""
    precision = precision_of(model, amp)
    precision.prepare(model)

    def fn(x):
        with precision.autocast():
            p = model.pooled_from_frozen(x) if frozen else model.pooled(x)
            e = model.embed(p)
        return (p.float() if pooled else None), e

    out = _parts(model, dataset, fn, batch_size=batch_size, num_workers=num_workers, progress=progress)
    feats = torch.cat([p for p, _ in out]) if pooled else None
    return feats, torch.cat([e for _, e in out])


def frozen_features(model, dataset, *, batch_size: int = 256, num_workers: int = 0, amp: bool = True, progress=None):
    """The output of the model's frozen stem and stages (``UDMLNet.frozen_stages``) for every item of
    ``dataset``, in order, in the dtype and layout they are computed in: what :func:`extract` with
    ``frozen=True`` takes, the same numbers as running the whole network on the images."""
    precision = precision_of(model, amp)
    precision.prepare(model)

    def fn(x):
        with precision.autocast():
            return model.frozen_features(x)

    return torch.cat(_parts(model, dataset, fn, batch_size=batch_size, num_workers=num_workers, progress=progress))


def load_model(path, device: str | torch.device = "cpu"):
    """A UDMLNet from a model file (model.pt) or a training checkpoint (checkpoint.pt), in eval mode."""
    from pathlib import Path

    from .checkpoint import read_model
    from .models import ImageConfig, UDMLNet, create_backbone, set_pooling

    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        path = run.model if run.model.exists() else run.checkpoint
    arch, weights = read_model(path)
    backbone = create_backbone(arch["backbone"], pretrained=False)
    set_pooling(backbone.module, arch.get("pooling", "avg"), name=arch["backbone"])  # its p comes with the weights
    if "image" in arch:
        image = ImageConfig.from_dict(arch["image"])
    else:  # a model file or checkpoint from before ImageConfig: crop and resize sizes only
        image = ImageConfig.for_backbone(backbone, arch.get("image_size"), arch.get("resize_size"))
    model = UDMLNet(backbone, arch["embedding_dim"], arch["rotation_hidden"], image=image)
    model.load_state_dict(weights)
    return model.to(device).eval()
