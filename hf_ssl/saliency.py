"""Unsupervised foreground masks for RELICv2's saliency masking, when a dataset has no mask column: the
feature-norm map (`feature_norm_saliency`) of a self-supervised encoder (e.g. an hf-ssl DINO export), thresholded at
its per-image mean, computed once per image and cached on disk under a key of the encoder's weights + the
preprocessing + the dataset's fingerprint, so that a changed encoder, preprocessing or dataset computes new masks and
an unchanged one reuses them.

`add_saliency_masks(dataset, saliency_model, ...)` returns the dataset with an image column of masks (white =
foreground), at each image's own size, so that the training decoder crops and resizes them exactly like the images;
training calls it when a recipe names a `saliency_model` (the views then read that column as their `mask`).
"""
import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

SALIENCY_COLUMN = "saliency_mask"  # the column of computed masks, which views read as their `mask` key
MASK_FORMAT = "mask-feature-norm-v2"  # part of the cache key: a change of the computation invalidates old masks


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
    """`[B, h, w]` L2 norm of the encoder's features at every position: large where the encoder sees an object. A
    CNN's deepest feature map at least 1/8 of the input's side (its last one is often too coarse for a mask: 2 x 2
    on 32 px inputs, 7 x 7 on 224 px); a ViT's last patch tokens after the CLS token, on their square grid."""
    out = encoder(pixel_values=pixel_values, output_hidden_states=True)
    if out.last_hidden_state.dim() == 4:
        fine = [h for h in out.hidden_states if h.dim() == 4 and 8 * h.shape[-1] >= pixel_values.shape[-1]]
        return (fine[-1] if fine else out.last_hidden_state).norm(dim=1)
    tokens = out.last_hidden_state[:, 1:]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise ValueError(f"cannot lay {tokens.shape[1]} patch tokens on a square grid (register tokens?)")
    return tokens.norm(dim=-1).view(-1, side, side)


def _decode(value) -> PIL.Image.Image | None:
    """An `Image(decode=False)` cell as an RGB image, None when it cannot be read (the training decoder then
    stops or skips that row, as `on_bad_image` says; its mask is never used)."""
    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with PIL.Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, TypeError, KeyError, PIL.Image.DecompressionBombError):
        return None


def _masks_of(cells: list, encoder, image_size: int, mean, std) -> list[dict]:
    """PNG masks (white = norm above the image's mean norm), each at its image's size (1 x 1 black for an image that
    cannot be decoded)."""
    rgb = [_decode(cell) for cell in cells]
    good = [image for image in rgb if image is not None]
    saliency = iter(())
    if good:
        pixels = np.stack([np.asarray(image.resize((image_size, image_size), PIL.Image.BICUBIC)) for image in good])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        saliency = iter(feature_norm_saliency(encoder, x.to(encoder.dtype)).float())
    masks = []
    for image in rgb:
        if image is None:
            mask = np.zeros((1, 1), dtype=np.uint8)
        else:
            s = next(saliency)
            full = F.interpolate(s[None, None], size=(image.height, image.width), mode="bilinear")[0, 0]
            mask = ((full >= full.mean()).numpy() * 255).astype(np.uint8)
        out = io.BytesIO()
        PIL.Image.fromarray(mask, mode="L").save(out, format="PNG")
        masks.append({"bytes": out.getvalue(), "path": None})
    return masks


def default_saliency_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_ssl" / "saliency"


def add_saliency_masks(dataset: datasets.Dataset, saliency_model: str | Path, image_column: str,
                       cache_dir: str | Path | None = None, column: str = SALIENCY_COLUMN, batch_size: int = 64,
                       image_size: int | None = None, mean=None, std=None) -> datasets.Dataset:
    """`dataset` plus a `column` of foreground masks (`Image(decode=False)`, white = foreground) from
    `saliency_model` (an encoder directory, a training OUTPUT_DIR or a Hub repo: what `hf-ssl eval` loads), at its
    own image processor's size and normalisation unless given; read from `cache_dir/<key>` when computed before (see
    `saliency_cache_key`; default ~/.cache/hf_ssl/saliency), else computed and saved there (atomically: a crash
    leaves no half cache). Raises ValueError naming the problem when the model cannot be used."""
    from huggingface_hub import snapshot_download

    from .evaluation import EvaluationError, load_encoder

    if column in dataset.column_names:
        raise ValueError(f"the dataset already has a column {column!r}")
    try:
        encoder = load_encoder(saliency_model, image_size=image_size, image_mean=mean, image_std=std)
    except EvaluationError as err:
        raise ValueError(str(err)) from None
    if encoder.model is None:
        raise ValueError("raw-pixels has no feature map to estimate saliency from")
    weights_dir = encoder.model_dir or Path(snapshot_download(str(saliency_model)))
    key = saliency_cache_key(weights_dir, encoder.image_size, encoder.image_mean, encoder.image_std,
                             dataset._fingerprint)
    target = Path(cache_dir or default_saliency_cache_dir()) / key
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        masks = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False)).map(
            lambda batch: {column: _masks_of(batch[image_column], encoder.model, encoder.image_size,
                                             encoder.image_mean, encoder.image_std)},
            batched=True, batch_size=batch_size, remove_columns=[image_column],
            features=datasets.Features({column: datasets.Image(decode=False)}), desc="saliency masks")
        partial = target.with_name(f"{key}.{uuid.uuid4().hex}.partial")
        masks.save_to_disk(str(partial))
        try:
            partial.rename(target)
        except OSError:  # another process cached the same key first
            shutil.rmtree(partial, ignore_errors=True)
    masks = datasets.load_from_disk(str(target))
    if len(masks) != len(dataset):
        raise ValueError(f"cached masks {target} hold {len(masks)} rows for a dataset of {len(dataset)}")
    decode = getattr(dataset.features[image_column], "decode", False)
    return datasets.concatenate_datasets([dataset, masks.cast_column(column, datasets.Image(decode=decode))], axis=1)
