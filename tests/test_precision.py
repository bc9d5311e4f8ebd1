"""The CPU fast path (udml.devices): bfloat16 where the CPU has it, float32 elsewhere, channels_last; agreement with
float32 on real images; the frozen stages' outputs computed once give the numbers of recomputing them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cub_photos

from udml import devices
from udml.config import make_config
from udml.data import ImageDataset, stack
from udml.data import test_transform as eval_transform
from udml.datasets import load_folder
from udml.devices import FLOAT32, Precision, precision_for
from udml.evaluation import evaluate
from udml.inference import extract, frozen_features
from udml.models import model_from_config
from udml.session import frozen_cache_fits, prepare, resolve_num_clusters
from udml.training import train

BF16_CL = Precision("cpu", torch.bfloat16, channels_last=True)
FP32_CL = Precision("cpu", torch.float32, channels_last=True)


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU without AVX512-BF16 and without AMX, as far as PyTorch's probes say."""
    monkeypatch.delenv(devices.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_a_cpu_without_native_bfloat16_runs_float32_channels_last(no_native_bf16):
    assert not devices.cpu_has_native_bf16()
    assert precision_for("cpu") == FP32_CL and not FP32_CL.autocast_on
    assert precision_for("cpu", amp=False) == FLOAT32


def test_a_cpu_with_avx512_bf16_or_amx_runs_bfloat16(monkeypatch, no_native_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision_for("cpu") == BF16_CL
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision_for("cpu") == BF16_CL
    assert precision_for("cpu", amp=False) == FLOAT32  # amp=false: float32 NCHW whatever the CPU has


def test_the_environment_overrides_the_detection(monkeypatch, no_native_bf16):
    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")
    assert precision_for("cpu") == BF16_CL
    monkeypatch.setenv(devices.CPU_BF16_ENV, "0")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision_for("cpu") == FP32_CL


def test_the_training_session_uses_the_detected_precision(no_native_bf16):
    s = prepare(resolve_num_clusters(make_config("digits", ["device=cpu", "num_workers=0"])), torch.device("cpu"))
    assert s.precision == FP32_CL
    conv = next(m for m in s.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


FAULTS_PROBE = """
import resource, sys, torch
from udml import devices
print(devices.keep_freed_memory() if sys.argv[1] == "keep" else "default", end=" ")
for _ in range(10):  # 64 MB: over glibc's largest automatic mmap threshold; the heap settles in a few rounds
    x = torch.ones(64 * 2**20, dtype=torch.uint8); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(64 * 2**20, dtype=torch.uint8); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_on_the_cpu_instead_of_faulted_in_again():
    """A 64 MB block freed and allocated again: with glibc's defaults every allocation page-faults its 16,384
    pages in anew (the cause of half a training step's time at 224 px); kept, the block is reused."""

    def faults(mode: str, env: dict) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_PROBE, mode], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        kept, n = out.stdout.split()
        return kept, int(n)

    kept, n_kept = faults("keep", {})
    assert kept == "True"
    assert n_kept < 1_000
    assert faults("keep", {devices.KEEP_MEMORY_ENV: "0"})[0] == "False"
    _, n_default = faults("default", {})
    assert n_default > 10 * 16_000  # every one of the 10 allocations faulted its pages in
    assert devices.precision_for("cpu") and devices.keep_freed_memory()  # the CPU path turns it on


def test_layout_and_autocast():
    x = torch.zeros(2, 3, 8, 8)
    assert BF16_CL.layout(x).is_contiguous(memory_format=torch.channels_last)
    assert FLOAT32.layout(x).is_contiguous()
    with BF16_CL.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.bfloat16
    with FP32_CL.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.float32


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


def test_the_frozen_part_runs_without_autograd_and_its_statistics_stay_fixed():
    model = model_from_config(make_config("folder", ["freeze_stages=5", "pretrained=false", "freeze_bn=false"]), "cpu")
    model.train()
    net = model.backbone
    assert not net.bn1.training and not net.blocks[4].training and net.blocks[5].training
    seen = {}
    net.blocks[4].register_forward_hook(lambda m, i, o: seen.update(frozen=o.requires_grad))
    net.blocks[5].register_forward_hook(lambda m, i, o: seen.update(trained=o.requires_grad))
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    emb, logits = model(x, x)
    (emb.sum() + logits.sum()).backward()
    assert seen == {"frozen": False, "trained": True}
    assert all(p.grad is None for p in net.blocks[:5].parameters())
    assert all(p.grad is not None for p in net.blocks[5:].parameters())


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


def test_probing_the_frozen_stages_leaves_the_pretrained_network_as_it_is():
    """Sizing the frozen stages' outputs (a forward pass of blank images) changes no weight nor BatchNorm
    statistic, even on a model in training mode: the run starts from the pretrained network itself."""
    pretrained = model_from_config(make_config("folder", ["embedding_dim=null"]), "cpu").state_dict()
    for freeze_bn in (True, False):
        cfg = make_config("folder", ["embedding_dim=null", "freeze_stages=5", f"freeze_bn={freeze_bn}"])
        model = model_from_config(cfg, "cpu")
        assert not model.backbone.blocks[0].training  # frozen stages in eval mode from construction on
        model.train()
        assert frozen_cache_fits(model, precision_for("cpu"), 10, 2.0)
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in pretrained.items() if k.startswith("backbone."))
