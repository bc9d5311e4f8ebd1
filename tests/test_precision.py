"""bfloat16 against float32: the CPU fast path (udml.devices' precisions, channels_last) agrees with float32 on real
images; train_float32 keeps the trained layers in float32; the frozen stages' outputs computed once give the
numbers of recomputing them. Which precision a device gets: test_devices.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cub_photos
from helpers import BF16_CL, FP32_CL

from udml.config import make_config
from udml.data import ImageDataset, stack
from udml.data import test_transform as eval_transform
from udml.datasets import load_folder
from udml.devices import FLOAT32, Precision, precision_for
from udml.evaluation import evaluate
from udml.inference import extract, frozen_features
from udml.models import model_from_config
from udml.training import train

# ----------------------------------------------------------------------------------------- real images
# Measured on CUB test classes 101-108 (458 images), pretrained Lite0 at 224 px, 2-core AMD EPYC with AVX512-BF16,
# torch 2.14.1: bfloat16 channels_last against float32 NCHW, per-image cosine min 0.99509 / mean 0.99902, Recall@1
# 82.75 vs 84.50 (8 of 458 queries change their nearest neighbour), MAP@R 49.87 vs 49.74; float32 channels_last:
# cosine 1.000000, the same Recall@1. The tolerances leave room for other CPUs and oneDNN versions: cosine >= 0.99
# each and >= 0.998 on average, Recall@1 within 3 points (14 of 458 queries).
MIN_COSINE, MEAN_COSINE, RECALL_POINTS = 0.99, 0.998, 3.0


@pytest.fixture(scope="module")
def cub_eight(tmp_path_factory):
    """CUB classes 101-108 (the test classes' first eight), as 224 px centre crops, with their labels."""

    root = cub_photos(tmp_path_factory.mktemp("cub8"), range(100, 108))
    ds = ImageDataset(load_folder(root, "test"), eval_transform(224), short_side=256)
    return stack(ds), torch.as_tensor(ds.labels)


@pytest.fixture(scope="module")
def lite0():
    return model_from_config(make_config("folder", ["embedding_dim=null"]), "cpu").eval()


@pytest.fixture(scope="module")
def reference(cub_eight, lite0):
    """Lite0's float32 NCHW embeddings of the eight classes: what the fast path is compared with."""
    return embeddings(lite0, cub_eight[0], FLOAT32)


def embeddings(model, images, precision: Precision) -> torch.Tensor:
    model = precision.prepare(model)
    out = []
    with torch.no_grad(), precision.autocast():
        for x in images.split(32):
            out.append(model(precision.layout(x)).float())
    return torch.cat(out)


@pytest.mark.parametrize("fast", [BF16_CL, FP32_CL], ids=["bfloat16_channels_last", "float32_channels_last"])
def test_the_fast_path_agrees_with_float32_on_real_images(cub_eight, lite0, reference, fast):
    images, labels = cub_eight
    ref = reference
    got = embeddings(lite0, images, fast)
    cos = (ref * got).sum(1)
    assert cos.min() >= MIN_COSINE and cos.mean() >= MEAN_COSINE, (cos.min().item(), cos.mean().item())
    r_ref = evaluate(ref, labels, recall_ks=[1], compute_nmi=False)["recall@1"] * 100
    r_got = evaluate(got, labels, recall_ks=[1], compute_nmi=False)["recall@1"] * 100
    assert abs(r_got - r_ref) <= RECALL_POINTS, (r_got, r_ref)


def test_extract_runs_the_fast_path_and_float32_on_request(cub_eight, lite0):
    images, _ = cub_eight
    x = images[:24]
    ref = embeddings(lite0, x, FLOAT32)
    assert torch.equal(extract(lite0, x, amp=False, pooled=False)[1], ref)  # amp=false: float32 NCHW, exactly
    fast = extract(lite0, x, pooled=False)[1]
    assert torch.equal(fast, embeddings(lite0, x, precision_for("cpu")))
    assert (fast * ref).sum(1).min() >= MIN_COSINE


@pytest.mark.parametrize("fast", [BF16_CL, FP32_CL], ids=["bfloat16_channels_last", "float32_channels_last"])
def test_images_stay_nchw_and_the_network_still_runs_channels_last(cub_eight, lite0, fast):
    """udml's passes give the network uint8 images in NCHW (normalising channels_last images is 3x slower): the
    first convolution's channels_last weights lay the activations out, with the numbers of images laid out first."""
    x = cub_eight[0][:8]
    model = fast.prepare(lite0)
    stem = []
    hook = model.backbone.bn1.register_forward_hook(
        lambda m, i, o: stem.append(o.is_contiguous(memory_format=torch.channels_last))
    )
    try:
        with torch.no_grad(), fast.autocast():
            nchw, laid = model(x), model(fast.layout(x))
    finally:
        hook.remove()
    assert x.is_contiguous() and stem == [True, True]
    assert torch.equal(nchw, laid)


# ----------------------------------------------------------------------------------------- frozen stages
def test_frozen_stages_outputs_reused_give_the_numbers_of_recomputing_them(cub_eight):
    images, _ = cub_eight
    x = images[:40]
    model = model_from_config(make_config("folder", ["freeze_stages=5", "embedding_dim=null"]), "cpu").eval()
    assert model.frozen_stages == 5
    for amp in (True, False):
        h = frozen_features(model, x, amp=amp)
        assert h.shape == (40, 112, 14, 14)  # 21,952 values an image, kept instead of the crops
        direct = extract(model, x, amp=amp)
        reused = extract(model, h, amp=amp, frozen=True)
        assert torch.equal(direct[0], reused[0]) and torch.equal(direct[1], reused[1])
    # and the split network computes what the whole one does (float32: the same operations, in one order)
    whole = model_from_config(make_config("folder", ["freeze_stages=0", "embedding_dim=null"]), "cpu").eval()
    torch.testing.assert_close(extract(whole, x, amp=False)[1], extract(model, x, amp=False)[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("frozen", [5, 0])
def test_train_float32_runs_the_trained_layers_in_float32_under_bfloat16_autocast(frozen):
    """train_float32: the layers that train compute in float32 (their outputs and weight gradients), the frozen
    stages keep bfloat16; without it everything under autocast computes in bfloat16."""
    cfg = make_config("folder", [f"freeze_stages={frozen}", "pretrained=false", "grad_checkpointing=false"])
    model = model_from_config(cfg, "cpu")
    model.train()
    net, seen = model.backbone, {}
    net.blocks[4].register_forward_hook(lambda m, i, o: seen.update(stage5=o.dtype))
    net.conv_head.register_forward_hook(lambda m, i, o: seen.update(head=o.dtype))
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    for f32 in (False, True):
        with BF16_CL.autocast():
            emb, logits = model(BF16_CL.layout(x), BF16_CL.layout(x), trained_float32=f32)
        (emb.sum() + logits.sum()).backward()
        trained = torch.float32 if f32 else torch.bfloat16
        assert seen == {"stage5": trained if frozen == 0 else torch.bfloat16, "head": trained}
        assert emb.dtype == logits.dtype == torch.float32  # the heads are float32 either way
        assert net.conv_head.weight.grad is not None and torch.isfinite(net.conv_head.weight.grad).all()
        model.zero_grad()


def test_a_run_with_the_frozen_outputs_kept_equals_one_that_recomputes_them(tmp_path, cub_eight, udml_log):

    train_root = cub_photos(tmp_path / "train", range(0, 4))
    test_root = cub_photos(tmp_path / "test", range(100, 103))
    overrides = [
        f"data_root={train_root}",
        f"test_root={test_root}",
        "image_size=64",
        "freeze_stages=5",
        "num_clusters=8",
        "clusters_per_batch=4",
        "images_per_cluster=2",
        "rotation_images=4",
        "pseudo_epochs=2",
        "recluster_every=1",
        "epoch_images_per_cluster=2",
        "eval_every=1",
        "lr=1e-3",
        "device=cpu",
        "num_workers=0",
        "pictures=false",
    ]
    runs = {}
    for gb in (2, 0):
        cfg = make_config("folder", overrides + [f"frozen_cache_gb={gb}", f"run_name=gb{gb}", f"out_dir={tmp_path}"])
        runs[gb] = train(cfg)
    assert "computed once and kept" in udml_log.text and "recomputed at every clustering" in udml_log.text
    kept, recomputed = runs[2], runs[0]
    assert kept["final"] == recomputed["final"] and kept["start"] == recomputed["start"]
    assert np.isfinite(kept["final"]["embedding"]["recall@1"])
