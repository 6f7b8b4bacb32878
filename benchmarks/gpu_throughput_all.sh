#!/usr/bin/env bash
# Every ImageNet recipe through benchmarks/gpu_throughput.py on one GPU, one JSON line each, to stdout.
#   bash benchmarks/gpu_throughput_all.sh [--steps 20] > gpu_throughput.jsonl
# Batches: the recipe's per-device batch where it has one; recipes written as a global batch for many GPUs
# (total_train_batch_size) at 256 per GPU for ResNet-50 and 64 for CPC (49 patches of each image go through the
# encoder); MoCo v2 also at 256, and with channels-last, to show what batch and layout are worth on a GPU.
set -uo pipefail
run() { python benchmarks/gpu_throughput.py "$@" || echo "{\"recipe\": \"$1\", \"failed\": true}"; }
run recipes/dino/imagenet-vit-small-16.yaml "$@"
run recipes/moco/imagenet-v3-vit-small-16.yaml "$@"
run recipes/moco/imagenet-v2-resnet-50.yaml "$@"
run recipes/moco/imagenet-v2-resnet-50.yaml --per_device_train_batch_size 256 "$@"
run recipes/moco/imagenet-v2-resnet-50.yaml --per_device_train_batch_size 256 --channels_last true "$@"
run recipes/moco/imagenet-v3-resnet-50.yaml --per_device_train_batch_size 256 "$@"
run recipes/fast_moco/imagenet-resnet-50.yaml --per_device_train_batch_size 256 "$@"
run recipes/relic/imagenet-resnet-50.yaml --per_device_train_batch_size 256 "$@"
run recipes/cpc/imagenet-convnext-tiny-64.yaml --per_device_train_batch_size 64 "$@"
run recipes/disco/imagenet-student-efficientnet-b0.yaml --per_device_train_batch_size 256 \
    --teacher_recipe recipes/disco/imagenet-teacher-resnet-50.yaml "$@"
