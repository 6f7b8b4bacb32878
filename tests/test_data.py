"""Tests for hf_ssl.data: loading, Fashion-MNIST from idx files, decoding and the bad-image policy.

Everything is generated in tmp_path; the Hub is never contacted (offline mode is forced).
"""

from __future__ import annotations

import gzip
import pickle
import struct

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from hf_ssl.data import (
    FASHION_MNIST_LABELS,
    DataError,
    ImageDecoder,
    build_dataloader,
    fashion_mnist,
    idx_to_dataset,
    label_column_of,
    load_image_dataset,
    read_idx,
)
from tests.image_corpus import (
    BAD_IMAGES,
    GOOD_ODD_IMAGES,
    cmyk_red_jpeg,
    decompression_bomb_png,
    encode,
    exif_rotated_jpeg,
    gray16_png,
    gray_png,
    one_pixel_png,
    palette_png,
    random_rgb,
    rgba_png,
    wide_png,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the network, nor write to the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf-cache")


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------


def write_imagefolder(root, files: dict[str, bytes]):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def mixed_folder(tmp_path):
    """Two classes, PNG and JPEG, different sizes and modes."""
    return write_imagefolder(
        tmp_path / "mixed",
        {
            "cat/a.png": encode(random_rgb(20, 30, seed=1), "PNG"),
            "cat/b.jpg": encode(random_rgb(50, 40, seed=2), "JPEG"),
            "cat/c.png": gray_png(),
            "dog/d.png": rgba_png(),
            "dog/e.jpg": encode(random_rgb(33, 33, seed=3), "JPEG"),
        },
    )


@pytest.fixture
def zoo_folder(tmp_path):
    """Good images in odd modes (class "good") next to bad ones (class "bad")."""
    files = {f"good/{name}": make() for name, make in GOOD_ODD_IMAGES.items()}
    files.update({f"bad/{name}": make() for name, (make, _) in BAD_IMAGES.items()})
    return write_imagefolder(tmp_path / "zoo", files)


def decode_one(data: bytes, size: int = 8) -> np.ndarray:
    """Decode one encoded image; returns HWC uint8."""
    batch = ImageDecoder("image", size)([{"image": {"bytes": data, "path": None}}])
    return batch["pixel_values"][0].permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_imagefolder_is_loaded_undecoded_and_decodes_to_uint8_batches(mixed_folder, hf_cache):
    dataset, column = load_image_dataset(str(mixed_folder), cache_dir=hf_cache)

    assert column == "image"
    assert dataset.features["image"] == datasets.Image(decode=False)
    assert dataset.features["label"].names == ["cat", "dog"]
    assert len(dataset) == 5
    first = dataset[0]["image"]
    assert first["path"].endswith("a.png")  # still a file reference, not a PIL image

    decoder = ImageDecoder(column, 12, label_column=label_column_of(dataset, None))
    batch = decoder([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_values"].shape == (5, 3, 12, 12)
    assert batch["labels"].tolist() == [0, 0, 0, 1, 1]
    assert batch["bad_images"] == []


def test_imagefolder_unknown_split_lists_the_available_ones(mixed_folder, hf_cache):
    with pytest.raises(DataError, match=r"'validation'.*available splits: \['train'\]"):
        load_image_dataset(str(mixed_folder), split="validation", cache_dir=hf_cache)


def test_explicit_image_column_must_exist(mixed_folder, hf_cache):
    with pytest.raises(DataError, match=r"'picture' not found.*\['image', 'label'\]"):
        load_image_dataset(str(mixed_folder), image_column="picture", cache_dir=hf_cache)


def test_missing_local_dataset_is_a_data_error(tmp_path, hf_cache):
    with pytest.raises(DataError, match="nowhere"):
        load_image_dataset(str(tmp_path / "nowhere" / "*.parquet"), cache_dir=hf_cache)


def small_image_dataset(n: int = 4) -> datasets.Dataset:
    images = [random_rgb(10 + i, 12, seed=i) for i in range(n)]
    return datasets.Dataset.from_dict(
        {"img": [{"bytes": encode(image, "PNG"), "path": None} for image in images], "label": list(range(n))},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}),
    )


def test_parquet_file_dir_and_glob_round_trip(tmp_path, hf_cache):
    original = small_image_dataset()
    (tmp_path / "pq").mkdir()
    original.to_parquet(str(tmp_path / "pq" / "train.parquet"))

    for source in ("pq/train.parquet", "pq", "pq/*.parquet"):
        dataset, column = load_image_dataset(str(tmp_path / source), cache_dir=hf_cache)
        assert column == "img", source
        assert dataset.features["img"].decode is False
        assert dataset["label"] == [0, 1, 2, 3]
        # The stored PNG bytes survive unchanged.
        assert dataset[2]["img"]["bytes"] == original.cast_column("img", datasets.Image(decode=False))[2]["img"]["bytes"]

    batch = ImageDecoder("img", 10, label_column="label")([dataset[i] for i in range(4)])
    expected = np.asarray(original[0]["img"])  # 10x12 -> center 10x10 crop, no resampling
    assert np.array_equal(batch["pixel_values"][0].permute(1, 2, 0).numpy(), expected[:, 1:11])


def test_save_to_disk_round_trip_and_split_selection(tmp_path):
    saved = datasets.DatasetDict({"train": small_image_dataset(4), "test": small_image_dataset(2)})
    saved.save_to_disk(str(tmp_path / "saved"))

    dataset, column = load_image_dataset(str(tmp_path / "saved"), split="test")
    assert column == "img"
    assert len(dataset) == 2
    assert dataset.features["img"].decode is False
    with pytest.raises(DataError, match=r"'valid'.*available splits: \['train', 'test'\]"):
        load_image_dataset(str(tmp_path / "saved"), split="valid")

    single = small_image_dataset(3)
    single.save_to_disk(str(tmp_path / "single"))
    dataset, _ = load_image_dataset(str(tmp_path / "single"))
    assert len(dataset) == 3


def test_no_image_column_lists_the_columns(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b"], "score": [1, 2]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DataError, match=r"no Image column.*'text'.*'score'"):
        load_image_dataset(str(tmp_path / "text"))


def test_empty_dataset_is_refused(tmp_path):
    empty = small_image_dataset().select([])
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="'train' of dataset .*empty' is empty"):
        load_image_dataset(str(tmp_path / "empty"))

    datasets.DatasetDict({"train": small_image_dataset(), "test": empty}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_image_dataset(str(tmp_path / "dict"))[0]) == 4  # the empty split is not even read
    with pytest.raises(DataError, match="'test' .* is empty"):
        load_image_dataset(str(tmp_path / "dict"), split="test")

    empty.to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match="is empty"):
        load_image_dataset(str(tmp_path / "empty.parquet"), cache_dir=str(tmp_path / "hf-cache"))


