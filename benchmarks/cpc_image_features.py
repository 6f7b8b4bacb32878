"""The two whole-image features of a CPC patch encoder, evaluated side by side (issue 18: publish the better one):
  * whole_image: the encoder run on the whole image (`pooler_output`), what AutoModel / pipeline give;
  * patch_mean: the mean of the patch vectors over the grid (`modeling.cpc.patch_mean_features`), as CPC trains them.
kNN (k=20, T=0.07) and, with --linear, the linear probe of `hf-ssl eval linear`, on frozen features of the full splits
(or, with --max_train / --max_test, of seeded random subsets: a quick check); not cached and not recorded in the
encoder's eval_results.json. Prints one JSON object.

    python benchmarks/cpc_image_features.py runs/cpc-fashion-mnist-convnext-patch-8/encoder --patch_size 8 --patch_stride 4
"""
import argparse
import dataclasses
import json

import torch

from hf_ssl.data import label_column_of, load_image_dataset
from hf_ssl.evaluation import (FrozenEncoder, SplitFeatures, extract_features, frozen_features, knn_scores,
                               linear_probe, load_encoder)
from modeling.cpc import patch_mean_features


@dataclasses.dataclass
class PatchMeanEncoder(FrozenEncoder):
    """A `FrozenEncoder` whose feature is the mean of the patch vectors over the grid."""

    patch_size: int = 8
    patch_stride: int = 4

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return patch_mean_features(self.model, pixel_values.to(self.model.dtype), self.patch_size, self.patch_stride)


def subset_features(encoder: FrozenEncoder, dataset_name: str, split: str, size: int, args) -> SplitFeatures:
    """The features of `size` images of `split`, drawn at random (seed 0), in dataset order."""
    dataset, image_column = load_image_dataset(dataset_name, split)
    label_column = label_column_of(dataset, None)
    if size < len(dataset):
        rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:size].sort().values
        dataset = dataset.select(rows.tolist())
    features, labels = extract_features(encoder, dataset, image_column, label_column, args.batch_size,
                                        args.num_workers, desc=f"features {split}")
    return SplitFeatures(features, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported CPC encoder directory (OUTPUT_DIR/encoder)")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--patch_size", type=int, required=True)
    parser.add_argument("--patch_stride", type=int, required=True)
    parser.add_argument("--features", nargs="+", choices=["whole_image", "patch_mean"],
                        default=["whole_image", "patch_mean"])
    parser.add_argument("--linear", action="store_true", help="also the linear probe (minutes per feature)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--max_train", type=int, default=None, help="kNN bank / probe training images (default all)")
    parser.add_argument("--max_test", type=int, default=None, help="test images (default all)")
    args = parser.parse_args()
    base = load_encoder(args.model)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(FrozenEncoder)}
    encoders = {"whole_image": base,
                "patch_mean": PatchMeanEncoder(**fields, patch_size=args.patch_size, patch_stride=args.patch_stride)}
    report = {}
    for name in args.features:
        encoder = encoders[name]
        if args.max_train or args.max_test:
            train = subset_features(encoder, args.dataset, "train", args.max_train or 10 ** 9, args)
            test = subset_features(encoder, args.dataset, "test", args.max_test or 10 ** 9, args)
        else:
            feats = frozen_features(args.model, args.dataset, batch_size=args.batch_size,
                                    num_workers=args.num_workers, use_cache=False, encoder=encoder)
            train, test = feats.train, feats.test
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        report[name] = {"knn": knn_scores(train, test, num_classes)}
        if args.linear:
            report[name]["linear"] = linear_probe(train.features, train.labels, test.features, test.labels,
                                                  num_classes)[0]
    report["num_train"], report["num_test"] = len(train.labels), len(test.labels)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
