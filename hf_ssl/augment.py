"""Batched, on-device view generation (kornia), one named recipe per kind of view a method needs.

A view recipe is an `nn.Module` called as `views(batch, seed)`: `batch` is the data loader's batch dict (already on
the training device), of which the recipe reads the uint8 image batches named by its `input_names` (`pixel_values`,
`[B, 3, H, W]`, plus extra columns such as a foreground mask `[B, 1, H, W]`, see `data.ImageDecoder`); `seed` fixes
every random draw of the call, so that the same step gets the same views after a resume. It returns the keyword
arguments of the method's `forward`, named by its `output_names()`; `check_views_match_forward` compares the two when
a run is set up. Methods name their recipe in the registry (`modeling.METHODS[...].views`).
"""
import difflib
import inspect

import kornia.augmentation as K
import torch
from torch import nn

# The CPC patch cutter lives with the model (its patch-mean image feature cuts the same grid); re-exported here.
from modeling.cpc.patches import patch_grid, patch_grid_shape  # noqa: F401


def _blur_kernel(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10 % of the crop size (BYOL/DINO use 23 px at 224 px), at least 3."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 else k + 1


def check_crop(name: str, size, scale) -> None:
    """ValueError unless `size` is a positive int and `scale` a (min, max) area fraction with 0 < min <= max <= 1."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"{name}_size must be a positive number of pixels, got {size!r}")
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)):
        raise ValueError(f"{name}_scale must be [min, max], got {scale!r}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{name}_scale must satisfy 0 < min <= max <= 1 (fractions of the image area), "
                         f"got {list(scale)}")


def check_probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


# BYOL's / DINO's colour-jitter strengths: brightness, contrast, saturation, hue.
COLOR_JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)


def check_color_jitter_strength(value) -> None:
    """ValueError unless `value` is [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5."""
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
            or value[3] > 0.5):
        raise ValueError("color_jitter_strength must be [brightness, contrast, saturation, hue], each >= 0 and hue "
                         f"<= 0.5, got {value!r}")


def byol_crop_pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
                       color_jitter_p: float, grayscale_p: float, flip_p: float,
                       mean: tuple[float, ...], std: tuple[float, ...],
                       color_jitter_strength: tuple[float, float, float, float] = COLOR_JITTER_STRENGTH
                       ) -> nn.Sequential:
    """The BYOL/DINO augmentation of one crop: random resized crop, flip, colour jitter, grayscale, blur,
    solarize, normalise. Input float in [0, 1]. On grey images (replicated to 3 channels) saturation and hue change
    nothing: a strength of 0 for them skips kornia's HSV round trip, about 90 % of the jitter's time."""
    check_crop("crop", size, scale)
    check_color_jitter_strength(color_jitter_strength)
    for name, p in (("blur_p", blur_p), ("solarize_p", solarize_p), ("color_jitter_p", color_jitter_p),
                    ("grayscale_p", grayscale_p), ("flip_p", flip_p)):
        check_probability(name, p)
    stages = [K.RandomResizedCrop((size, size), scale=tuple(scale)), K.RandomHorizontalFlip(p=flip_p)]
    if color_jitter_p > 0:
        stages.append(K.ColorJitter(*color_jitter_strength, p=color_jitter_p))
    if grayscale_p > 0:
        stages.append(K.RandomGrayscale(p=grayscale_p))
    if blur_p > 0:
        stages.append(K.RandomGaussianBlur(_blur_kernel(size), (0.1, 2.0), p=blur_p))
    if solarize_p > 0:
        # threshold fixed at 0.5 and no brightness addition: torchvision's / PIL's solarize.
        stages.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))
    stages.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    return nn.Sequential(*stages)


# kornia parameters that are one value for the whole call, not one per sample (ColorJitter's order of operations).
_SHARED_PARAMS = ("order",)


def slice_parameters(params: dict[str, torch.Tensor], total: int, start: int, stop: int,
                     local_shape: torch.Size) -> dict[str, torch.Tensor]:
    """The kornia parameters of rows `start:stop` out of parameters drawn for a batch of `total` rows."""
    sliced = {}
    for key, value in params.items():
        if key == "forward_input_shape":
            sliced[key] = torch.tensor(tuple(local_shape), dtype=value.dtype, device=value.device)
        elif key in _SHARED_PARAMS:
            sliced[key] = value
        elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == total:
            sliced[key] = value[start:stop]
        else:
            raise ValueError(f"cannot take rows {start}:{stop} of the kornia parameter {key!r} (shape "
                             f"{tuple(getattr(value, 'shape', ()))}) drawn for a batch of {total}")
    return sliced


def grid_crops(images: torch.Tensor, grid: int) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B * grid * grid, C, H / grid, W / grid]`: every image cut into `grid x grid`
    non-overlapping crops (Fast-MoCo), image-major and row-major within an image; H and W must divide by `grid`."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    height, width = images.shape[-2:]
    if height % grid or width % grid:
        raise ValueError(f"a {height}x{width} image does not split into a {grid}x{grid} grid of equal crops")
    crop_h, crop_w = height // grid, width // grid
    crops = images.unfold(2, crop_h, crop_h).unfold(3, crop_w, crop_w)  # [B, C, grid, grid, h, w]
    return crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1], crop_h, crop_w)


class SeededViews(nn.Module):
    """A view recipe whose every random draw comes from `seed`: `forward(batch, seed)` scales the uint8 image batches
    it reads (`input_names`) to float32 in [0, 1] and calls `make_views` with them inside a forked RNG seeded with
    `seed` (the global RNG is left untouched). Extra columns such as masks are scaled too, so that the same kornia
    stages can resample them (a resampled mask edge is a soft weight in [0, 1]); a recipe thresholds them if it needs
    hard masks. `batch` may also be a bare uint8 tensor, taken as `{"pixel_values": batch}`.

    Global-batch augmentation: `forward(batch, seed, offset=o, total=n)` treats the batch as images `o:o+B` of a
    global batch of `n` images (spread over processes). Every augmentation's random parameters are drawn for all `n`
    images, in the same order as for one process holding the whole batch, and only this process's rows are applied
    (`augment`). So the views of an image depend on (seed, its row in the global batch), never on the number of
    processes: W processes produce exactly the rows of the one-process views.
    """

    # Batch keys `make_views` reads (each a uint8 image batch); a recipe that also reads e.g. a mask extends it.
    input_names: tuple[str, ...] = ("pixel_values",)
    # What to set when an extra batch key is not provided (appended to check_input_columns_cover_views' error).
    input_hints: dict[str, str] = {}

    _rows: tuple[int, int, int] | None = None  # (offset, stop, total) of this process's images during forward

    def output_names(self) -> tuple[str, ...]:
        """The keyword arguments of `forward` this recipe returns, as set up (checked against the model's forward)."""
        raise NotImplementedError

    def make_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def augment(self, pipeline: nn.Sequential, x: torch.Tensor, rows_per_image: int = 1) -> torch.Tensor:
        """Run the kornia `pipeline` on `x`, drawing each stage's parameters for the global batch.

        `x` holds `rows_per_image` consecutive rows per image of this process, image-major (e.g. the patches of
        `patch_grid`, the crops of `grid_crops`): parameters are drawn for `total * rows_per_image` rows in the
        one-process order and this process's rows are applied, so every row gets its own augmentation and the views
        stay a pure function of (seed, image)."""
        if self._rows is None:
            raise RuntimeError("augment draws from the seed of a forward call: call it from make_views")
        if isinstance(rows_per_image, bool) or not isinstance(rows_per_image, int) or rows_per_image < 1:
            raise ValueError(f"rows_per_image must be a positive int, got {rows_per_image!r}")
        start, stop, total = (rows * rows_per_image for rows in self._rows)
        if x.shape[0] != stop - start:
            raise ValueError(f"augment got {x.shape[0]} rows for {self._rows[1] - self._rows[0]} images x "
                             f"rows_per_image={rows_per_image}")
        if start == 0 and stop == total:
            return pipeline(x)
        for stage in pipeline:
            params = stage.forward_parameters(torch.Size((total, *x.shape[1:])))
            x = stage(x, params=slice_parameters(params, total, start, stop, x.shape))
        return x

    def draw_per_image(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """`[B]` uniform numbers in [0, 1), one per image of this process, drawn for the whole global batch in the
        one-process order (like `augment`'s parameters), so that e.g. a per-image coin flip does not depend on the
        number of processes."""
        if self._rows is None:
            raise RuntimeError("draw_per_image draws from the seed of a forward call: call it from make_views")
        start, stop, total = self._rows
        return torch.rand(total, device=device)[start:stop]

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor, seed: int, offset: int = 0,
                total: int | None = None) -> dict[str, torch.Tensor]:
        inputs = self._scaled_inputs({"pixel_values": batch} if torch.is_tensor(batch) else batch)
        size = next(iter(inputs.values())).shape[0]
        total = size if total is None else total
        if not 0 <= offset <= offset + size <= total:
            raise ValueError(f"rows {offset}:{offset + size} are not inside a global batch of {total}")
        device = next(iter(inputs.values())).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(seed)
            self._rows = (offset, offset + size, total)
            try:
                views = self.make_views(inputs)
            finally:
                self._rows = None
        if set(views) != set(self.output_names()):
            raise RuntimeError(f"{type(self).__name__}.make_views returned {sorted(views)} but output_names() declares "
                               f"{sorted(self.output_names())}")
        return views

    def _scaled_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The uint8 image batches named by `input_names`, as float32 in [0, 1]; a missing or odd one is named."""
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise ValueError(f"{type(self).__name__} reads batch key(s) {missing}, not in the batch (keys: "
                             f"{sorted(batch)}); the model's input_columns() must ask the data loader for them")
        inputs = {}
        for name in self.input_names:
            value = batch[name]
            if not torch.is_tensor(value) or value.dtype != torch.uint8 or value.dim() != 4:
                raise ValueError(f"batch[{name!r}] must be a uint8 image batch [B, C, H, W], got "
                                 f"{getattr(value, 'dtype', type(value).__name__)} of shape "
                                 f"{tuple(getattr(value, 'shape', ()))}")
            inputs[name] = value.float().div_(255)
        sizes = {name: value.shape[0] for name, value in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the batch's images and extra columns have different numbers of rows: {sizes}")
        return inputs


class MultiCropViews(SeededViews):
    """DINO multi-crop: `num_global_crops` large crops (the first blurred always, the second rarely and solarized
    sometimes) and `num_local_crops` small ones. Returns `global_crops` / `local_crops` stacked crop-major.

    Args:
        global_crop_size, local_crop_size: output side of the large / small crops, in pixels.
        global_crop_scale, local_crop_scale: [min, max] area fraction of the image each crop covers.
        num_local_crops: small crops per image (0: none).
        color_jitter_p, grayscale_p, flip_p: probabilities of colour jitter, grayscale and horizontal flip, per crop.
        global_blur_p, global_solarize_p: one Gaussian-blur / solarize probability per global crop.
        local_blur_p: Gaussian-blur probability of the small crops.
        color_jitter_strength: [brightness, contrast, saturation, hue]; 0 for saturation and hue is faster on grey
            images, where they change nothing.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], global_crop_size: int = 224,
                 global_crop_scale: tuple[float, float] = (0.4, 1.0), num_local_crops: int = 8,
                 local_crop_size: int = 96, local_crop_scale: tuple[float, float] = (0.05, 0.4),
                 color_jitter_p: float = 0.8, grayscale_p: float = 0.2, flip_p: float = 0.5,
                 global_blur_p: tuple[float, float] = (1.0, 0.1), global_solarize_p: tuple[float, float] = (0.0, 0.2),
                 local_blur_p: float = 0.5,
                 color_jitter_strength: tuple[float, float, float, float] = COLOR_JITTER_STRENGTH):
        super().__init__()
        check_crop("global_crop", global_crop_size, global_crop_scale)
        check_crop("local_crop", local_crop_size, local_crop_scale)
        if isinstance(num_local_crops, bool) or not isinstance(num_local_crops, int) or num_local_crops < 0:
            raise ValueError(f"num_local_crops must be an int >= 0, got {num_local_crops!r}")
        for name, values in (("global_blur_p", global_blur_p), ("global_solarize_p", global_solarize_p)):
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"{name} needs one probability per global crop, got {values!r}")
            for value in values:
                check_probability(name, value)
        for name, value in (("color_jitter_p", color_jitter_p), ("grayscale_p", grayscale_p), ("flip_p", flip_p),
                            ("local_blur_p", local_blur_p)):
            check_probability(name, value)
        if len(global_blur_p) != len(global_solarize_p):
            raise ValueError("global_blur_p and global_solarize_p need one value per global crop, got "
                             f"{list(global_blur_p)} and {list(global_solarize_p)}")
        common = dict(color_jitter_p=color_jitter_p, grayscale_p=grayscale_p, flip_p=flip_p, mean=mean, std=std,
                      color_jitter_strength=color_jitter_strength)
        self.global_crops = nn.ModuleList(
            byol_crop_pipeline(global_crop_size, global_crop_scale, blur, sol, **common)
            for blur, sol in zip(global_blur_p, global_solarize_p))
        self.local_crops = nn.ModuleList(
            byol_crop_pipeline(local_crop_size, local_crop_scale, local_blur_p, 0.0, **common)
            for _ in range(num_local_crops))

    def output_names(self) -> tuple[str, ...]:
        return ("global_crops", "local_crops") if len(self.local_crops) else ("global_crops",)

    def make_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["pixel_values"]
        views = {"global_crops": torch.cat([self.augment(crop, x) for crop in self.global_crops])}
        if len(self.local_crops):
            views["local_crops"] = torch.cat([self.augment(crop, x) for crop in self.local_crops])
        return views


