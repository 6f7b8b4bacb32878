"""On-device view recipes."""
import pytest
import torch

import modeling
from hf_ssl.augment import (
    SeededViews,
    build_views,
    byol_crop_pipeline,
    check_input_columns_cover_views,
    check_views_match_forward,
    grid_crops,
    patch_grid,
    patch_grid_shape,
)


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


@pytest.mark.parametrize("recipe, sizes", [
    ("multicrop", dict(global_crop_size=32, num_local_crops=1, local_crop_size=16)),
    ("two_views", dict(crop_size=32)),
])
def test_color_jitter_strength_reaches_every_crop(recipe, sizes):
    import kornia.augmentation as K

    default = build_views(recipe, (0.5,) * 3, (0.5,) * 3, **sizes)
    grey = build_views(recipe, (0.5,) * 3, (0.5,) * 3, color_jitter_strength=[0.3, 0.2, 0.0, 0.0], **sizes)
    for views, expected in ((default, (0.4, 0.4, 0.2, 0.1)), (grey, (0.3, 0.2, 0.0, 0.0))):
        jitters = [m for m in views.modules() if isinstance(m, K.ColorJitter)]
        assert len(jitters) in (2, 3)  # one per crop
        for jitter in jitters:
            assert tuple(float(getattr(jitter, k)) for k in ("brightness", "contrast", "saturation", "hue")) == \
                pytest.approx(expected)
    # brightness and contrast keep a grey image grey: its three channels stay equal
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8).expand(-1, 3, -1, -1)
    for view in grey(images, seed=0).values():
        assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 1], view[:, 2])


# Views of commit b47a59c (before view recipes took the whole batch) for a fixed 4-image batch and seed 123, as
# float64 sums: a changed random draw moves a sum by far more than rounding. Computed on CPU with torch 2.13.0 and
# kornia 0.9.0; a CPU with other vector kernels may move the last bits (recompute them with b47a59c's code then).
PINNED_VIEW_SUMS = {
    "multicrop": {"global_crops": -1305.9891775250435, "local_crops": -655.2446462512016},
    "multicrop rows 1:3 of 4": {"global_crops": -951.3243705034256, "local_crops": -138.92268025875092},
    "two_views": {"view_1": 326.4904438853264, "view_2": -726.4313166737556},
    "two_views rows 1:3 of 4": {"view_1": 224.71244657039642, "view_2": -455.45192766189575},
}


def pinned_recipes():
    return {"multicrop": multicrop(), "two_views": build_views("two_views", (0.5,) * 3, (0.5,) * 3, crop_size=16)}


def test_views_are_bit_identical_to_the_pinned_ones():
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name, views in pinned_recipes().items():
        for label, out in ((name, views(images, seed=123)),
                           (f"{name} rows 1:3 of 4", views(images[1:3], seed=123, offset=1, total=4))):
            assert {key: value.double().sum().item() for key, value in out.items()} == PINNED_VIEW_SUMS[label], label
        # the batch dict the data loader yields gives the same views; keys the recipe does not read are ignored
        batch = {"pixel_values": images, "labels": torch.arange(4), "bad_images": []}
        assert {key: value.double().sum().item() for key, value in views(batch, seed=123).items()} == \
            PINNED_VIEW_SUMS[name]


def test_recipes_declare_their_outputs_and_inputs():
    assert multicrop().output_names() == ("global_crops", "local_crops")
    assert multicrop(num_local_crops=0).output_names() == ("global_crops",)
    assert build_views("two_views", (0.5,) * 3, (0.5,) * 3).output_names() == ("view_1", "view_2")
    assert multicrop().input_names == ("pixel_values",)


class MaskedViews(SeededViews):
    """A RELICv2-like recipe: the foreground mask is applied before the augmentation."""

    input_names = ("pixel_values", "mask")

    def __init__(self, outputs=("view",)):
        super().__init__()
        self.outputs = outputs
        self.pipeline = byol_crop_pipeline(8, (0.5, 1.0), 0.0, 0.0, 0.8, 0.2, 0.5, (0.5,) * 3, (0.5,) * 3)

    def output_names(self):
        return ("view",)

    def make_views(self, batch):
        self.seen = batch
        return dict.fromkeys(self.outputs, self.augment(self.pipeline, batch["pixel_values"] * batch["mask"]))