def test_streaming_local_folder_is_sharded_and_loads(mixed_folder, hf_cache):
    dataset, column = load_image_dataset(str(mixed_folder), streaming=True, cache_dir=hf_cache)
    assert isinstance(dataset, datasets.IterableDataset)
    assert dataset.num_shards == 5  # one per row here; a streamed image folder would have 1
    assert dataset.features[column].decode is False

    loader = build_dataloader(dataset, ImageDecoder(column, 8, "label"), 2, shuffle=True, seed=0, num_workers=0)
    batches = list(loader)
    assert [tuple(batch["pixel_values"].shape) for batch in batches] == [(2, 3, 8, 8), (2, 3, 8, 8)]
    assert len({label for batch in batches for label in batch["labels"].tolist()}) == 2


def test_label_column_of():
    with_classes = datasets.Dataset.from_dict(
        {"y": [0, 1], "label": [5, 6]},
        features=datasets.Features({"y": datasets.ClassLabel(names=["a", "b"]), "label": datasets.Value("int64")}),
    )
    assert label_column_of(with_classes, None) == "y"
    assert label_column_of(with_classes, "label") == "label"
    assert label_column_of(small_image_dataset(), None) == "label"
    with pytest.raises(DataError, match=r"\['text'\]"):
        label_column_of(datasets.Dataset.from_dict({"text": ["a"]}), None)
    with pytest.raises(DataError, match="'cls' not found"):
        label_column_of(with_classes, "cls")


