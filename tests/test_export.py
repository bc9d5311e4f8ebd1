"""udml.load (inference without the training configuration) and the ONNX export."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import udml
from udml.checkpoint import save_model
from udml.cli import main
from udml.config import make_config
from udml.data import test_transform as eval_transform  # not collected as a test
from udml.export import export_onnx, onnx_metadata, run_onnx
from udml.models import model_from_config


def make_model(tmp_path, backbone="smallconv", size=32, resize=None):
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
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (rng.integers(30, 60), rng.integers(30, 60), 3), dtype=np.uint8))
        for _ in range(n)
    ]


def test_import_udml_does_not_import_torch():
    code = "import sys, udml; assert callable(udml.load); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_embeds_pil_images_and_paths_like_the_model(tmp_path):
    path, model = make_model(tmp_path, resize=40)
    embedder = udml.load(path, amp=False)  # float32: the same numbers as the model's own forward
    assert (embedder.dim, embedder.image.crop_size, embedder.image.resize_size) == (24, 32, 40)
    ims = photos(5)
    ims[1].save(tmp_path / "one.png")
    ims[2].convert("L").save(tmp_path / "grey.png")
    got = embedder.embed([ims[0], str(tmp_path / "one.png"), tmp_path / "grey.png", ims[3], ims[4]], batch_size=2)
    t = eval_transform(32, resize_size=40)
    ref_inputs = [ims[0], ims[1], ims[2].convert("L").convert("RGB"), ims[3], ims[4]]
    with torch.no_grad():
        ref = model(torch.stack([t(im) for im in ref_inputs])).numpy()
    assert got.shape == (5, 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(embedder(ims[0]), ref[:1], atol=1e-5)  # one image: one row
    assert embedder.embed([]).shape == (0, 24)
    with pytest.raises(ValueError, match="cannot read .*missing.jpg"):
        embedder.embed([tmp_path / "missing.jpg"])
    with pytest.raises(FileNotFoundError, match="no model at"):
        udml.load(tmp_path / "nothing.pt")


@pytest.mark.parametrize("input_kind", ["uint8", "float"])
def test_onnx_matches_pytorch_smallconv(tmp_path, input_kind):
    path, model = make_model(tmp_path)
    diff = export_onnx(model, tmp_path / "m.onnx", input_kind=input_kind)
    assert diff is not None and diff < 1e-4
    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)  # another batch size than at export
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(tmp_path / "m.onnx", x.numpy() if input_kind == "uint8" else x.float().numpy())
    assert got.shape == (7, 24)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    meta = onnx_metadata(tmp_path / "m.onnx")
    assert meta["udml_image_size"] == "32" and meta["udml_input"] == input_kind


def test_onnx_matches_pytorch_efficientnet_lite0(tmp_path):
    path, model = make_model(tmp_path, backbone="efficientnet_lite0", size=64)
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    export_onnx(model, tmp_path / "l0.onnx", check=False)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "l0.onnx", x.numpy()), ref, atol=1e-4, rtol=0)


def test_export_command_and_bad_input(tmp_path, capsys):
    path, _ = make_model(tmp_path, resize=36)
    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "matches PyTorch" in out and "resized to 36" in out
    # the exported file on real images, preprocessed the documented way, agrees with udml.load
    ims = photos(3, seed=1)
    t = eval_transform(32, resize_size=36)
    got = run_onnx(tmp_path / "m.onnx", torch.stack([t(im) for im in ims]).numpy())
    np.testing.assert_allclose(got, udml.load(path, amp=False).embed(ims), atol=1e-4, rtol=0)  # both float32
    with pytest.raises(ValueError, match="input_kind must be one of uint8, float"):
        export_onnx(udml.load(path).model, tmp_path / "x.onnx", input_kind="int8")


def test_export_without_onnx_names_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    path, _ = make_model(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "pip install" in err
    assert not (tmp_path / "m.onnx").exists()
