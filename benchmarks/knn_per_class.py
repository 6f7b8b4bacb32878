"""Per-class kNN top-1 of a trained run against raw pixels on Fashion-MNIST (which classes SSL gains or loses on).

    python benchmarks/knn_per_class.py runs/demo [--idx_dir /usr/share/datasets/fashion-mnist]

Uses the features `hf-ssl train` cached for its final kNN (RUN/features/fashion_mnist-{train,test}-*.safetensors)
and the 28 px raw pixels of Debian's idx files scaled to [-1, 1]; the same weighted kNN (k=20, T=0.07). Also prints
the share of test images that at least one of the two classifies right.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hf_ssl.data import read_idx
from hf_ssl.evaluation import knn_predict

CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("run_dir", type=Path)
parser.add_argument("--idx_dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
args = parser.parse_args()


def cached(split: str) -> dict[str, torch.Tensor]:
    files = sorted((args.run_dir / "features").glob(f"fashion_mnist-{split}-*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"expected one cached {split} feature file in {args.run_dir / 'features'}, found {len(files)}")
    return load_file(files[0])


def idx_array(stem: str):
    matches = sorted(args.idx_dir.glob(f"{stem}*"))
    if not matches:
        raise SystemExit(f"no {stem} idx file in {args.idx_dir} (apt-get install dataset-fashion-mnist)")
    return read_idx(matches[0])


def pixels(stem: str) -> torch.Tensor:
    return torch.from_numpy(idx_array(stem).copy()).float().flatten(1) / 127.5 - 1


train, test = cached("train"), cached("test")
labels_train, labels_test = train["labels"], test["labels"]
raw_train, raw_test = pixels("train-images-idx3-ubyte"), pixels("t10k-images-idx3-ubyte")
for stem, labels in (("train-labels-idx1-ubyte", labels_train), ("t10k-labels-idx1-ubyte", labels_test)):
    idx_labels = torch.from_numpy(idx_array(stem).astype("int64"))
    if not torch.equal(idx_labels, labels.long()):
        raise SystemExit(f"the cached features are not in the order of {stem} (labels differ)")


def predict(bank: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    return knn_predict(F.normalize(bank.float(), dim=1), labels_train, F.normalize(queries.float(), dim=1),
                       20, 0.07, len(CLASSES)).argmax(1)


by_run, by_pixels = predict(train["features"], test["features"]), predict(raw_train, raw_test)
print(f"{'class':12s} {'raw pixels':>10s} {args.run_dir.name:>10s}")
for c, name in enumerate(CLASSES):
    rows = labels_test == c
    print(f"{name:12s} {100 * (by_pixels[rows] == c).float().mean():10.1f} {100 * (by_run[rows] == c).float().mean():10.1f}")
right_run, right_pixels = by_run == labels_test, by_pixels == labels_test
print(f"{'all':12s} {100 * right_pixels.float().mean():10.2f} {100 * right_run.float().mean():10.2f}")
print(f"either right: {100 * (right_run | right_pixels).float().mean():.2f} %")
