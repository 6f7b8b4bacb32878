"""Image datasets for self-supervised pretraining: loading, decoding and the bad-image policy.

The pipeline is split so that the expensive parts run where they belong:

* :func:`load_image_dataset` opens any 🤗 dataset (Hub name, ``save_to_disk`` directory, image
  folder, parquet files, or the built-in ``"fashion_mnist"``) and finds its image column. It never
  decodes an image: the column is cast to ``Image(decode=False)``, so rows carry encoded bytes or a
  file path.
* :class:`ImageDecoder` is the DataLoader ``collate_fn``: it decodes, fixes orientation and colour
  mode, resizes and center-crops on the CPU workers and returns a ``uint8`` batch, with any extra
  image columns a method's views need (a foreground mask) decoded alike so that their pixels line
  up. Augmentation happens later, on the accelerator. Unreadable images are either an error naming the row/file or
  are skipped and reported in the batch (``"bad_images"``).
* :func:`build_dataloader` wires both into a reproducible ``torch.utils.data.DataLoader``.

:func:`fashion_mnist` provides the demo dataset: from the Hub when it is reachable, otherwise built
once from Debian's ``dataset-fashion-mnist`` idx files into a ``save_to_disk`` cache with the Hub
schema.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import urllib.request
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
import fsspec
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from huggingface_hub import constants as hub_constants

logger = logging.getLogger(__name__)

FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_LABELS = [
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "HF_SSL_FASHION_MNIST_DIR"
_FASHION_MNIST_FILE_PREFIX = {"train": "train", "test": "t10k"}
_FASHION_MNIST_HINT = (
    "Install the Debian package with `sudo apt-get install dataset-fashion-mnist`, or set "
    f"{FASHION_MNIST_DIR_ENV} to a directory holding "
    "{train,t10k}-images-idx3-ubyte.gz and {train,t10k}-labels-idx1-ubyte.gz."
)

# Rows handed to ImageDecoder may carry their dataset index under this key (see build_dataloader).
INDEX_KEY = "__index__"

# Shards used when a local dataset is streamed: a power of two, so that it divides evenly between
# the usual numbers of processes x workers (datasets' split_dataset_by_node then splits by shard).
_LOCAL_STREAMING_SHARDS = 1024

# idx type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A dataset, split, column, row or file that cannot be used, with a message saying which."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image_dataset(
    name_or_path: str,
    split: str = "train",
    *,
    dataset_config: str | None = None,
    image_column: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    extra_columns: Iterable[str] = (),
) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
    """Open an image dataset and return ``(dataset, image_column)``.

    Args:
        name_or_path: ``"fashion_mnist"`` (built in, see :func:`fashion_mnist`), a Hub dataset name,
            a directory written by ``save_to_disk``, an image-folder directory, or a parquet
            file / directory / glob.
        split: split to load. Sources read by ``datasets.load_dataset`` also accept its split
            syntax (``"train[:10%]"``); ``fashion_mnist`` and ``save_to_disk`` directories take
            plain split names.
        dataset_config: configuration (subset) name of a Hub dataset.
        image_column: column holding the images; default: the first column whose feature is
            ``datasets.Image``.
        streaming: return a ``datasets.IterableDataset``. Local sources are loaded map-style and
            turned into an iterable dataset with many shards, so that ``split_dataset_by_node``
            and DataLoader workers can share them out (a streamed image folder has one shard).
        cache_dir: 🤗 datasets cache directory (for ``fashion_mnist``: see :func:`fashion_mnist`).
        extra_columns: more image columns the views need (the values of a model's
            ``input_columns()``, e.g. a foreground mask), checked here so that a missing one fails
            before training. Each must be an ``Image`` column or hold encoded bytes or file paths.

    The image column and the ``Image`` extra columns are cast to ``Image(decode=False)``: rows hold
    ``{"bytes", "path"}`` and decoding happens in :class:`ImageDecoder`, on the DataLoader workers.

    Raises:
        DataError: the dataset cannot be found or opened, the split does not exist (the message
            lists the available ones), there is no Image column (the message lists the columns),
            the requested image column or an extra column is missing or holds no images, or the
            split is empty.
    """
    if name_or_path == "fashion_mnist":
        dataset = fashion_mnist(split, cache_dir=cache_dir)
    elif _is_saved_dataset(name_or_path):
        dataset = _load_saved_split(name_or_path, split)
    else:
        dataset = _load_with_builder(name_or_path, split, dataset_config, streaming, cache_dir)

    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise DataError(f"Split {split!r} of dataset {name_or_path!r} is empty.")
        if streaming:
            size = len(dataset)
            dataset = dataset.to_iterable_dataset(num_shards=min(size, _LOCAL_STREAMING_SHARDS))
            # the size is known here (not to datasets' streamed copy): nominal epochs of a streaming run use it
            dataset.info.splits = datasets.SplitDict({split: datasets.SplitInfo(name=split, num_examples=size)})
            dataset._split = datasets.NamedSplit(split)

    image_column = _image_column_of(dataset, image_column, name_or_path, split)
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    for column in _extra_image_columns(dataset, extra_columns, name_or_path, split):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset, image_column


def num_examples(dataset: datasets.Dataset | datasets.IterableDataset) -> int | None:
    """The number of rows of a dataset, streamed or not; None when a streamed dataset does not declare it."""
    if isinstance(dataset, datasets.Dataset):
        return len(dataset)
    splits, split = dataset.info.splits, dataset.split
    if splits and split is not None and str(split) in splits:
        return splits[str(split)].num_examples or None
    return None


def label_column_of(dataset: datasets.Dataset | datasets.IterableDataset, label_column: str | None) -> str:
    """Return the label column to evaluate with.

    ``label_column`` if given (it must exist), else the first ``ClassLabel`` column, else
    ``"label"`` if there is such a column.

    Raises:
        DataError: no such column; the message lists the columns.
    """
    features = dataset.features or {}
    columns = list(features) or list(dataset.column_names or [])
    if label_column is not None:
        if label_column not in columns:
            raise DataError(f"Label column {label_column!r} not found; the columns are {columns}.")
        return label_column
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    if "label" in columns:
        return "label"
    raise DataError(
        f"No label column found: no ClassLabel column and no column named 'label' among {columns}. "
        "Name the label column explicitly."
    )


def _is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    directory = Path(path)
    return (directory / datasets.config.DATASETDICT_JSON_FILENAME).is_file() or (
        (directory / datasets.config.DATASET_STATE_JSON_FILENAME).is_file()
        and (directory / datasets.config.DATASET_INFO_FILENAME).is_file()
    )


def _load_saved_split(path: str, split: str) -> datasets.Dataset:
    """Load ``split`` of a ``save_to_disk`` directory (a DatasetDict, or a single Dataset)."""
    directory = Path(path)
    dict_file = directory / datasets.config.DATASETDICT_JSON_FILENAME
    if dict_file.is_file():
        splits = json.loads(dict_file.read_text())["splits"]
        if split not in splits:
            raise DataError(f"Unknown split {split!r} for dataset {path!r}; available splits: {splits}.")
        directory = directory / split
    # datasets 5.2 saves an empty dataset without any Arrow file and then fails to load it
    # (IndexError), so look before loading.
    state = json.loads((directory / datasets.config.DATASET_STATE_JSON_FILENAME).read_text())
    if not state.get("_data_files"):
        raise DataError(f"Split {split!r} of dataset {path!r} is empty.")

    saved = datasets.load_from_disk(str(directory))
    # A single saved Dataset remembers the split it was made from (e.g. "train[:100]"), if any.
    if not dict_file.is_file() and saved.split is not None and split not in _split_names(str(saved.split)):
        raise DataError(
            f"Unknown split {split!r} for dataset {path!r}: this directory holds only the split "
            f"{str(saved.split)!r}; available splits: [{str(saved.split)!r}]."
        )
    return saved


def _load_with_builder(
    name_or_path: str, split: str, dataset_config: str | None, streaming: bool, cache_dir: str | None
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a Hub dataset, an image folder or parquet files through a ``datasets`` builder.

    The builder lists the splits before anything is prepared, so an unknown split fails fast with
    the available ones. Local sources are always prepared map-style (see ``load_image_dataset``).
    """
    parquet_files = _looks_like_parquet_files(name_or_path)
    is_local = "://" not in name_or_path and (parquet_files or os.path.exists(name_or_path))
    builder_args: dict[str, Any]
    if parquet_files:
        builder_args = {"path": "parquet", "data_files": name_or_path}
    else:
        builder_args = {"path": name_or_path, "name": dataset_config}
    try:
        builder = datasets.load_dataset_builder(**builder_args, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        raise DataError(f"Cannot open dataset {name_or_path!r}: {error}") from error

    data_files = builder.config.data_files or {}
    available = [str(name) for name in builder.info.splits or data_files]
    requested = _split_names(split)
    if available and any(name not in available for name in requested):
        raise DataError(f"Unknown split {split!r} for dataset {name_or_path!r}; available splits: {available}.")
    if any(name in data_files and not data_files[name] for name in requested):
        raise DataError(f"No data files found for split {split!r} of dataset {name_or_path!r}.")

    if streaming and not is_local:
        _check_split_sizes(builder, split, name_or_path)  # when the Hub publishes them
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    _check_split_sizes(builder, split, name_or_path)
    return builder.as_dataset(split=split)


def _check_split_sizes(builder: datasets.DatasetBuilder, split: str, name: str) -> None:
    """DataError when the builder knows that every split named in ``split`` has no rows."""
    known = builder.info.splits or {}
    sizes = [known[base].num_examples for base in _split_names(split) if base in known]
    if sizes and not any(sizes):
        raise DataError(f"Split {split!r} of dataset {name!r} is empty.")


def _looks_like_parquet_files(name_or_path: str) -> bool:
    """A parquet file or a glob of files (a directory of parquet files is recognised by datasets)."""
    if os.path.isdir(name_or_path):
        return False
    return name_or_path.endswith(".parquet") or any(char in name_or_path for char in "*?[")


def _split_names(split: str) -> list[str]:
    """Base split names of a datasets split expression: ``"train[:10%]+test"`` -> ``["train", "test"]``."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _image_column_of(
    dataset: datasets.Dataset | datasets.IterableDataset, image_column: str | None, name: str, split: str
) -> str:
    """The requested image column (checked), or the first ``datasets.Image`` column."""
    features = dataset.features
    if features is None:
        raise DataError(
            f"The columns of dataset {name!r} (split {split!r}) are unknown until it is read "
            "(a streaming dataset without declared features); load it without streaming."
        )
    if image_column is not None:
        if image_column not in features:
            raise DataError(
                f"Image column {image_column!r} not found in dataset {name!r} (split {split!r}); "
                f"the columns are {list(features)}."
            )
        return image_column
    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            return column
    raise DataError(
        f"Dataset {name!r} (split {split!r}) has no Image column; the columns are "
        f"{ {column: type(feature).__name__ for column, feature in features.items()} }. "
        "Pass image_column to name the one holding the images."
    )


# Features an extra image column may have: decoded images, or the encoded bytes / file paths ImageDecoder opens.
_ENCODED_IMAGE_DTYPES = ("binary", "large_binary", "string", "large_string")


def _extra_image_columns(
    dataset: datasets.Dataset | datasets.IterableDataset, columns: Iterable[str], name: str, split: str
) -> list[str]:
    """The extra columns that are ``Image`` features (to cast undecoded), after checking that all exist and hold images."""
    features = dataset.features
    image_columns = []
    for column in columns:
        if column not in features:
            raise DataError(
                f"Column {column!r} (an extra image column the model's views need) not found in dataset {name!r} "
                f"(split {split!r}); the columns are {list(features)}."
            )
        feature = features[column]
        if isinstance(feature, datasets.Image):
            image_columns.append(column)
        elif not (isinstance(feature, datasets.Value) and feature.dtype in _ENCODED_IMAGE_DTYPES):
            raise DataError(
                f"Column {column!r} of dataset {name!r} (split {split!r}) is a {feature!r} column; an extra image "
                "column must be an Image column, or hold encoded image bytes or file paths."
            )
    return image_columns


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def fashion_mnist(split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """The Fashion-MNIST demo dataset, with the Hub schema (``image``: Image, ``label``: ClassLabel).

    Uses the Hub dataset ``zalando-datasets/fashion_mnist`` when the Hub answers (a request with a
    3 s timeout; not even tried when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set).
    Otherwise it builds the split once from Debian's ``dataset-fashion-mnist`` idx files and keeps
    it (``save_to_disk``) under ``cache_dir/<split>``.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000 images).
        cache_dir: where the built copy lives (default ``~/.cache/hf_ssl/fashion_mnist``); also the
            🤗 datasets cache for the Hub copy when given (default: the usual 🤗 datasets cache).

    The idx files are looked for in ``$HF_SSL_FASHION_MNIST_DIR`` if set, else where
    ``dpkg -L dataset-fashion-mnist`` puts them, else in ``/usr/share/datasets/fashion-mnist``.

    Raises:
        DataError: unknown split, or neither the Hub nor the idx files are available (the message
            says how to install them).
    """
    if split not in _FASHION_MNIST_FILE_PREFIX:
        raise DataError(
            f"Unknown split {split!r} for dataset 'fashion_mnist'; available splits: {list(_FASHION_MNIST_FILE_PREFIX)}."
        )
    if _hub_is_reachable():
        try:
            return datasets.load_dataset(FASHION_MNIST_HUB_ID, split=split, cache_dir=cache_dir)
        except OSError as error:  # includes ConnectionError and DatasetNotFoundError
            logger.warning("Could not load %s from the Hub (%s); using the local copy.", FASHION_MNIST_HUB_ID, error)

    root = Path(cache_dir) if cache_dir is not None else _default_cache_root() / "fashion_mnist"
    target = root / split
    if not target.is_dir():
        source = _fashion_mnist_source_dir()
        prefix = _FASHION_MNIST_FILE_PREFIX[split]
        logger.info("Building Fashion-MNIST %s split from %s into %s", split, source, target)
        dataset = idx_to_dataset(
            _idx_file(source, f"{prefix}-images-idx3-ubyte"), _idx_file(source, f"{prefix}-labels-idx1-ubyte")
        )
        dataset.info.dataset_name = "fashion_mnist"
        dataset.info.description = f"Fashion-MNIST ({split}) built from the idx files in {source}."
        _save_atomically(dataset, target)
    return datasets.load_from_disk(str(target))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not, into a native-endian numpy array.

    Raises:
        DataError: the file is missing, not valid gzip, or its magic number, dimensions or size are wrong.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"Cannot read idx file {str(path)!r}: {error}") from error

    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"Bad idx file {str(path)!r}: wrong magic number {raw[:4].hex() or '(empty file)'}.")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"Bad idx file {str(path)!r}: truncated header ({ndim} dimensions announced).")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"Bad idx file {str(path)!r}: dimensions {shape} need {expected} bytes, the file has {len(raw)}."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def idx_to_dataset(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> datasets.Dataset:
    """Build a Fashion-MNIST-schema dataset from an idx image file ``[N, H, W]`` and a label file ``[N]``.

    Images are stored as PNG bytes (grayscale), so the ``Image`` feature round-trips exactly;
    labels become a ``ClassLabel`` with the ten Fashion-MNIST class names.

    Raises:
        DataError: bad idx files, images that are not ``uint8 [N, H, W]``, a label count that
            differs from the image count, or labels outside ``0..9``.
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{str(images_path)!r} must hold uint8 images [N, H, W], got {images.dtype} {images.shape}.")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{str(labels_path)!r} must hold one label per image ({len(images)}), got shape {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_LABELS)):
        raise DataError(f"{str(labels_path)!r} has labels outside 0..{len(FASHION_MNIST_LABELS) - 1}.")

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_LABELS)}
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(image), "path": None} for image in images],
            "label": labels.astype(np.int64).tolist(),
        },
        features=features,
    )


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _hub_is_reachable() -> bool:
    """Whether the Hugging Face Hub answers within 3 s (False in offline mode, without trying)."""

    truthy = {"1", "on", "yes", "true"}
    if datasets.config.HF_HUB_OFFLINE or any(
        os.environ.get(variable, "").strip().lower() in truthy for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    url = f"{hub_constants.ENDPOINT.rstrip('/')}/api/datasets/{FASHION_MNIST_HUB_ID}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=3) as response:
            return response.status < 400
    except OSError:  # URLError, HTTPError, timeouts and DNS failures are all OSErrors
        return False


def _default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_ssl"


def _fashion_mnist_source_dir() -> Path:
    """The directory with the Fashion-MNIST idx files, or a DataError saying how to get them."""
    override = os.environ.get(FASHION_MNIST_DIR_ENV)
    if override:
        candidates = [Path(override)]
    else:
        candidates = [*_dpkg_fashion_mnist_dirs(), Path(FASHION_MNIST_DEFAULT_DIR)]
    for candidate in candidates:
        if all(_idx_file_or_none(candidate, f"{prefix}-images-idx3-ubyte") for prefix in ("train", "t10k")):
            return candidate
    looked_in = ", ".join(dict.fromkeys(str(candidate) for candidate in candidates))
    raise DataError(
        "Fashion-MNIST is not available: the Hugging Face Hub is not reachable (or offline mode is on) "
        f"and the idx files are not in {looked_in}. {_FASHION_MNIST_HINT}"
    )


def _dpkg_fashion_mnist_dirs() -> list[Path]:
    """Directories holding the idx files according to ``dpkg -L dataset-fashion-mnist`` (may be none)."""
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    files = [Path(line) for line in listing.splitlines() if line.endswith("-images-idx3-ubyte.gz")]
    return list(dict.fromkeys(file.parent for file in files))


def _idx_file_or_none(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_file(directory: Path, stem: str) -> Path:
    path = _idx_file_or_none(directory, stem)
    if path is None:
        raise DataError(f"Missing Fashion-MNIST file {stem}.gz in {str(directory)!r}. {_FASHION_MNIST_HINT}")
    return path


def _save_atomically(dataset: datasets.Dataset, target: Path) -> None:
    """``save_to_disk`` into a temporary sibling directory, then rename it to ``target``.

    A concurrent builder that finishes first wins; ours is then discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        dataset.save_to_disk(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


class ImageDecoder:
    """DataLoader ``collate_fn`` that decodes dataset rows into a ``uint8`` image batch.

    Each image is opened with PIL (from bytes, a path, or an already decoded ``PIL.Image``),
    rotated upright from its EXIF orientation, converted to RGB (alpha is composited on white,
    palette/CMYK/grayscale are converted, 16-bit images are scaled to 8 bits), its shorter side is
    resized to ``size`` (bilinear, antialiased) and the center ``size x size`` is cropped.

    Returns ``{"pixel_values": uint8 [B, 3, size, size], "bad_images": list[str]}`` plus
    ``"labels": int64 [B]`` when ``label_column`` is set, plus one ``uint8 [B, 1, size, size]``
    tensor per entry of ``extra_columns``.

    ``extra_columns`` maps batch keys to more image columns of the same rows (a model's
    ``input_columns()``, e.g. ``{"mask": "mask"}`` for a foreground mask). Each is decoded exactly
    like the image (EXIF orientation, the same resize and center crop), so its pixels line up with
    the image's: it must have the image's size (after orientation), else the row is a bad image. It
    is decoded to one 8-bit channel: mode ``L`` as stored, ``1`` as 0/255, 16/32-bit and float
    images scaled to 8 bits like images; any other mode (RGB, palette, CMYK, ...) only when every
    pixel is opaque and grey (R = G = B, e.g. a black and white mask saved as RGB): a colour or
    transparent image is a bad image, since mixing its channels into one would be a guess.

    Valid but odd images decode normally: CMYK, RGBA, palette, 16-bit, grayscale, EXIF-rotated,
    1x1 (upscaled) and very elongated ones (e.g. 10000x10: the center square is kept).

    Bad images (unreadable, truncated, empty, not an image, smaller than ``min_size`` on a side,
    more than ``max_pixels`` pixels: decompression bombs) follow ``on_bad_image``, and so does a row
    whose extra column fails to decode (the reason names the column):

    * ``"error"``: raise :class:`DataError` naming the row index and/or file and the reason;
    * ``"skip"``: leave the row out of the batch and report ``"<row/file>\\t<reason>"`` both in
      ``self.bad_images`` and in the batch's ``"bad_images"`` list. DataLoader workers use copies
      of the decoder, so the main process must count bad images from the batches.

    A batch in which every image is bad has ``B == 0``.

    ``max_pixels`` defaults to ``PIL.Image.MAX_IMAGE_PIXELS`` (89 478 485), where PIL starts to warn
    of a decompression bomb; it is judged from the header, before anything is decoded. PIL refuses
    images above twice its limit whatever ``max_pixels`` says; such images are bad images too.
    """

    # Batch keys the decoder itself fills; an extra column cannot take them.
    RESERVED_KEYS = ("pixel_values", "labels", "bad_images")

    def __init__(
        self,
        image_column: str,
        size: int,
        label_column: str | None = None,
        on_bad_image: str = "error",
        min_size: int = 1,
        max_pixels: int | None = None,
        extra_columns: dict[str, str] | None = None,
    ):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}.")
        extra_columns = dict(extra_columns or {})
        reserved = [key for key in extra_columns if key in self.RESERVED_KEYS]
        if reserved:
            raise ValueError(f"extra_columns cannot use the batch key(s) {reserved}: the decoder fills "
                             f"{list(self.RESERVED_KEYS)} itself.")
        self.image_column = image_column
        self.size = size
        self.label_column = label_column
        self.on_bad_image = on_bad_image
        self.min_size = min_size
        self.max_pixels = PIL.Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        self.extra_columns = extra_columns
        self.bad_images: list[str] = []

    def __call__(self, rows: list[dict]) -> dict:
        pixels, labels, bad = [], [], []
        extras: dict[str, list[np.ndarray]] = {key: [] for key in self.extra_columns}
        with warnings.catch_warnings():
            # Oversized images are judged by max_pixels below, not by PIL's warning.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            for position, row in enumerate(rows):
                self._check_columns(row)
                column = self.image_column  # the column being decoded, named when it fails
                try:
                    image, image_size = self._decode(row[column], _to_rgb)
                    row_extras = {}
                    for key, column in self.extra_columns.items():
                        row_extras[key], extra_size = self._decode(row[column], _to_grey)
                        if extra_size != image_size:
                            raise DataError(
                                f"{extra_size[0]}x{extra_size[1]} px but the image ({self.image_column!r}) is "
                                f"{image_size[0]}x{image_size[1]} px: they must be the same size to line up"
                            )
                    column = self.image_column
                    label = self._label(row)
                except Exception as error:  # any failure to decode one image makes it a bad image
                    where = _describe_row(row, column, position)
                    reason = _describe_error(error)
                    if column != self.image_column:
                        reason = f"column {column!r}: {reason}"
                    if self.on_bad_image == "error":
                        raise DataError(
                            f"Bad image at {where}: {reason}. Use on_bad_image='skip' to leave such images out."
                        ) from error
                    bad.append(f"{where}\t{reason}")
                    continue
                pixels.append(np.asarray(image))
                labels.append(label)
                for key, extra in row_extras.items():
                    extras[key].append(np.asarray(extra))
        self.bad_images.extend(bad)

        if pixels:
            pixel_values = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        else:
            pixel_values = torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        batch = {"pixel_values": pixel_values, "bad_images": bad}
        if self.label_column is not None:
            batch["labels"] = torch.tensor(labels, dtype=torch.int64)
        for key, values in extras.items():
            if values:
                batch[key] = torch.from_numpy(np.stack(values)).unsqueeze(1)
            else:
                batch[key] = torch.empty((0, 1, self.size, self.size), dtype=torch.uint8)
        return batch

    def _check_columns(self, row: dict) -> None:
        """Missing columns are a configuration error, never a bad image."""
        for column in (self.image_column, self.label_column, *self.extra_columns.values()):
            if column is not None and column not in row:
                columns = [key for key in row if key != INDEX_KEY]
                raise DataError(f"Column {column!r} is not in the dataset rows; the columns are {columns}.")

    def _label(self, row: dict) -> int | None:
        if self.label_column is None:
            return None
        if row[self.label_column] is None:
            raise DataError(f"no label (empty {self.label_column!r} cell)")
        return int(row[self.label_column])

    def _decode(self, value: Any, convert) -> tuple[PIL.Image.Image, tuple[int, int]]:
        """One stored image -> (upright ``size x size`` image in ``convert``'s mode, its upright full size); raises
        on a bad image. The full size (width, height, from the header) lets extra columns be checked against the
        image."""
        image = _open_image(value)
        width, height = image.size
        if min(width, height) < self.min_size:
            raise DataError(f"image too small ({width}x{height} px, minimum {self.min_size} px a side)")
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise DataError(
                f"image too large ({width}x{height} px, more than {self.max_pixels} pixels): "
                "a possible decompression bomb"
            )
        # EXIF orientations 5-8 turn the picture by 90 degrees (exif_transpose below).
        upright = (height, width) if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale that still covers size x size: much faster.
            image.draft(None, (self.size, self.size))
        image.load()
        image = PIL.ImageOps.exif_transpose(image)
        return _center_square(convert(image), self.size), upright


_EXIF_ORIENTATION = 0x0112


def _open_image(value: Any) -> PIL.Image.Image:
    """Open (lazily: header only) an image stored as bytes, a path, a ``{"bytes", "path"}`` dict or a PIL image."""
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = value, None
    elif isinstance(value, (str, os.PathLike)):
        data, path = None, os.fspath(value)
    elif value is None:
        raise DataError("no image (empty cell)")
    else:
        raise DataError(f"unsupported image value of type {type(value).__name__}")

    if data is None:
        if path is None:
            raise DataError("no image (neither bytes nor path)")
        if os.path.exists(path):
            data = Path(path).read_bytes()
        else:
            with fsspec.open(path, "rb") as file:
                data = file.read()
    if len(data) == 0:
        raise DataError("empty image file (0 bytes)")
    try:
        return PIL.Image.open(io.BytesIO(data))
    except PIL.UnidentifiedImageError as error:
        raise DataError("not an image file in a format PIL can read") from error


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_grey(image).convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_grey(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert an extra column's image (a mask) to 8-bit grey; colour or transparency is refused, not mixed away."""
    if image.mode == "L":
        return image
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_grey(image)
    rgba = np.asarray(image.convert("RGBA"))
    if (rgba[..., 3] != 255).any():
        raise DataError(f"a transparent image (mode {image.mode}) where a 1-channel image is expected")
    if not (np.array_equal(rgba[..., 0], rgba[..., 1]) and np.array_equal(rgba[..., 1], rgba[..., 2])):
        raise DataError(f"a colour image (mode {image.mode}) where a 1-channel image is expected")
    return PIL.Image.fromarray(np.ascontiguousarray(rgba[..., 0]), mode="L")


def _high_depth_to_grey(image: PIL.Image.Image) -> PIL.Image.Image:
    """Scale a 16/32-bit integer or float grayscale image to 8 bits (PIL's own convert would clip).

    Integer modes (``I;16*``, ``I``) are taken as 16-bit (0..65535); float images (``F``) as
    0..1 when their maximum is at most 1, else as 0..255.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    eight_bit = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(eight_bit, mode="L")


def _center_square(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and center-crop ``size x size``.

    Done as one resize of the central square (``box``), which is the same operation.
    """
    width, height = image.size
    side = min(width, height)
    if width == height == size:
        return image
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), PIL.Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def _describe_row(row: dict, image_column: str, position: int) -> str:
    """``"row 12 (path/to/file.jpg)"``, or whichever of the two is known."""
    value = row.get(image_column)
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    index = row.get(INDEX_KEY)
    if index is None:
        where = f"item {position} of the batch"
        return f"{path} ({where})" if path else where
    return f"row {index} ({path})" if path else f"row {index}"


def _describe_error(error: Exception) -> str:
    """One-line reason for a bad image (safe to write as a tab-separated line)."""
    if isinstance(error, DataError):
        reason = str(error)
    elif isinstance(error, PIL.Image.DecompressionBombError):
        reason = f"decompression bomb: {error}"
    else:
        reason = f"{type(error).__name__}: {error}"
    return " ".join(reason.split())


# --------------------------------------------------------------------------------------------
# DataLoader
# --------------------------------------------------------------------------------------------


class _IndexedRows(torch.utils.data.Dataset):
    """Map-style view of a dataset whose rows also carry their index under ``"__index__"``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], INDEX_KEY: index}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # One Arrow read per batch instead of one per row (datasets.Dataset has __getitems__).
        if hasattr(self.dataset, "__getitems__"):
            rows = self.dataset.__getitems__(indices)
        else:
            rows = [self.dataset[index] for index in indices]
        return [{**row, INDEX_KEY: index} for row, index in zip(rows, indices)]


def build_dataloader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    decoder: ImageDecoder,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 2,
    drop_last: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
) -> torch.utils.data.DataLoader:
    """A DataLoader that decodes with ``decoder`` on ``num_workers`` worker processes.

    Map-style datasets: a plain ``RandomSampler`` (``shuffle``) or ``SequentialSampler``; the
    random sampler draws from a ``torch.Generator`` seeded with ``seed``, so the order is
    reproducible (and ``accelerate``'s ``prepare`` can wrap the sampler). Rows carry their index
    so that bad-image messages can name them.

    ``datasets.IterableDataset``: shuffled with ``dataset.shuffle(seed=seed)`` (a buffer, plus shard
    order) when ``shuffle``, then split between ``num_processes`` processes with
    ``datasets.distributed.split_dataset_by_node`` (this process keeps its share, ``process_index``:
    whole shards when the number of shards divides evenly, else every ``num_processes``-th row);
    call ``loader.dataset.set_epoch(epoch)`` to reshuffle each epoch (every process reshuffles the
    same way, so the shares stay disjoint). ``batch_size`` is this process's. Workers are capped at
    this process's number of shards, since extra ones would get no data.

    Workers are persistent when ``num_workers > 0``.
    """
    if isinstance(dataset, datasets.IterableDataset):
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        if num_processes > 1:
            from datasets.distributed import split_dataset_by_node

            if dataset.num_shards % num_processes:
                logger.warning("the streamed dataset has %d shards, not a multiple of %d processes: every process "
                               "reads all of it and keeps every %d-th row", dataset.num_shards, num_processes,
                               num_processes)
            dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        num_workers = min(num_workers, dataset.num_shards)
    common = dict(batch_size=batch_size, collate_fn=decoder, num_workers=num_workers,
                  persistent_workers=num_workers > 0, drop_last=drop_last, pin_memory=torch.cuda.is_available())
    if isinstance(dataset, datasets.IterableDataset):
        return torch.utils.data.DataLoader(dataset, **common)

    rows = _IndexedRows(dataset)
    if shuffle:
        sampler = torch.utils.data.RandomSampler(rows, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = torch.utils.data.SequentialSampler(rows)
    return torch.utils.data.DataLoader(rows, sampler=sampler, **common)
