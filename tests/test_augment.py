"""On-device view recipes."""
import pytest
import torch

from hf_ssl.augment import build_views


def multicrop(**kwargs):
    defaults = dict(global_crop_size=32, num_local_crops=3, local_crop_size=16)
    return build_views("multicrop", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), **{**defaults, **kwargs})


def test_multicrop_shapes_are_crop_major_and_normalised():
    images = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    views = multicrop()(images, seed=0)
    assert views["global_crops"].shape == (2 * 5, 3, 32, 32)
    assert views["local_crops"].shape == (3 * 5, 3, 16, 16)
    for v in views.values():
        assert v.dtype == torch.float32 and v.min() >= -1.0 - 1e-4 and v.max() <= 1.0 + 1e-4


def test_views_are_a_function_of_the_seed_only():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    views = multicrop()
    a, b, c = views(images, seed=3), views(images, seed=3), views(images, seed=4)
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])
    assert not torch.equal(a["global_crops"], c["global_crops"])
    # the global RNG is left as it was
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    views(images, seed=5)
    assert torch.equal(torch.rand(1), expected)


def test_two_global_crops_of_one_image_differ():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    g = multicrop(num_local_crops=0)(images, seed=1)["global_crops"]
    assert not torch.equal(g[:2], g[2:])


def test_no_local_crops():
    views = multicrop(num_local_crops=0)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), seed=0)
    assert set(views) == {"global_crops"}


def test_unknown_augmentation_key_is_named():
    with pytest.raises(ValueError, match=r"Unknown augmentation key\(s\) \['local_crops'\]"):
        multicrop(local_crops=4)
    with pytest.raises(ValueError, match="Unknown view recipe"):
        build_views("mosaic", (0.5,), (0.5,))