class TwoViews(SeededViews):
    """Two augmented views of every image (BYOL / MoCo v2 / MoCo v3), returned as `view_1` and `view_2`, each
    `[B, C, crop_size, crop_size]`. The defaults are BYOL's / MoCo v3's asymmetric pair: blur always on view 1 and
    rarely (0.1) on view 2, solarize only on view 2 (0.2). MoCo v2's augmentation: `blur_p: [0.5, 0.5]`,
    `solarize_p: [0.0, 0.0]` (its colour jitter has saturation 0.4 instead of 0.2; no difference on grey images).

    Args:
        crop_size: output side of both views, in pixels.
        crop_scale: [min, max] area fraction of the image each view covers.
        color_jitter_p, grayscale_p, flip_p: probabilities of colour jitter, grayscale and horizontal flip, per view.
        blur_p, solarize_p: one Gaussian-blur / solarize probability per view.
        color_jitter_strength: [brightness, contrast, saturation, hue]; 0 for saturation and hue is faster on grey
            images, where they change nothing.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], crop_size: int = 224,
                 crop_scale: tuple[float, float] = (0.08, 1.0), color_jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 flip_p: float = 0.5, blur_p: tuple[float, float] = (1.0, 0.1),
                 solarize_p: tuple[float, float] = (0.0, 0.2),
                 color_jitter_strength: tuple[float, float, float, float] = COLOR_JITTER_STRENGTH):
        super().__init__()
        if len(blur_p) != 2 or len(solarize_p) != 2:
            raise ValueError(f"blur_p and solarize_p need one value per view (2), got {list(blur_p)} and "
                             f"{list(solarize_p)}")
        common = dict(color_jitter_p=color_jitter_p, grayscale_p=grayscale_p, flip_p=flip_p, mean=mean, std=std,
                      color_jitter_strength=color_jitter_strength)
        self.views = nn.ModuleList(byol_crop_pipeline(crop_size, crop_scale, blur, solarize, **common)
                                   for blur, solarize in zip(blur_p, solarize_p))

    def output_names(self) -> tuple[str, ...]:
        return ("view_1", "view_2")

    def make_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["pixel_values"]
        return {"view_1": self.augment(self.views[0], x), "view_2": self.augment(self.views[1], x)}


class GridViews(TwoViews):
    """Fast-MoCo: `TwoViews` (defaults: MoCo v2's symmetric augmentation, blur p 0.5 on both views, no solarize) plus
    each view cut into a `grid x grid` grid of crops (`grid_crops`, on the augmented view: the augmentation is per
    view, the cut is deterministic): `view_1`, `view_2` `[B, C, S, S]` and `crops_1`, `crops_2`
    `[B * grid², C, S / grid, S / grid]`, image-major. `grid` must equal the model's `grid_size` (the model checks the
    crop count) and divide `crop_size`.

    Args:
        grid: each view is cut into grid x grid crops (the model's `grid_size`); the other keys are `TwoViews`'.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], crop_size: int = 224,
                 crop_scale: tuple[float, float] = (0.2, 1.0), color_jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 flip_p: float = 0.5, blur_p: tuple[float, float] = (0.5, 0.5),
                 solarize_p: tuple[float, float] = (0.0, 0.0),
                 color_jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1), grid: int = 2):
        super().__init__(mean=mean, std=std, crop_size=crop_size, crop_scale=crop_scale, color_jitter_p=color_jitter_p,
                         grayscale_p=grayscale_p, flip_p=flip_p, blur_p=blur_p, solarize_p=solarize_p,
                         color_jitter_strength=color_jitter_strength)
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        if crop_size % grid:
            raise ValueError(f"crop_size={crop_size} does not split into a {grid}x{grid} grid of equal crops")
        self.grid = grid

    def output_names(self) -> tuple[str, ...]:
        return ("view_1", "view_2", "crops_1", "crops_2")

    def make_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = super().make_views(batch)
        return {**views, "crops_1": grid_crops(views["view_1"], self.grid),
                "crops_2": grid_crops(views["view_2"], self.grid)}


