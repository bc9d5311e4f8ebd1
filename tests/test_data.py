"""udml.data: the training transform (TrainCrop), torchvision's Resize -> RandomResizedCrop -> flip -> tensor in one
resampling, checked against torchvision itself; the two random-crop rules; crops made together in one batch; and a
cached data set's items alone, in a batch and through loader workers."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from udml.data import TrainCrop, crop_box, train_transform

SCALE, RATIO = (0.16, 1.0), (3 / 4, 4 / 3)


def boxes(rule: str, size, n: int = 3000):
    gen = torch.Generator().manual_seed(0)
    return [crop_box(size[0], size[1], SCALE, RATIO, rule, torch.rand(22, generator=gen).tolist()) for _ in range(n)]


def mean_area(bs, size) -> float:
    return sum(h * w for _, _, h, w in bs) / len(bs) / (size[0] * size[1])


@pytest.mark.parametrize("size", [(384, 256), (256, 384), (300, 300), (900, 200)])
def test_the_torchvision_rule_draws_boxes_as_torchvisions_random_resized_crop(size):
    ours = boxes("torchvision", size)
    torch.manual_seed(0)
    img = Image.new("RGB", size)
    theirs = [T.RandomResizedCrop.get_params(img, SCALE, RATIO) for _ in range(3000)]
    for i, j, h, w in ours:
        assert 0 <= i <= size[1] - h and 0 <= j <= size[0] - w and h >= 1 and w >= 1
    for k in (2, 3):  # heights, widths: the same distribution (3,000 draws each)
        a, b = np.array([x[k] for x in ours]), np.array([x[k] for x in theirs])
        assert abs(a.mean() - b.mean()) < 0.04 * b.mean() and abs(a.std() - b.std()) < 0.06 * b.std()
    assert abs(mean_area(ours, size) - mean_area(theirs, size)) < 0.015


@pytest.mark.parametrize("size", [(384, 256), (256, 384), (300, 300)])
def test_clamped_crop_boxes_lie_in_the_image_and_are_larger_than_torchvisions(size):
    areas = {}
    for rule in ("torchvision", "clamped"):
        bs = boxes(rule, size)
        for i, j, h, w in bs:
            assert 0 <= i <= size[1] - h and 0 <= j <= size[0] - w and h >= 1 and w >= 1
        areas[rule] = mean_area(bs, size)
    # expected area fraction without any rejection: E[scale] = 0.58, less what the clamp cuts off
    assert 0.50 < areas["clamped"] < 0.58
    if size[0] != size[1]:  # torchvision's redraws favour small boxes on non-square images
        assert areas["torchvision"] < areas["clamped"] - 0.05


def photo(size=(300, 200)) -> Image.Image:
    """A smooth real-looking test image (gradients and a disc), so that resampling differences stay small."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    r = ((x - w / 2) ** 2 + (y - h / 3) ** 2) < (h / 4) ** 2
    a = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * r], axis=2)
    return Image.fromarray(a.astype(np.uint8))


@pytest.mark.parametrize("source", [(300, 200), (200, 300), (73, 64)])
def test_one_resampling_gives_the_pixels_of_torchvisions_four_transforms(source, monkeypatch):
    """Same box: TrainCrop's single resampling against Resize -> crop -> resize -> flip -> PILToTensor."""
    img, size, resize = photo(source), 64, 73
    crop = TrainCrop(size, resize)
    rw, rh = crop.resized_size(*img.size)
    assert T.Resize(resize)(img).size == (rw, rh)
    for seed in range(20):
        torch.manual_seed(seed)
        ours = crop(img)
        torch.manual_seed(seed)
        u = torch.rand(23).tolist()
        i, j, h, w = crop_box(rw, rh, SCALE, RATIO, "torchvision", u[:-1])
        ref = T.functional.resized_crop(T.Resize(resize)(img), i, j, h, w, [size, size])
        if u[-1] < 0.5:
            ref = T.functional.hflip(ref)
        ref = T.PILToTensor()(ref)
        assert ours.shape == ref.shape == (3, size, size) and ours.dtype == torch.uint8 and ours.is_contiguous()
        assert (ours.float() - ref.float()).abs().mean() < 2.0  # of 255: two resamplings against one


