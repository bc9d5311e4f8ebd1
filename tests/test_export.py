"""The ONNX export (udml.export) and `udml export`, checked against PyTorch and udml.load."""

import numpy as np
import pytest
import torch
from helpers import make_model, photos

import udml
from udml.cli import main
from udml.data import test_transform as eval_transform  # not collected as a test
from udml.export import export_onnx, onnx_metadata, run_onnx


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


@pytest.mark.slow
def test_onnx_matches_pytorch_for_a_vision_transformer(tmp_path):
    """A downloadable backbone (DINO ViT-S/16, random weights here) exports and runs as PyTorch runs it."""
    from udml.models import build_model

    torch.manual_seed(0)
    model = build_model("dino_vits16", pretrained=False, embedding_dim=None).eval()
    diff = export_onnx(model, tmp_path / "vit.onnx")
    assert diff is not None and diff < 1e-3
    assert onnx_metadata(tmp_path / "vit.onnx")["udml_embedding_dim"] == "384"
