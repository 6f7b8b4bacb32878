"""Batch feature extraction of a whole 🤗 dataset with an exported encoder (a directory or a Hub repo).

    hf-ssl features --model PATH_OR_REPO --dataset NAME --output features.parquet [--split test]

Preprocessing is exactly that of `pipeline("image-feature-extraction", model=...)`: each image is opened,
EXIF-rotated and converted to RGB as `transformers.image_utils.load_image` does, then goes through the encoder's
own image processor (`AutoImageProcessor`); the feature is `modeling.backbones.pooled_features` (CNN:
`pooler_output`; ViT: CLS token of `last_hidden_state`), not normalised. Output by extension:

* `.parquet`: one row per image: `index` (row of the split), `label` (when the dataset has one), `feature`
  (list of float32); the model, dataset and split are in the schema metadata.
* `.npy`: a float32 array `[num_images, dim]` in row order.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from tqdm.auto import tqdm

from modeling.backbones import backbone_family

from .data import DataError, _describe_error, _open_image, label_column_of, load_image_dataset

FORMATS = (".parquet", ".npy")


class FeaturesError(ValueError):
    """Feature extraction cannot run; the message says why."""


def output_format(output: str | Path) -> str:
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise FeaturesError(f"--output must end in .parquet or .npy (the format is chosen by the extension), "
                            f"got {str(output)!r}")
    return suffix


def load_feature_extractor(model_name_or_path: str | Path, device="cpu"):
    """(encoder in eval mode, its image processor), as the image-feature-extraction pipeline loads them."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        encoder = AutoModel.from_pretrained(str(model_name_or_path)).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(str(model_name_or_path))
        backbone_family(encoder.config.model_type)  # its pooled feature is defined
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FeaturesError(f"cannot load an encoder and image processor from {str(model_name_or_path)!r}: {first}") \
            from None
    return encoder, processor


class _Collate:
    """Rows -> (row indices, pixel_values, labels) through the pipeline's image loading and the processor."""

    def __init__(self, dataset, image_column: str, label_column: str | None, processor):
        self.dataset, self.image_column, self.label_column, self.processor = \
            dataset, image_column, label_column, processor

    def __call__(self, indices: list[int]):
        rows = self.dataset[indices]  # one batched read
        images = []
        for index, value in zip(indices, rows[self.image_column]):
            try:
                image = _open_image(value)
                image = PIL.ImageOps.exif_transpose(image).convert("RGB")  # as transformers' load_image
            except Exception as error:  # noqa: BLE001  any unreadable image: name the row
                raise DataError(f"row {index}: {_describe_error(error)}") from None
            images.append(image)
        pixels = self.processor(images, return_tensors="pt")["pixel_values"]
        labels = rows[self.label_column] if self.label_column else None
        return indices, pixels, labels


@torch.no_grad()
def extract_dataset_features(model_name_or_path: str | Path, dataset_name: str, output: str | Path, *,
                             split: str = "train", dataset_config: str | None = None, image_column: str | None = None,
                             label_column: str | None = None, batch_size: int = 64, num_workers: int = 0,
                             device: str | None = None) -> dict:
    """Write the pooled feature of every image of `split` to `output` (.parquet or .npy); returns a summary."""
    from modeling.backbones import pooled_features

    fmt = output_format(output)
    if batch_size < 1:
        raise FeaturesError(f"--batch_size must be at least 1, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder, processor = load_feature_extractor(model_name_or_path, device)
    dataset, column = load_image_dataset(dataset_name, split, dataset_config=dataset_config, image_column=image_column)
    if not hasattr(dataset, "__len__"):
        raise FeaturesError("streaming datasets are not supported here; load the split map-style")
    try:
        labels_column = label_column_of(dataset, label_column)
    except DataError:
        if label_column is not None:
            raise
        labels_column = None  # no labels: features only

    loader = torch.utils.data.DataLoader(
        range(len(dataset)), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_Collate(dataset, column, labels_column, processor))
    indices, features, labels = [], [], []
    with tqdm(total=len(dataset), desc="features", unit="img") as progress:
        for batch_indices, pixels, batch_labels in loader:
            feature = pooled_features(encoder, pixels.to(device=device, dtype=encoder.dtype))
            features.append(feature.float().cpu().numpy())
            indices.extend(batch_indices)
            if batch_labels is not None:
                labels.extend(batch_labels)
            progress.update(len(batch_indices))
    matrix = np.concatenate(features).astype(np.float32)

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp_{output.name}")
    if fmt == ".npy":
        with tmp.open("wb") as f:
            np.save(f, matrix)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"index": pa.array(indices, type=pa.int64())}
        if labels_column is not None:
            columns["label"] = pa.array(labels)
        columns["feature"] = pa.array(list(matrix), type=pa.list_(pa.float32()))
        metadata = {"model": str(model_name_or_path), "dataset": str(dataset_name), "split": split,
                    "dataset_config": dataset_config or "", "feature_dim": str(matrix.shape[1])}
        table = pa.table(columns).replace_schema_metadata({"hf_ssl": json.dumps(metadata)})
        pq.write_table(table, tmp)
    os.replace(tmp, output)
    return {"output": str(output), "num_images": int(matrix.shape[0]), "feature_dim": int(matrix.shape[1]),
            "label_column": labels_column, "split": split}