def test_train_transform_crop_rule_and_grayscale():
    img = Image.new("RGB", (300, 200))
    for rule in ("torchvision", "clamped"):
        x = train_transform(64, crop_rule=rule)(img)
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert train_transform(32)(Image.new("L", (50, 40))).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="crop_rule must be one of"):
        TrainCrop(64, 73, rule="center")


def test_train_crop_size_makes_the_training_crops_smaller_than_the_test_crops():
    from udml.config import make_config
    from udml.session import build_datasets

    cfg = make_config("digits", ["image_size=32", "train_crop_size=24"])
    aug, plain, test = build_datasets(cfg, 32)
    assert aug[0][0].shape == (3, 24, 24)
    assert plain[0][0].shape == test[0][0].shape == (3, 32, 32)
    assert aug.transform.resize == plain.transform.transforms[0].size  # both from the images resized for 32 px
    with pytest.raises(ValueError, match="train_crop_size must be"):
        make_config("digits", ["train_crop_size=2"])


# ----------------------------------------------------------------------------------------- crops made together
@pytest.fixture(scope="module")
def omniglot_pack():
    """The default job's training images (Omniglot drawings shipped with the package), cached at 28 px, and its
    training transform."""
    from udml.config import make_config
    from udml.session import build_datasets

    aug, _, _ = build_datasets(make_config("omniglot_mini", []), 28)
    return aug


def test_enlarging_crops_made_together_are_pillows_to_one_grey_level(omniglot_pack):
    crop = TrainCrop(28, 28, scale=(0.6, 1.0))  # the pack's transform, with flips (the pack's has none)
    assert (omniglot_pack.transform.size, omniglot_pack.transform.scale) == (crop.size, crop.scale)
    arrays = [omniglot_pack.array(i) for i in range(0, 4800, 16)]  # 300 drawings
    draws = []
    for k, a in enumerate(arrays):
        torch.manual_seed(k)
        draws.append(crop.draw(a.shape[1], a.shape[0]))
    assert all(x1 - x0 <= crop.size and y1 - y0 <= crop.size for (x0, y0, x1, y1), _ in draws)  # all enlarge
    ours = torch.stack(crop.batch(arrays, draws))
    pil = torch.stack([crop.resample(Image.fromarray(a), *d) for a, d in zip(arrays, draws)])
    diff = (ours.int() - pil.int()).abs()
    assert ours.shape == (300, 3, 28, 28) and ours.dtype == torch.uint8
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.03  # measured: 0.8 % of the pixels, by 1
    assert any(f for _, f in draws) and not all(f for _, f in draws)  # flipped and not


def test_shrinking_crops_go_through_pillow_and_shapes_may_differ():
    crop = TrainCrop(24, 27)
    arrays = [np.asarray(photo(size)) for size in [(60, 40), (40, 60), (60, 40), (26, 24)] * 5]
    draws = []
    for k, a in enumerate(arrays):
        torch.manual_seed(k)
        draws.append(crop.draw(a.shape[1], a.shape[0]))
    ours = crop.batch(arrays, draws)
    for a, d, x in zip(arrays, draws, ours):
        pil = crop.resample(Image.fromarray(a), *d)
        (left, top, right, bottom), _ = d
        if right - left > 24 or bottom - top > 24:
            assert torch.equal(x, pil)  # Pillow's own
        else:
            assert (x.int() - pil.int()).abs().max() <= 1
    assert {tuple(x.shape) for x in ours} == {(3, 24, 24)}


def test_a_cached_item_is_the_same_alone_in_a_batch_and_through_loader_workers(omniglot_pack):
    from udml.data import make_loader

    keys = [(i, 1000 + i) for i in range(0, 400, 5)]
    alone = torch.stack([omniglot_pack[k][0] for k in keys])
    batch = torch.stack([x for x, _ in omniglot_pack.__getitems__(keys)])
    assert torch.equal(alone, batch)
    for workers in (0, 2):
        (x, idx), *_ = list(make_loader(omniglot_pack, batch_sampler=[keys], num_workers=workers))
        assert torch.equal(x, alone) and idx.tolist() == [i for i, _ in keys]
