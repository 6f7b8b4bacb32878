"""Save a random-init encoder (a baseline for `hf-ssl eval`) with the image processor of the small setting.

    python benchmarks/random_encoder.py /tmp/resnet-tiny-random [--backbone resnet-tiny --size 32 --seed 0]
    hf-ssl eval knn --model /tmp/resnet-tiny-random --dataset fashion_mnist
"""
import argparse

import torch

from hf_ssl.hub import image_processor
from modeling.backbones import backbone_config_from_preset, build_backbone

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("output_dir")
parser.add_argument("--backbone", default="resnet-tiny")
parser.add_argument("--size", type=int, default=32)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
build_backbone(backbone_config_from_preset(args.backbone)).save_pretrained(args.output_dir, safe_serialization=True)
image_processor(args.size, [0.5] * 3, [0.5] * 3).save_pretrained(args.output_dir)
print(args.output_dir)
