"""udml.load: a trained model from its file, ready to embed PIL images and paths as the network does, without the
training configuration (udml.inference.load_model behind udml.retrieval.Embedder); `import udml` stays light."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_model, photos

import udml
from udml.data import test_transform as eval_transform  # not collected as a test


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