def test_views_read_extra_batch_keys_scaled_to_unit_range():
    images = torch.full((3, 3, 16, 16), 255, dtype=torch.uint8)
    mask = torch.zeros(3, 1, 16, 16, dtype=torch.uint8)
    mask[..., 8:] = 255
    views = MaskedViews()
    out = views({"pixel_values": images, "mask": mask, "labels": torch.arange(3)}, seed=0)
    assert set(views.seen) == {"pixel_values", "mask"}  # only what the recipe reads
    assert views.seen["mask"].dtype == torch.float32 and set(views.seen["mask"].unique().tolist()) == {0.0, 1.0}
    assert out["view"].shape == (3, 3, 8, 8)

    with pytest.raises(ValueError, match=r"MaskedViews reads batch key\(s\) \['mask'\], not in the batch"):
        views(images, seed=0)
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be a uint8 image batch"):
        views({"pixel_values": images, "mask": mask.float()}, seed=0)
    with pytest.raises(ValueError, match="different numbers of rows"):
        views({"pixel_values": images, "mask": mask[:2]}, seed=0)
    with pytest.raises(RuntimeError, match=r"returned \['other'\] but output_names\(\) declares \['view'\]"):
        MaskedViews(outputs=("other",))({"pixel_values": images, "mask": mask}, seed=0)
    with pytest.raises(RuntimeError, match="call it from make_views"):
        views.augment(views.pipeline, images.float())


# ----------------------------------------------------------------------------------------- per-patch views


def test_patch_grid_and_grid_crops_are_image_major_and_row_major():
    images = torch.arange(2 * 6 * 6).reshape(2, 1, 6, 6)
    crops = grid_crops(images, 2)
    assert crops.shape == (8, 1, 3, 3)
    assert torch.equal(crops[1, 0], images[0, 0, :3, 3:]) and torch.equal(crops[2, 0], images[0, 0, 3:, :3])
    assert torch.equal(crops[4, 0], images[1, 0, :3, :3])
    patches = patch_grid(images, 4, 2)
    assert patch_grid_shape(6, 6, 4, 2) == (2, 2) and patches.shape == (8, 1, 4, 4)
    assert torch.equal(patches[1, 0], images[0, 0, :4, 2:]) and torch.equal(patches[7, 0], images[1, 0, 2:, 2:])
    assert torch.equal(patch_grid(images, 3, 3), grid_crops(images, 2))

    with pytest.raises(ValueError, match="does not split into a 4x4 grid"):
        grid_crops(images, 4)
    with pytest.raises(ValueError, match=r"patches of 4 px, 3 px apart, do not tile an image height of 6 px"):
        patch_grid(images, 4, 3)


