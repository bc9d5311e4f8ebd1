"""The two random-crop rules of the training transform."""

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from udml.data import ClampedRandomResizedCrop, train_transform


@pytest.mark.parametrize("size", [(384, 256), (256, 384), (300, 300)])
def test_clamped_crop_boxes_lie_in_the_image_and_are_larger_than_torchvisions(size):
    img = Image.new("RGB", size)
    areas = {}
    for rule in (T.RandomResizedCrop, ClampedRandomResizedCrop):
        torch.manual_seed(0)
        boxes = [rule.get_params(img, (0.16, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)]
        for i, j, h, w in boxes:
            assert 0 <= i <= size[1] - h and 0 <= j <= size[0] - w and h >= 1 and w >= 1
        areas[rule] = sum(h * w for _, _, h, w in boxes) / len(boxes) / (size[0] * size[1])
    # expected area fraction without any rejection: E[scale] = 0.58, less what the clamp cuts off
    assert 0.50 < areas[ClampedRandomResizedCrop] < 0.58
    if size[0] != size[1]:  # torchvision's redraws favour small boxes on non-square images
        assert areas[T.RandomResizedCrop] < areas[ClampedRandomResizedCrop] - 0.05


def test_train_transform_crop_rule():
    img = Image.new("RGB", (300, 200))
    for rule in ("torchvision", "clamped"):
        x = train_transform(64, crop_rule=rule)(img)
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