# ---------------------------------------------------------------------------------------------
# idx files and Fashion-MNIST
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def tiny_idx_dir(tmp_path):
    """Fashion-MNIST-named idx files: 5 train and 3 test images of 28x28."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "idx"
    directory.mkdir()
    arrays = {}
    for prefix, count in (("train", 5), ("t10k", 3)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) * 2 % 10
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
        arrays[prefix] = (images, labels)
    return directory, arrays


def test_read_idx_plain_and_gzipped(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(idx_bytes(array))
    (tmp_path / "zipped.gz").write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "plain"), array)
    assert np.array_equal(read_idx(tmp_path / "zipped.gz"), array)

    big_endian = struct.pack(">BBBB", 0, 0, 0x0B, 1) + struct.pack(">I", 2) + np.array([1, -2], ">i2").tobytes()
    (tmp_path / "int16").write_bytes(big_endian)
    assert read_idx(tmp_path / "int16").tolist() == [1, -2]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "magic"),  # unknown type code
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated header"),
        (idx_bytes(np.zeros((2, 3), np.uint8))[:-1], "need 18 bytes, the file has 17"),  # data cut short
        (gzip.compress(idx_bytes(np.zeros((2, 3), np.uint8)))[:-6], "Cannot read"),  # broken gzip
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert "bad-idx" in str(info.value)


def test_idx_to_dataset_checks_label_count(tiny_idx_dir):
    directory, _ = tiny_idx_dir
    with pytest.raises(DataError, match="one label per image"):
        idx_to_dataset(directory / "train-images-idx3-ubyte.gz", directory / "t10k-labels-idx1-ubyte.gz")


def test_fashion_mnist_builds_from_idx_files_once(tmp_path, tiny_idx_dir, monkeypatch):
    directory, arrays = tiny_idx_dir
    monkeypatch.setenv("HF_SSL_FASHION_MNIST_DIR", str(directory))
    cache = tmp_path / "fm-cache"

    for split, prefix in (("train", "train"), ("test", "t10k")):
        dataset = fashion_mnist(split, cache_dir=str(cache))
        images, labels = arrays[prefix]
        assert dataset.features["image"] == datasets.Image()
        assert dataset.features["label"] == datasets.ClassLabel(names=FASHION_MNIST_LABELS)
        assert len(FASHION_MNIST_LABELS) == 10
        assert dataset["label"] == labels.tolist()
        for row, expected in zip(dataset, images):
            assert row["image"].mode == "L"
            assert np.array_equal(np.asarray(row["image"]), expected)
    assert sorted(path.name for path in cache.iterdir()) == ["test", "train"]  # no leftover tmp dirs

    # The second call reads the cache: the idx files are no longer needed.
    monkeypatch.setenv("HF_SSL_FASHION_MNIST_DIR", str(tmp_path / "gone"))
    again = fashion_mnist("train", cache_dir=str(cache))
    assert np.array_equal(np.asarray(again[4]["image"]), arrays["train"][0][4])

    dataset, column = load_image_dataset("fashion_mnist", split="test", cache_dir=str(cache))
    assert column == "image" and len(dataset) == 3
    assert dataset.features["image"].decode is False
    batch = ImageDecoder(column, 32, label_column="label")([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["labels"].tolist() == arrays["t10k"][1].tolist()


def test_fashion_mnist_default_cache_location(tiny_idx_dir, monkeypatch, tmp_path):
    directory, _ = tiny_idx_dir
    monkeypatch.setenv("HF_SSL_FASHION_MNIST_DIR", str(directory))
    fashion_mnist("test")
    assert (tmp_path / "xdg-cache" / "hf_ssl" / "fashion_mnist" / "test" / "dataset_info.json").is_file()


def test_fashion_mnist_without_any_source_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SSL_FASHION_MNIST_DIR", str(tmp_path / "empty-dir"))
    with pytest.raises(DataError) as info:
        fashion_mnist("train", cache_dir=str(tmp_path / "cache"))
    assert "sudo apt-get install dataset-fashion-mnist" in str(info.value)
    assert "HF_SSL_FASHION_MNIST_DIR" in str(info.value)
    assert not (tmp_path / "cache" / "train").exists()


def test_fashion_mnist_unknown_split():
    with pytest.raises(DataError, match=r"'validation'.*\['train', 'test'\]"):
        load_image_dataset("fashion_mnist", split="validation")


# ---------------------------------------------------------------------------------------------
# Decoding and bad images
# ---------------------------------------------------------------------------------------------


def test_odd_modes_decode_to_the_right_rgb_values():
    cmyk = decode_one(cmyk_red_jpeg())
    assert np.abs(cmyk[4, 4].astype(int) - [255, 0, 0]).max() <= 3

    rgba = decode_one(rgba_png(), size=16)
    assert rgba[8, 2].tolist() == [255, 255, 255]  # transparent -> white, not the black underneath
    assert np.abs(rgba[8, 13].astype(int) - [255, 127, 127]).max() <= 1  # half red over white

    palette = decode_one(palette_png(), size=16)
    assert palette[8, 2].tolist() == [255, 255, 255]  # transparent palette entry -> white
    assert palette[8, 13].tolist() == [255, 0, 0]

    assert decode_one(gray16_png(51000))[4, 4].tolist() == [198, 198, 198]  # 51000 / 257, not clipped to 255
    assert decode_one(gray_png(77))[4, 4].tolist() == [77, 77, 77]

    upright = decode_one(exif_rotated_jpeg())  # without EXIF handling: top red, bottom blue
    assert np.abs(upright[4, 0].astype(int) - [0, 0, 255]).max() <= 10
    assert np.abs(upright[4, 7].astype(int) - [255, 0, 0]).max() <= 10

    one_pixel = decode_one(one_pixel_png())  # 1x1 is valid: upscaled to size x size
    assert one_pixel.shape == (8, 8, 3) and (one_pixel == [0, 200, 0]).all()

    wide = decode_one(wide_png())  # 10000x10: the center square (inside the blue band), not a squashed image
    assert wide.shape == (8, 8, 3) and (wide == [0, 0, 255]).all()


def test_resize_shorter_side_then_center_crop():
    image = PIL.Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    assert decode_one(encode(image, "PNG"), size=10).min() == 255  # only the center square remains
    halved = decode_one(encode(image, "PNG"), size=5)
    assert halved[:, 1:4].min() == 255  # the edge columns blend in a little black, as resize-then-crop does
    assert 128 < halved[:, [0, 4]].min() < 255
    # Already decoded PIL images are accepted too.
    batch = ImageDecoder("image", 10)([{"image": image}])
    assert batch["pixel_values"].min() == 255


def test_skip_policy_keeps_good_rows_and_reports_bad_ones(zoo_folder, hf_cache):
    dataset, column = load_image_dataset(str(zoo_folder), cache_dir=hf_cache)
    rows = [{**dataset[i], "__index__": i} for i in range(len(dataset))]
    decoder = ImageDecoder(column, 8, label_column="label", on_bad_image="skip")

    batch = decoder(rows)

    assert batch["pixel_values"].shape == (len(GOOD_ODD_IMAGES), 3, 8, 8)
    good = dataset.features["label"].str2int("good")
    assert batch["labels"].tolist() == [good] * len(GOOD_ODD_IMAGES)
    assert len(batch["bad_images"]) == len(BAD_IMAGES)
    assert decoder.bad_images == batch["bad_images"]
    for name, (_, reason) in BAD_IMAGES.items():
        (entry,) = [entry for entry in batch["bad_images"] if name in entry.split("\t")[0]]
        where, why = entry.split("\t")
        index = next(i for i, row in enumerate(rows) if row[column]["path"].endswith(name))
        assert where.startswith(f"row {index} ")
        assert reason in why


def test_error_policy_names_row_file_and_reason(zoo_folder, hf_cache):
    dataset, column = load_image_dataset(str(zoo_folder), cache_dir=hf_cache)
    decoder = ImageDecoder(column, 8, on_bad_image="error")
    for index in range(len(dataset)):
        row = {**dataset[index], "__index__": index}
        name = row[column]["path"].rsplit("/", 1)[-1]
        if name in GOOD_ODD_IMAGES:
            assert decoder([row])["pixel_values"].shape == (1, 3, 8, 8)
            continue
        with pytest.raises(DataError) as info:
            decoder([row])
        message = str(info.value)
        assert f"row {index}" in message and name in message and BAD_IMAGES[name][1] in message


def test_bad_bytes_without_path_are_named_by_row():
    decoder = ImageDecoder("image", 8, on_bad_image="error")
    with pytest.raises(DataError, match=r"row 41\b.*0 bytes"):
        decoder([{"image": {"bytes": b"", "path": None}, "__index__": 41}])
    with pytest.raises(DataError, match="empty cell"):
        decoder([{"image": None}])


def test_huge_images_and_decompression_bombs_are_bad_images(monkeypatch):
    picture = {"image": {"bytes": encode(random_rgb(20, 20), "PNG"), "path": None}, "__index__": 0}

    too_large = ImageDecoder("image", 8, on_bad_image="skip", max_pixels=399)([picture])
    assert too_large["pixel_values"].shape[0] == 0
    assert "too large" in too_large["bad_images"][0]

    # A real bomb (12 kB, 1e8 pixels): refused from its header, before 300 MB are decoded.
    bomb_row = {"image": {"bytes": decompression_bomb_png(), "path": None}, "__index__": 3}
    assert len(bomb_row["image"]["bytes"]) < 50_000
    refused = ImageDecoder("image", 8, on_bad_image="skip")([bomb_row, picture])
    assert refused["pixel_values"].shape == (1, 3, 8, 8)
    assert refused["bad_images"][0].startswith("row 3\t") and "decompression bomb" in refused["bad_images"][0]
    with pytest.raises(DataError, match=r"row 3\b.*10000x10000 px.*decompression bomb"):
        ImageDecoder("image", 8, on_bad_image="error")([bomb_row])

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # 400 px > 2 x 100: PIL calls it a bomb
    bomb = ImageDecoder("image", 8, on_bad_image="skip")([picture])
    assert bomb["pixel_values"].shape == (0, 3, 8, 8)
    assert "decompression bomb" in bomb["bad_images"][0]


def test_min_size_makes_tiny_images_bad_when_asked():
    row = {"image": {"bytes": one_pixel_png(), "path": None}, "__index__": 5}
    assert ImageDecoder("image", 8)([row])["pixel_values"].shape == (1, 3, 8, 8)  # default: 1x1 is valid
    with pytest.raises(DataError, match=r"row 5\b.*too small \(1x1 px, minimum 2 px a side\)"):
        ImageDecoder("image", 8, min_size=2)([row])


def test_missing_columns_are_configuration_errors_even_when_skipping():
    decoder = ImageDecoder("image", 8, label_column="label", on_bad_image="skip")
    with pytest.raises(DataError, match=r"'label'.*\['image'\]"):
        decoder([{"image": gray_png()}])


def test_decoder_is_picklable_and_validates_policy():
    decoder = ImageDecoder("image", 8, label_column="label", on_bad_image="skip")
    clone = pickle.loads(pickle.dumps(decoder))
    assert (clone.image_column, clone.size, clone.label_column, clone.on_bad_image) == ("image", 8, "label", "skip")
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageDecoder("image", 8, on_bad_image="ignore")


# ---------------------------------------------------------------------------------------------
# DataLoader
# ---------------------------------------------------------------------------------------------


def numbered_dataset(n: int = 12) -> datasets.Dataset:
    rows = [{"bytes": gray_png(value=i), "path": None} for i in range(n)]
    return datasets.Dataset.from_dict(
        {"image": rows, "label": list(range(n))},
        features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")}),
    )


def epoch_labels(loader) -> list[int]:
    return [label for batch in loader for label in batch["labels"].tolist()]


def test_dataloader_order_is_reproducible_from_the_seed():
    dataset = numbered_dataset()
    decoder = ImageDecoder("image", 4, label_column="label")

    def loader(seed, shuffle=True):
        return build_dataloader(dataset, decoder, 4, shuffle=shuffle, seed=seed, num_workers=0)

    assert isinstance(loader(0).sampler, torch.utils.data.RandomSampler)
    first = epoch_labels(loader(0))
    assert sorted(first) == list(range(12))
    assert epoch_labels(loader(0)) == first
    assert epoch_labels(loader(1)) != first
    assert epoch_labels(loader(0, shuffle=False)) == list(range(12))
    # Each image matches its row: gray value == label.
    batch = next(iter(loader(0)))
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == batch["labels"].tolist()


def test_dataloader_workers_report_bad_images_in_the_batch():
    dataset = numbered_dataset(6)
    bad = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"junk", "path": None}], "label": [99]}, features=dataset.features
    )
    dataset = datasets.concatenate_datasets([dataset, bad])  # row 6 is bad
    decoder = ImageDecoder("image", 4, label_column="label", on_bad_image="skip")
    loader = build_dataloader(dataset, decoder, 7, shuffle=False, seed=0, num_workers=1, drop_last=False)

    assert loader.persistent_workers
    (batch,) = list(loader)
    assert batch["labels"].tolist() == list(range(6))
    assert len(batch["bad_images"]) == 1 and batch["bad_images"][0].startswith("row 6\t")
    assert decoder.bad_images == []  # the worker's copy counted it, hence the batch key

    strict = build_dataloader(
        dataset, ImageDecoder("image", 4, on_bad_image="error"), 7, shuffle=False, seed=0, num_workers=0, drop_last=False
    )
    with pytest.raises(DataError, match="row 6"):
        list(strict)


# ---------------------------------------------------------------------------------------------
# Extra image columns (a method's input_columns, e.g. a foreground mask)
# ---------------------------------------------------------------------------------------------


def grey_picture(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def image_and_mask_row(index: int, width: int = 30, height: int = 20, mask: bytes | None = None) -> dict:
    """An RGB picture whose three channels are one grey picture, and that grey picture as an ``L`` mask."""
    grey = grey_picture(width, height, seed=index)
    image = encode(PIL.Image.fromarray(np.stack([grey] * 3, axis=-1)), "PNG")
    mask = encode(PIL.Image.fromarray(grey, mode="L"), "PNG") if mask is None else mask
    return {"image": {"bytes": image, "path": f"images/{index}.png"},
            "mask": {"bytes": mask, "path": f"masks/{index}.png"}, "label": index, "__index__": index}


def test_extra_columns_decode_like_the_image_so_pixels_line_up():
    rows = [image_and_mask_row(i) for i in range(3)]
    batch = ImageDecoder("image", 12, label_column="label", extra_columns={"foreground": "mask"})(rows)

    assert set(batch) == {"pixel_values", "labels", "bad_images", "foreground"}
    assert batch["foreground"].dtype == torch.uint8 and batch["foreground"].shape == (3, 1, 12, 12)
    # the same resize (30x20 -> shorter side 12) and center crop: the mask is the image's grey channel
    assert torch.equal(batch["foreground"], batch["pixel_values"][:, :1])
    assert batch["labels"].tolist() == [0, 1, 2]


def test_extra_columns_modes_one_channel_as_documented():
    def decoded_mask(mask: PIL.Image.Image, size=(16, 16)) -> np.ndarray:
        row = image_and_mask_row(0, *size, mask=encode(mask, "PNG"))
        return ImageDecoder("image", 16, extra_columns={"mask": "mask"})([row])["mask"][0, 0].numpy()

    binary = PIL.Image.new("1", (16, 16), 0)
    binary.paste(1, (0, 0, 8, 16))
    assert decoded_mask(binary)[:, :8].min() == 255 and decoded_mask(binary)[:, 8:].max() == 0
    assert (decoded_mask(PIL.Image.new("RGB", (16, 16), (90, 90, 90))) == 90).all()  # grey saved as RGB
    assert (decoded_mask(PIL.Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))) == 255).all()  # 16-bit

    decoder = ImageDecoder("image", 16, extra_columns={"mask": "mask"}, on_bad_image="skip")
    for mask, words in ((PIL.Image.new("RGB", (16, 16), (255, 0, 0)), "colour image (mode RGB)"),
                        (PIL.Image.new("LA", (16, 16), (255, 0)), "transparent image (mode LA)")):
        batch = decoder([image_and_mask_row(0, 16, 16, mask=encode(mask, "PNG"))])
        assert batch["mask"].shape == (0, 1, 16, 16) and batch["pixel_values"].shape == (0, 3, 16, 16)
        assert f"column 'mask': a {words} where a 1-channel image is expected" in batch["bad_images"][0]


def test_a_bad_or_missing_extra_column_makes_a_bad_image():
    good = image_and_mask_row(0)
    broken = image_and_mask_row(1, mask=b"junk")
    missing = {**image_and_mask_row(2), "mask": None}
    other_size = image_and_mask_row(3, mask=encode(PIL.Image.new("L", (15, 10)), "PNG"))
    decoder = ImageDecoder("image", 8, label_column="label", extra_columns={"mask": "mask"}, on_bad_image="skip")

    batch = decoder([good, broken, missing, other_size])

    assert batch["labels"].tolist() == [0]
    assert batch["pixel_values"].shape == (1, 3, 8, 8) and batch["mask"].shape == (1, 1, 8, 8)
    assert decoder.bad_images == batch["bad_images"] and len(batch["bad_images"]) == 3
    where = [entry.split("\t")[0] for entry in batch["bad_images"]]
    reasons = [entry.split("\t")[1] for entry in batch["bad_images"]]
    assert where == ["row 1 (masks/1.png)", "row 2", "row 3 (masks/3.png)"]
    assert reasons[0].startswith("column 'mask': not an image file")
    assert reasons[1] == "column 'mask': no image (empty cell)"
    assert reasons[2] == "column 'mask': 15x10 px but the image ('image') is 30x20 px: they must be the same size to line up"

    strict = ImageDecoder("image", 8, extra_columns={"mask": "mask"}, on_bad_image="error")
    with pytest.raises(DataError, match=r"Bad image at row 1 \(masks/1\.png\): column 'mask': not an image file"):
        strict([good, broken])


def test_extra_column_size_is_compared_upright():
    # the image is stored 40x20 with EXIF orientation 6: upright it is 20x40, like the mask
    image = {"bytes": exif_rotated_jpeg(), "path": "rotated.jpg"}
    upright = {"image": image, "mask": {"bytes": encode(PIL.Image.new("L", (20, 40), 255), "PNG"), "path": None}}
    assert ImageDecoder("image", 8, extra_columns={"mask": "mask"})([upright])["mask"].min() == 255
    stored = {"image": image, "mask": {"bytes": encode(PIL.Image.new("L", (40, 20)), "PNG"), "path": None}}
    with pytest.raises(DataError, match="column 'mask': 40x20 px but the image .* is 20x40 px"):
        ImageDecoder("image", 8, extra_columns={"mask": "mask"})([stored])


def test_extra_columns_are_checked_before_training(tmp_path):
    rows = [image_and_mask_row(i) for i in range(2)]
    dataset = datasets.Dataset.from_dict(
        {"image": [row["image"] for row in rows], "mask": [row["mask"] for row in rows], "label": [0, 1],
         "mask_path": ["masks/0.png", "masks/1.png"]},
        features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image(), "label": datasets.Value("int64"),
                                    "mask_path": datasets.Value("string")}),
    )
    dataset.save_to_disk(str(tmp_path / "masked"))

    loaded, _ = load_image_dataset(str(tmp_path / "masked"), extra_columns=["mask", "mask_path"])
    assert loaded.features["mask"] == datasets.Image(decode=False)
    assert loaded.features["mask_path"] == datasets.Value("string")  # file paths are opened by the decoder
    with pytest.raises(DataError, match=r"Column 'saliency' .*not found.*\['image', 'mask', 'label', 'mask_path'\]"):
        load_image_dataset(str(tmp_path / "masked"), extra_columns=["saliency"])
    with pytest.raises(DataError, match="Column 'label' .* must be an Image column"):
        load_image_dataset(str(tmp_path / "masked"), extra_columns=["label"])

    # rows without the column: a configuration error even when skipping bad images
    with pytest.raises(DataError, match=r"'saliency' is not in the dataset rows"):
        ImageDecoder("image", 8, extra_columns={"mask": "saliency"}, on_bad_image="skip")([rows[0]])
    with pytest.raises(ValueError, match=r"cannot use the batch key\(s\) \['labels'\]"):
        ImageDecoder("image", 8, extra_columns={"labels": "mask"})


def test_dataloader_yields_extra_columns_with_their_rows(tmp_path):
    rows = [image_and_mask_row(i, 8, 8) for i in range(6)]
    dataset = datasets.Dataset.from_dict(
        {"image": [row["image"] for row in rows], "mask": [row["mask"] for row in rows], "label": list(range(6))},
        features=datasets.Features({"image": datasets.Image(decode=False), "mask": datasets.Image(decode=False),
                                    "label": datasets.Value("int64")}),
    )
    decoder = ImageDecoder("image", 8, label_column="label", extra_columns={"mask": "mask"})
    clone = pickle.loads(pickle.dumps(decoder))
    assert clone.extra_columns == {"mask": "mask"}
    loader = build_dataloader(dataset, decoder, 3, shuffle=True, seed=0, num_workers=0)
    for batch in loader:
        assert batch["mask"].shape == (3, 1, 8, 8)
        assert torch.equal(batch["mask"], batch["pixel_values"][:, :1])
        for label, mask in zip(batch["labels"].tolist(), batch["mask"]):
            assert np.array_equal(mask[0].numpy(), grey_picture(8, 8, seed=label))
