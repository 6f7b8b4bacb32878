"""Unsupervised foreground masks for RELICv2's saliency masking, when a dataset has no mask column: the feature-norm
map of a self-supervised encoder (e.g. an hf-ssl DINO export), thresholded at its per-image mean, computed once per
image and cached on disk under a key of the encoder's weights + the preprocessing + the dataset's fingerprint, so that
a changed encoder, preprocessing or dataset computes new masks and an unchanged one reuses them.

`add_saliency_masks(dataset, encoder_path, ...)` returns the dataset with an image column of masks (white =
foreground), at each image's own size, so that the training decoder crops and resizes them exactly like the images;
a recipe then names that column as `model.mask_column`.
"""
import hashlib
import io
import json
import shutil
import uuid
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers import AutoModel

MASK_FORMAT = "mask-feature-norm-v1"  # part of the cache key: a change of the computation invalidates old masks


def saliency_cache_key(encoder_path: str | Path, image_size: int, mean, std, dataset_fingerprint: str) -> str:
    """sha256 of the encoder's weight files, the preprocessing (size, mean, std, mask format) and the dataset."""
    digest = hashlib.sha256()
    weights = sorted(Path(encoder_path).glob("*.safetensors")) + sorted(Path(encoder_path).glob("*.bin"))
    if not weights:
        raise ValueError(f"saliency model {encoder_path}: no weight file (*.safetensors) to key the mask cache on")
    for path in weights:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    preprocessing = {"image_size": image_size, "mean": list(mean), "std": list(std), "format": MASK_FORMAT}
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    digest.update(dataset_fingerprint.encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def feature_norm_saliency(encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[B, h, w]` L2 norm of the encoder's last feature map at every position (CNN: `[B, C, h, w]`; ViT: the patch
    tokens after the CLS token, on their square grid): large where the encoder sees an object."""
    hidden = encoder(pixel_values=pixel_values).last_hidden_state
    if hidden.dim() == 4:
        return hidden.norm(dim=1)
    tokens = hidden[:, 1:]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise ValueError(f"cannot lay {tokens.shape[1]} patch tokens on a square grid (register tokens?)")
    return tokens.norm(dim=-1).view(-1, side, side)


def _masks_of(images: list, encoder, image_size: int, mean, std) -> list[dict]:
    """PNG masks (white = norm above the image's mean norm), each at its image's size."""
    rgb = [image.convert("RGB") for image in images]
    pixels = np.stack([np.asarray(image.resize((image_size, image_size), PIL.Image.BICUBIC)) for image in rgb])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    saliency = feature_norm_saliency(encoder, x.to(encoder.dtype)).float()
    masks = []
    for image, s in zip(rgb, saliency):
        full = F.interpolate(s[None, None], size=(image.height, image.width), mode="bilinear")[0, 0]
        out = io.BytesIO()
        PIL.Image.fromarray(((full >= full.mean()).numpy() * 255).astype(np.uint8), mode="L").save(out, format="PNG")
        masks.append({"bytes": out.getvalue(), "path": None})
    return masks


def add_saliency_masks(dataset: datasets.Dataset, encoder_path: str | Path, image_column: str, image_size: int,
                       mean, std, cache_dir: str | Path, column: str = "saliency_mask",
                       batch_size: int = 64) -> datasets.Dataset:
    """`dataset` plus a `column` of foreground masks from `encoder_path` (a saved transformers vision encoder, e.g.
    OUTPUT_DIR/encoder of a DINO run), read from `cache_dir/<key>` when computed before (see `saliency_cache_key`),
    else computed and saved there (atomically: a crash leaves no half cache)."""
    if column in dataset.column_names:
        raise ValueError(f"the dataset already has a column {column!r}")
    key = saliency_cache_key(encoder_path, image_size, mean, std, dataset._fingerprint)
    target = Path(cache_dir) / key
    if not target.is_dir():
        encoder = AutoModel.from_pretrained(encoder_path).eval()
        masks = dataset.select_columns([image_column]).map(
            lambda batch: {column: _masks_of(batch[image_column], encoder, image_size, mean, std)},
            batched=True, batch_size=batch_size, remove_columns=[image_column],
            features=datasets.Features({column: datasets.Image()}))
        partial = target.with_name(f"{key}.{uuid.uuid4().hex}.partial")
        masks.save_to_disk(str(partial))
        try:
            partial.rename(target)
        except OSError:  # another process cached the same key first
            shutil.rmtree(partial, ignore_errors=True)
    masks = datasets.load_from_disk(str(target))
    if len(masks) != len(dataset):
        raise ValueError(f"cached masks {target} hold {len(masks)} rows for a dataset of {len(dataset)}")
    return datasets.concatenate_datasets([dataset, masks], axis=1)
