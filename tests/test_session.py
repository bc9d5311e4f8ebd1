"""udml.session: what a run builds once; here the frozen stages' outputs of cached training views (frozen_views)."""

import numpy as np
import pytest
import torch

from udml.config import make_config
from udml.data import FrozenViews
from udml.devices import precision_for
from udml.inference import frozen_features
from udml.methods.udml_ss import StepSettings, training_step
from udml.models import model_from_config
from udml.session import frozen_cache_fits, prepare, prepare_views
from udml.training import train

# Lite0 with random weights at 32 px: the frozen-stage machinery of the CPU preset on a tiny problem.
LITE = ["backbone=efficientnet_lite0", "pretrained=false", "image_size=32", "resize_size=36", "freeze_stages=5"]
LITE += ["embedding_dim=16", "num_workers=0", "device=cpu", "amp=false", "num_clusters=20"]


def test_cached_views_are_the_frozen_stages_outputs_of_seeded_crops():
    s = prepare(make_config("digits", LITE + ["frozen_views=3"]), torch.device("cpu"))
    prepare_views(s)
    n = len(s.aug)
    assert s.views.shape[:2] == (n, 3)
    # view k of image i is the frozen stages' output of the crop that its seed draws
    seed = int(np.random.default_rng([s.cfg.seed, 2]).integers(0, 2**62, size=n)[7])
    crop, _ = s.aug[(7, seed)]
    torch.testing.assert_close(s.views[7, 2], frozen_features(s.model, crop[None], amp=False)[0])
    views = FrozenViews(s.views)
    assert torch.equal(views[(7, 5)][0], s.views[7, 5 % 3]) and views[(7, 6)][1] == 7
    # consecutive seeds (an image's views in one batch) pick different views
    assert not torch.equal(views[(7, 10)][0], views[(7, 11)][0])


def test_a_step_on_cached_views_is_the_step_on_their_crops():
    """The same batch as crops through the whole network, or as their frozen stages' outputs through the rest:
    the same loss and gradients (float32)."""
    s = prepare(make_config("digits", LITE), torch.device("cpu"))
    crops = torch.stack([s.aug[(i, 1000 + i)][0] for i in range(80)])
    labels = torch.arange(16).repeat_interleave(5)
    settings = StepSettings.of(s.cfg)
    grads = []
    for frozen in (False, True):
        s.model.zero_grad()
        x = frozen_features(s.model, crops, amp=False) if frozen else crops
        rotate_from = crops[::5] if frozen else None
        loss, _ = training_step(
            s.model, s.metric_loss, x, labels, settings, frozen_input=frozen, rotate_from=rotate_from
        )
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in s.model.parameters() if p.grad is not None]))
    (whole, g_whole), (cached, g_cached) = grads
    assert cached == pytest.approx(whole, rel=1e-5) and len(g_whole) == len(g_cached) > 0
    for a, b in zip(g_whole, g_cached):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_views_train_end_to_end_and_say_what_they_cost(tmp_path, udml_log):
    result = train(
        make_config(
            "digits",
            LITE
            + [
                "frozen_views=2",
                "pseudo_epochs=2",
                "recluster_every=1",
                "pictures=false",
                f"out_dir={tmp_path}",
                "run_name=v",
            ],
        )
    )
    assert result["step"] > 0 and result["final"]["embedding"]["recall@1"] > 0
    assert "frozen_views: 2 views of each training image computed" in udml_log.text


def test_frozen_views_need_frozen_stages_and_memory():
    with pytest.raises(ValueError, match="frozen_views must be 0 .* with freeze_stages set"):
        make_config("digits", ["frozen_views=2"])
    with pytest.raises(ValueError, match="over frozen_cache_gb=1e-06; raise frozen_cache_gb or lower frozen_views"):
        prepare(make_config("digits", LITE + ["frozen_views=2", "frozen_cache_gb=0.000001"]), torch.device("cpu"))


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
