"""What a run holds in memory (issue #10, item 7), checked by structure rather than by resident-set thresholds:
which copies of the images are kept, and how many images the model sees at once on the CPU.
benchmarks/memory.py measures the bytes."""

import gc

import numpy as np
import pytest
import torch
from PIL import Image

from udml import data
from udml.config import make_config
from udml.data import ImageDataset, decode_stacked, stack
from udml.datasets import ImageSet
from udml.inference import CPU_CHUNK, extract
from udml.models import model_from_config
from udml.session import build_datasets, prepare


@pytest.fixture
def image_set(tmp_path):
    """Images of several sizes and modes (some larger than the resize, some smaller), and two unreadable files."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i, (w, h, mode) in enumerate(
        [
            (60, 40, "RGB"),
            (20, 30, "L"),
            (45, 45, "RGBA"),
            (33, 50, "RGB"),
            (80, 24, "P"),
            (16, 16, "RGB"),
            (40, 70, "RGB"),
        ]
    ):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
        labels.append(i % 3)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    paths[2:2] = [tmp_path / "text.png"]
    paths.append(tmp_path / "empty.png")
    labels[2:2] = [0]
    labels.append(1)
    return ImageSet([str(p) for p in paths], np.array(labels), "mixed")


def test_test_images_are_cached_as_their_crops_only(image_set):
    """cache="transformed" keeps the test transform's output, pixel for pixel what decoding, caching and then
    transforming gave, skips the same files, and is stacked without a copy."""
    transform = data.test_transform(24, resize_size=28)
    decoded = ImageDataset(image_set, transform, cache=True, short_side=28)
    crops = ImageDataset(image_set, transform, cache="transformed", short_side=28)
    assert crops.arrays is None and decoded.stacked is None
    assert crops.stacked.dtype == torch.uint8 and crops.stacked.shape == (len(decoded), 3, 24, 24)
    assert torch.equal(crops.stacked, torch.stack([decoded[i][0] for i in range(len(decoded))]))
    assert crops.items == decoded.items and crops.kept.tolist() == decoded.kept.tolist()
    assert crops.labels.tolist() == decoded.labels.tolist()
    assert torch.equal(crops[3][0], crops.stacked[3]) and crops[3][1] == 3
    assert stack(crops) is crops.stacked  # no second copy
    assert stack(crops, budget_gb=0) is crops  # over the budget: the data set, which serves its crops
    with pytest.raises(ValueError, match="transformed"):
        crops.with_transform(transform)


def test_decoding_into_one_tensor_in_chunks(image_set):
    """Chunk boundaries (and unreadable files inside and across chunks) do not change the stacked crops."""
    transform = data.test_transform(24, resize_size=28)
    whole, bad = decode_stacked(image_set.images, transform, short_side=28)
    for chunk in (1, 2, 3):
        part, bad_part = decode_stacked(image_set.images, transform, short_side=28, chunk=chunk)
        assert torch.equal(part, whole) and [b[0] for b in bad_part] == [b[0] for b in bad] == [2, 8]


def test_cpu_extract_embeds_in_parts_with_the_numbers_of_whole_batches():
    """On the CPU the backbone never sees more than CPU_CHUNK images (nor a part of one image cut from a larger
    batch: CPU convolutions of a single image round differently), and the outputs are those of whole batches."""
    model = model_from_config(make_config("digits")).eval()
    sizes = []
    model.backbone.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    n = 3 * CPU_CHUNK + 1  # 97 images: batches of 64 and 33, in parts of 32, 32 and 17, 16
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pooled, emb = extract(model, x, batch_size=64, amp=False)  # float32, to compare with model.pooled
    assert max(sizes) <= CPU_CHUNK and min(sizes) >= 2 and sum(sizes) == n
    with torch.no_grad():
        whole = torch.cat([model.pooled(b) for b in x.split(64)])
    assert torch.equal(pooled, whole) and torch.equal(emb, model.embed(whole))


def test_a_session_holds_the_training_images_twice_and_the_test_images_once():
    """After prepare(): the training images decoded (the training transform crops them at random) and as their
    centre crops; the test images only as their crops, not even while they are read."""
    cfg = make_config("digits", ["num_workers=0", "device=cpu"])
    test = build_datasets(cfg, 32)[2]
    assert test.arrays is None and len(test.stacked) == len(test)
    del test
    s = prepare(cfg, torch.device("cpu"))
    gc.collect()
    held = [o for o in gc.get_objects() if type(o) is ImageDataset]
    decoded = {id(o.arrays) for o in held if o.arrays is not None}
    assert decoded == {id(s.aug.arrays)}  # the train- and test-transform views share one cache
    assert len(s.aug.arrays) == len(s.aug)
    assert isinstance(s.train_plain, torch.Tensor) and isinstance(s.test_plain, torch.Tensor)
    assert len(s.test_plain) == len(s.test_labels)
    assert all(o.stacked is None or o.stacked is s.test_plain for o in held)
