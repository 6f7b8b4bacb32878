"""The grid of overlapping square patches CPC encodes one by one (pure torch: the view recipe `patch_grid` cuts it
before augmenting each patch, and `patch_mean_features` cuts it from whole images)."""
import torch


def patch_grid_shape(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """(rows, columns) of the `patch_size` patches `stride` apart that tile a `height x width` image exactly; other
    sizes are a ValueError saying which would tile, rather than pixels silently left out of every patch."""
    for name, value in (("patch_size", patch_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    shape = []
    for side, length in (("height", height), ("width", width)):
        if length < patch_size or (length - patch_size) % stride:
            raise ValueError(f"patches of {patch_size} px, {stride} px apart, do not tile an image {side} of {length} "
                             f"px exactly (the {side} must be {patch_size} + a multiple of {stride})")
        shape.append((length - patch_size) // stride + 1)
    return shape[0], shape[1]


def patch_grid(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B * rows * columns, C, patch_size, patch_size]`: the (overlapping when `stride <
    patch_size`) grid of square patches of every image (CPC v2), image-major and row-major within an image, so that
    `SeededViews.augment(pipeline, patches, rows_per_image=rows * columns)` augments each patch on its own."""
    patch_grid_shape(images.shape[-2], images.shape[-1], patch_size, stride)  # the grid tiles the image exactly
    patches = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # [B, C, rows, columns, p, p]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1], patch_size, patch_size)
