"""The two whole-image features of a CPC patch encoder, evaluated side by side (issue 18: publish the better one):
  * whole_image: the encoder run on the whole image (`pooler_output`), what AutoModel / pipeline give;
  * patch_mean: the mean of the patch vectors over the grid (`modeling.cpc.patch_mean_features`), as CPC trains them.
kNN (k=20, T=0.07) and, with --linear, the linear probe of `hf-ssl eval linear`, on frozen features; not cached and not
recorded in the encoder's eval_results.json. Prints one JSON object.

    python benchmarks/cpc_image_features.py runs/cpc-fashion-mnist-convnext-patch-8/encoder --patch_size 8 --patch_stride 4
"""
import argparse
import dataclasses
import json

import torch

from hf_ssl.evaluation import FrozenEncoder, frozen_features, knn_scores, linear_probe, load_encoder
from modeling.cpc import patch_mean_features


@dataclasses.dataclass
class PatchMeanEncoder(FrozenEncoder):
    """A `FrozenEncoder` whose feature is the mean of the patch vectors over the grid."""

    patch_size: int = 8
    patch_stride: int = 4

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return patch_mean_features(self.model, pixel_values.to(self.model.dtype), self.patch_size, self.patch_stride)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported CPC encoder directory (OUTPUT_DIR/encoder)")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--patch_size", type=int, required=True)
    parser.add_argument("--patch_stride", type=int, required=True)
    parser.add_argument("--linear", action="store_true", help="also the linear probe (minutes per feature)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args()
    base = load_encoder(args.model)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(FrozenEncoder)}
    encoders = {"whole_image": base,
                "patch_mean": PatchMeanEncoder(**fields, patch_size=args.patch_size, patch_stride=args.patch_stride)}
    report = {}
    for name, encoder in encoders.items():
        feats = frozen_features(args.model, args.dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                use_cache=False, encoder=encoder)
        report[name] = {"knn": knn_scores(feats.train, feats.test, feats.num_classes)}
        if args.linear:
            report[name]["linear"] = linear_probe(feats.train.features, feats.train.labels, feats.test.features,
                                                  feats.test.labels, feats.num_classes)[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
