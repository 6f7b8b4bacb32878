"""Training throughput of a recipe, as ratios against a baseline measured in the same run.

    python benchmarks/throughput.py recipes/dino/fashion-mnist-demo.yaml [--steps 20] [--key value ...]

Measures, on the recipe's device and batch size, images per second of:
  baseline   one forward+backward of the bare backbone on one global-size view (a supervised step's cost)
  loading    the recipe's DataLoader alone (decode in workers)
  views      the method's view recipe alone (augmentation on the device)
  train      the full training step (views + method forward/backward + optimizer + EMA), data preloaded
and prints one JSON object with absolute figures and each one's ratio to the baseline.
"""
import argparse
import json
import time

import torch

from hf_ssl.augment import build_views
from hf_ssl.data import ImageDecoder, build_dataloader, load_image_dataset
from hf_ssl.recipe import load_recipe
from hf_ssl.train import build_model, build_optimizer, model_inputs
from modeling import METHODS
from modeling.backbones import build_backbone, pooled_features
from modeling.pretraining import TrainingProgress


def rate(fn, images_per_call: int, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return images_per_call * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=20)
    args, overrides = parser.parse_known_args()
    recipe = load_recipe(args.recipe, overrides + ["--output_dir", "/tmp/hf_ssl_throughput"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bs = recipe.per_device_train_batch_size

    dataset, column = load_image_dataset(recipe.dataset_name, recipe.train_split, dataset_config=recipe.dataset_config,
                                         image_column=recipe.image_column)
    loader = build_dataloader(dataset, ImageDecoder(column, size=recipe.image_size), bs, shuffle=True,
                              seed=recipe.seed, num_workers=recipe.dataloader_num_workers)
    batches = iter(loader)
    loading = rate(lambda: next(batches), bs, args.steps)
    images = next(batches)["pixel_values"].to(device)

    model = build_model(recipe).to(device).train()
    views = build_views(METHODS[recipe.method].views, recipe.image_mean, recipe.image_std,
                        **recipe.augmentation).to(device)
    view_rate = rate(lambda: views(images, 0), bs, args.steps)

    backbone = build_backbone(model.config.backbone_config).to(device).train()
    if recipe.channels_last:  # the same memory layout as the method's backbone
        backbone = backbone.to(memory_format=torch.channels_last)
    view = next(iter(model_inputs(views(images, 0), recipe).values()))[:bs]

    def baseline_step():
        pooled_features(backbone, view).sum().backward()

    baseline = rate(baseline_step, bs, args.steps)
    optimizer = build_optimizer(model, recipe)
    schedule_kwargs = model.schedule_values(TrainingProgress(step=0, total_steps=1, steps_per_epoch=1))

    def train_step():
        inputs = model_inputs(views(images, 0), recipe)
        out = model(**inputs, **schedule_kwargs)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.post_optimizer_step(momentum=recipe.ema_momentum)

    train = rate(train_step, bs, args.steps)
    result = {"recipe": args.recipe, "device": str(device), "threads": torch.get_num_threads(), "batch_size": bs,
              "baseline_images_per_second": round(baseline, 1), "loading_images_per_second": round(loading, 1),
              "views_images_per_second": round(view_rate, 1), "train_images_per_second": round(train, 1),
              "ratio_loading_to_baseline": round(loading / baseline, 3),
              "ratio_views_to_baseline": round(view_rate / baseline, 3),
              "ratio_train_to_baseline": round(train / baseline, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