class RelicViews(MultiCropViews):
    """RELICv2: DINO's multi-crop (L = len(global_blur_p) large crops, S = `num_local_crops` small ones) with saliency
    masking, and the seed of the model's negative sampling. Returns `large_crops` `[L, B, C, H, W]`, `small_crops`
    `[S, B, C, h, w]` (when S > 0), view-major, and `negatives_seed` (a 0-d tensor, an integer < 2**24 so that it
    survives the cast to the training dtype), drawn from the step's seed like every augmentation.

    Saliency masking: each large crop of each image is, with probability `mask_p` (a coin per crop and image), cut from
    the image with its background removed (set to black, where the foreground mask of batch key `mask` is below 0.5)
    before cropping and augmentation. Unlike the paper's pseudocode, which overwrites the image so that a masked image
    leaks into the later crops (large and small), every crop starts from the original image: the coins are independent
    and the small crops are never masked (our choice: p_m is then exactly the probability of a masked large crop).
    With `mask_p` > 0 the recipe reads the mask: a dataset column (the model's `mask_column`) or the masks
    computed from the recipe's `saliency_model`."""

    input_hints = {"mask": "augmentation.mask_p > 0 needs a foreground mask: set model.mask_column to the dataset's "
                           "mask column, or saliency_model to an encoder that estimates it"}

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], global_crop_size: int = 224,
                 global_crop_scale: tuple[float, float] = (0.4, 1.0), num_local_crops: int = 6,
                 local_crop_size: int = 96, local_crop_scale: tuple[float, float] = (0.05, 0.4),
                 color_jitter_p: float = 0.8, grayscale_p: float = 0.2, flip_p: float = 0.5,
                 global_blur_p: tuple[float, float] = (1.0, 0.1), global_solarize_p: tuple[float, float] = (0.0, 0.2),
                 local_blur_p: float = 0.5,
                 color_jitter_strength: tuple[float, float, float, float] = COLOR_JITTER_STRENGTH,
                 mask_p: float = 0.0):
        super().__init__(mean=mean, std=std, global_crop_size=global_crop_size, global_crop_scale=global_crop_scale,
                         num_local_crops=num_local_crops, local_crop_size=local_crop_size,
                         local_crop_scale=local_crop_scale, color_jitter_p=color_jitter_p, grayscale_p=grayscale_p,
                         flip_p=flip_p, global_blur_p=global_blur_p, global_solarize_p=global_solarize_p,
                         local_blur_p=local_blur_p, color_jitter_strength=color_jitter_strength)
        check_probability("mask_p", mask_p)
        self.mask_p = mask_p
        self.input_names = ("pixel_values", "mask") if mask_p > 0 else ("pixel_values",)

    def output_names(self) -> tuple[str, ...]:
        crops = ("large_crops", "small_crops") if len(self.local_crops) else ("large_crops",)
        return crops + ("negatives_seed",)

    def make_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["pixel_values"]
        foreground = x * (batch["mask"] >= 0.5) if self.mask_p > 0 else None
        large = []
        for crop in self.global_crops:
            source = x
            if foreground is not None:  # one coin per image of the global batch, drawn before this crop's parameters
                masked = self.draw_per_image(x.device) < self.mask_p
                source = torch.where(masked[:, None, None, None], foreground, x)
            large.append(self.augment(crop, source))
        views = {"large_crops": torch.stack(large)}
        if len(self.local_crops):
            views["small_crops"] = torch.stack([self.augment(crop, x) for crop in self.local_crops])
        views["negatives_seed"] = torch.randint(0, 2**24, (), device=x.device)
        return views