class PerPatchViews(SeededViews):
    """A CPC-v2-like recipe: every image cut into overlapping patches, each patch augmented on its own."""

    def __init__(self, cut):
        super().__init__()
        self.cut = cut
        self.pipeline = byol_crop_pipeline(6, (0.5, 1.0), 0.5, 0.2, 0.8, 0.2, 0.5, (0.5,) * 3, (0.5,) * 3)

    def output_names(self):
        return ("patches",)

    def make_views(self, batch):
        x = batch["pixel_values"]
        patches = self.cut(x)
        return {"patches": self.augment(self.pipeline, patches, rows_per_image=patches.shape[0] // x.shape[0])}


@pytest.mark.parametrize("cut, per_image", [(lambda x: patch_grid(x, 8, 4), 9), (lambda x: grid_crops(x, 2), 4)],
                         ids=["patch_grid", "grid_crops"])
def test_per_patch_views_are_a_function_of_the_image_not_of_the_process_split(cut, per_image):
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    views = PerPatchViews(cut)
    whole = views(images, seed=7)["patches"]
    assert whole.shape == (6 * per_image, 3, 6, 6)
    # two processes holding images 0:2 and 2:6 of the global batch produce its rows
    parts = [views(images[a:b], seed=7, offset=a, total=6)["patches"] for a, b in ((0, 2), (2, 6))]
    assert torch.equal(torch.cat(parts), whole)
    # every patch has its own augmentation: the patches of a flat image come out different
    flat = views(torch.full((2, 3, 16, 16), 128, dtype=torch.uint8), seed=7)["patches"]
    assert not torch.equal(flat[0], flat[1])
    with pytest.raises(ValueError, match=r"augment got 7 rows for 2 images x rows_per_image=3"):
        views.cut = lambda x: torch.zeros(7, 3, 16, 16)
        views(images[:2], seed=7, offset=0, total=6)


# ----------------------------------------------------------------------------------- views match forward


def test_check_views_match_forward_with_the_real_models():
    dino, moco = modeling.METHODS["dino"].model_class.forward, modeling.METHODS["moco"].model_class.forward
    check_views_match_forward(multicrop(), dino, ("teacher_temperature",))
    check_views_match_forward(multicrop(num_local_crops=0), dino, ())  # local_crops and the temperature default
    check_views_match_forward(build_views("two_views", (0.5,) * 3, (0.5,) * 3), moco, ())
    with pytest.raises(ValueError, match=r"TwoViews produces \['view_1', 'view_2'\], which "
                                         r"DinoForPreTraining.forward does not take"):
        check_views_match_forward(build_views("two_views", (0.5,) * 3, (0.5,) * 3), dino, ())
    with pytest.raises(ValueError, match=r"MultiCropViews produces \['global_crops', 'local_crops'\], which "
                                         r"MocoForPreTraining.forward does not take \(it takes \['view_1', 'view_2'\]\)"):
        check_views_match_forward(multicrop(), moco, ())
    with pytest.raises(ValueError, match=r"schedule values include \['teacher_temperature'\], which "
                                         "MocoForPreTraining.forward does not take"):
        check_views_match_forward(build_views("two_views", (0.5,) * 3, (0.5,) * 3), moco, ("teacher_temperature",))


def test_check_views_match_forward_with_dummy_forwards():
    views = MaskedViews()  # produces "view"

    def needs_a_scale(view, scale, return_dict=True):
        pass

    def needs_more(view, other, *, temperature, momentum=0.9):
        pass

    def takes_anything(view, **kwargs):
        pass

    check_views_match_forward(views, needs_a_scale, ("scale",))
    check_views_match_forward(views, takes_anything, ("scale", "temperature"))
    with pytest.raises(ValueError, match=r"needs_a_scale requires \['scale'\], which neither view recipe MaskedViews "
                                         r"\(it produces \['view'\]\) nor the schedule values \(\[\]\) provide"):
        check_views_match_forward(views, needs_a_scale, ())
    with pytest.raises(ValueError, match=r"requires \['other', 'temperature'\]"):
        check_views_match_forward(views, needs_more, ())
    with pytest.raises(ValueError, match=r"produces \['view'\], which are also schedule values"):
        check_views_match_forward(views, takes_anything, ("view",))
    with pytest.raises(ValueError, match=r"produces \['view'\], which .*lambda.* does not take"):
        check_views_match_forward(views, lambda images: None, ())


def test_input_columns_must_cover_what_the_views_read():
    check_input_columns_cover_views(multicrop(), {})
    check_input_columns_cover_views(MaskedViews(), {"mask": "foreground"})
    with pytest.raises(ValueError, match=r"MaskedViews reads batch key\(s\) \['mask'\], which the model's "
                                         r"input_columns\(\) \{\} do not provide"):
        check_input_columns_cover_views(MaskedViews(), {})


def test_a_mask_column_reaches_the_views_through_the_data_loader():
    import io

    import datasets
    import numpy as np
    import PIL.Image

    from hf_ssl.data import ImageDecoder, build_dataloader

    def png(array):
        buffer = io.BytesIO()
        PIL.Image.fromarray(array).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rng = np.random.default_rng(0)
    images = [png(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)) for _ in range(4)]
    masks = [png(np.full((16, 20), 255 * (i % 2), dtype=np.uint8)) for i in range(4)]
    dataset = datasets.Dataset.from_dict({"image": images, "fg": masks}, features=datasets.Features(
        {"image": datasets.Image(decode=False), "fg": datasets.Image(decode=False)}))
    input_columns = {"mask": "fg"}  # what a RELICv2-like model's input_columns() would return
    views = MaskedViews()
    check_input_columns_cover_views(views, input_columns)
    loader = build_dataloader(dataset, ImageDecoder("image", 16, extra_columns=input_columns), 4, shuffle=False,
                              seed=0, num_workers=0)
    batch = next(iter(loader))
    out = views(batch, seed=0)
    assert views.seen["mask"][:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert (out["view"][0::2] == -1.0).all()  # masked to black, then normalised with mean = std = 0.5
    assert not (out["view"][1::2] == -1.0).all()
