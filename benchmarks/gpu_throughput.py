"""GPU training throughput of a recipe on synthetic data: images/s and MFU (model FLOPs utilisation).

    python benchmarks/gpu_throughput.py recipes/dino/imagenet-vit-small-16.yaml [--steps 20] [--key value ...]
    python benchmarks/gpu_throughput.py recipes/moco/imagenet-v3-resnet-50.yaml --per_device_train_batch_size 128
    python benchmarks/gpu_throughput.py recipes/disco/imagenet-student-efficientnet-b0.yaml \
        --teacher_recipe recipes/disco/imagenet-teacher-resnet-50.yaml
    # CPU smoke test of the script itself (tiny model, no MFU unless --peak_tflops is given):
    python benchmarks/gpu_throughput.py recipes/dino/fashion-mnist-resnet-tiny.yaml --steps 2 --warmup 1 \
        --per_device_train_batch_size 8 --mixed_precision no
    # every ImageNet recipe, one JSON line each (DisCo with a random ResNet-50 teacher):
    bash benchmarks/gpu_throughput_all.sh [--steps 20] > gpu_throughput.jsonl

One process, the recipe's per-device batch of random uint8 images already on the device (no data loading, no
decoding: the ceiling the data pipeline has to keep up with). A step is the training loop's: on-device views,
method forward + backward under autocast (the recipe's mixed_precision, bf16 for the ImageNet recipes), optimizer
step, EMA/queue update. FLOPs of one step are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and
convolutions, forward and backward, every crop, teacher/momentum encoder included; augmentation and element-wise
ops not counted), so MFU = counted FLOPs per second / the device's peak dense bf16 FLOP/s (--peak_tflops, or a
known value for H100/H200/A100). The batch is the recipe's per_device_train_batch_size (a recipe that sets
total_train_batch_size for many GPUs is measured at its per_device_train_batch_size, 64 unless given). A DisCo
student's teacher can be built with random weights from --teacher_recipe: a step costs the same whatever the
teacher's weights. Prints one JSON object.
"""
import argparse
import atexit
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hf_ssl.augment import build_views
from hf_ssl.recipe import load_recipe
from hf_ssl.train import build_model, build_optimizer
from modeling import METHODS
from modeling.pretraining import TrainingProgress

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # the most specific name first
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def random_teacher(recipe_path: str) -> str:
    """Saves a randomly initialised model of `recipe_path` like OUTPUT_DIR/pretraining (deleted at exit); returns
    its directory."""
    path = Path(tempfile.mkdtemp(prefix="hf_ssl_teacher_")) / "pretraining"
    atexit.register(shutil.rmtree, path.parent, ignore_errors=True)
    torch.manual_seed(0)
    build_model(load_recipe(recipe_path, ["--output_dir", str(path.parent)])).save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak FLOP/s, in TFLOP/s")
    parser.add_argument("--teacher_recipe", default=None,
                        help="DisCo: build the teacher from this recipe, with random weights")
    args, overrides = parser.parse_known_args()
    if args.teacher_recipe:
        overrides += ["--model.teacher_name_or_path", random_teacher(args.teacher_recipe)]
    recipe = load_recipe(args.recipe, overrides + ["--output_dir", "/tmp/hf_ssl_gpu_throughput"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.mixed_precision)
    bs = recipe.per_device_train_batch_size

    torch.manual_seed(0)
    model = build_model(recipe).to(device).train()
    views = build_views(METHODS[recipe.method].views, recipe.image_mean, recipe.image_std,
                        **recipe.augmentation).to(device)
    optimizer = build_optimizer(model, recipe)
    images = torch.randint(0, 256, (bs, 3, recipe.image_size, recipe.image_size), dtype=torch.uint8, device=device)
    schedule = model.schedule_values(TrainingProgress(step=0, total_steps=1, steps_per_epoch=1))

    def step(seed: int) -> None:
        inputs = views(images, seed)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(**inputs, **schedule)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.post_optimizer_step(momentum=recipe.ema_momentum)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(0)
    flops_per_step = counter.get_total_flops()
    for i in range(args.warmup):
        step(1 + i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(1000 + i)
    sync()
    seconds = time.perf_counter() - start
    achieved = flops_per_step * args.steps / seconds
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "recipe": args.recipe, "method": recipe.method, "backbone": recipe.backbone,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "mixed_precision": recipe.mixed_precision, "per_device_batch_size": bs, "steps": args.steps,
        "images_per_second": round(bs * args.steps / seconds, 2),
        "seconds_per_step": round(seconds / args.steps, 4),
        "counted_tflops_per_step": round(flops_per_step / 1e12, 4),
        "achieved_tflops": round(achieved / 1e12, 3),
        "peak_tflops": peak,
        "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
    }
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