class RandomColorDrop(K.IntensityAugmentationBase2D):
    """CPC v2's colour dropping: every channel but one, drawn per sample, set to 0 (after normalisation: the channel's
    mean). Not kornia's RandomChannelDropout: its parameters hold absolute row numbers, which `slice_parameters` cannot
    cut into one process's rows."""

    def __init__(self, p: float = 1.0):
        super().__init__(p=p, same_on_batch=False, p_batch=1.0)

    def generate_parameters(self, batch_shape: torch.Size) -> dict[str, torch.Tensor]:
        return {"kept_channel": torch.randint(0, batch_shape[1], (batch_shape[0],))}

    def apply_transform(self, input, params, flags, transform=None) -> torch.Tensor:
        kept = torch.nn.functional.one_hot(params["kept_channel"].to(input.device), input.shape[1]).to(input.dtype)
        return input * kept[:, :, None, None]


class PatchGridViews(SeededViews):
    """CPC v2: every image cut into its grid of overlapping `patch_size` px patches, `patch_stride` px apart
    (`patch_grid`), each patch augmented on its own (`augment(..., rows_per_image=rows * columns)`, so the views stay a
    pure function of (seed, image)): a random resized crop back to `patch_size` (crop jitter), flip, colour jitter,
    grayscale, normalisation, then two of the three colour channels set to 0 (the mean) with probability
    `color_drop_p` (the paper's colour dropping). Returns `patches` `[B * rows * columns, C, patch_size, patch_size]`,
    image-major and row-major. On grey images (Fashion-MNIST) the three channels are equal: colour dropping removes no
    information there and only dims the patch; jitter's saturation and hue change nothing."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], patch_size: int = 64, patch_stride: int = 32,
                 patch_crop_scale: tuple[float, float] = (0.6, 1.0), flip_p: float = 0.5, color_jitter_p: float = 0.8,
                 color_jitter_strength: tuple[float, float, float, float] = COLOR_JITTER_STRENGTH,
                 grayscale_p: float = 0.0, color_drop_p: float = 1.0):
        super().__init__()
        patch_grid_shape(patch_size, patch_size, patch_size, patch_stride)  # positive ints
        check_probability("color_drop_p", color_drop_p)
        self.patch_size, self.patch_stride = patch_size, patch_stride
        stages = list(byol_crop_pipeline(patch_size, patch_crop_scale, blur_p=0.0, solarize_p=0.0,
                                         color_jitter_p=color_jitter_p, grayscale_p=grayscale_p, flip_p=flip_p,
                                         mean=mean, std=std, color_jitter_strength=color_jitter_strength))
        if color_drop_p > 0:
            stages.append(RandomColorDrop(p=color_drop_p))
        self.patch_pipeline = nn.Sequential(*stages)

    def output_names(self) -> tuple[str, ...]:
        return ("patches",)

    def make_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["pixel_values"]
        rows, columns = patch_grid_shape(x.shape[-2], x.shape[-1], self.patch_size, self.patch_stride)
        patches = patch_grid(x, self.patch_size, self.patch_stride)
        return {"patches": self.augment(self.patch_pipeline, patches, rows_per_image=rows * columns)}


VIEW_RECIPES: dict[str, type[SeededViews]] = {
    "multicrop": MultiCropViews,
    "two_views": TwoViews,
    "grid_views": GridViews,
    "relic_views": RelicViews,


    "patch_grid": PatchGridViews,
}


def build_views(recipe: str, mean, std, **kwargs) -> SeededViews:
    """The view recipe `recipe` with `kwargs` from the training recipe's `augmentation:` section."""
    if recipe not in VIEW_RECIPES:
        raise ValueError(f"Unknown view recipe {recipe!r}; valid: {', '.join(VIEW_RECIPES)}")
    cls = VIEW_RECIPES[recipe]
    valid = [p for p in inspect.signature(cls).parameters if p not in ("mean", "std")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        hints = "".join(f"; did you mean {match[0]!r} for {key!r}?" for key in unknown
                        if (match := difflib.get_close_matches(key, valid, n=1, cutoff=0.5)))
        raise ValueError(f"Unknown augmentation key(s) {unknown} for view recipe {recipe!r}{hints}; "
                         f"valid keys: {valid}")
    return cls(mean=tuple(mean), std=tuple(std), **kwargs)


def check_views_match_forward(views: SeededViews, forward, schedule_names=()) -> None:
    """ValueError naming the mismatch when `forward(**views(...), **schedule_values)` would fail: found when a run is
    set up instead of at its first step. `forward` may be the unbound `XForPreTraining.forward`; `return_dict` is
    ignored; `schedule_names` are the keys of the model's `schedule_values`."""
    parameters = list(inspect.signature(forward).parameters.values())
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    recipe, target = type(views).__name__, getattr(forward, "__qualname__", repr(forward))
    produced, schedule = tuple(views.output_names()), tuple(schedule_names)
    twice = sorted(set(produced) & set(schedule))
    if twice:
        raise ValueError(f"view recipe {recipe} produces {twice}, which are also schedule values: {target} would get "
                         "them twice")
    keywords = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        for what, names in ((f"view recipe {recipe} produces", produced), ("the schedule values include", schedule)):
            unknown = [name for name in names if name not in keywords]
            if unknown:
                raise ValueError(f"{what} {unknown}, which {target} does not take (it takes "
                                 f"{[name for name in keywords if name != 'return_dict']})")
    provided = {*produced, *schedule, "return_dict"}
    required = [p.name for p in parameters if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [name for name in required if name not in provided]
    if missing:
        raise ValueError(f"{target} requires {missing}, which neither view recipe {recipe} (it produces "
                         f"{list(produced)}) nor the schedule values ({list(schedule)}) provide")


def check_input_columns_cover_views(views: SeededViews, input_columns: dict[str, str]) -> None:
    """ValueError when the view recipe reads a batch key that neither the image (`pixel_values`) nor the model's
    `input_columns()` put in the batch: found when a run is set up instead of at its first step."""
    missing = [name for name in views.input_names if name != "pixel_values" and name not in input_columns]
    if missing:
        hints = "".join(f"; {views.input_hints[name]}" for name in missing if name in views.input_hints)
        raise ValueError(f"view recipe {type(views).__name__} reads batch key(s) {missing}, which the model's "
                         f"input_columns() {dict(input_columns)} do not provide: the method must map each to a dataset "
                         f"column{hints}")
