"""The data path at ImageNet scale, on CPU: how fast one DataLoader worker decodes real-size JPEGs to the recipes'
`image_size`, and how much resolution the on-device crops lose by starting from that fixed-size decode.

    python benchmarks/data_path.py [--images 400] [--sizes 224 256 384] [--workers 1 2] [--runs runs/data-path]
                                   [--step_images_per_second RECIPE=N ...]

1. Writes an imagefolder of photo-like 500 x 375 JPEGs (quality 90, ImageNet's typical size: smooth colour fields,
   edges and sensor-like noise, seeded), once, under RUNS/jpegs.
2. Decode throughput: images/s of `ImageDecoder` (what training uses: EXIF, RGB, shorter side -> size, centre crop)
   on the whole folder, in the main process (one worker's rate) at each --sizes, then through `build_dataloader` with
   --workers workers at the recipes' 256 px; the JPEG decode alone (PIL `load()`) as the baseline of the same run.
3. Workers a GPU needs: for each --step_images_per_second RECIPE=N (a training step's images/s, e.g. from
   benchmarks/gpu_throughput.py on a lent GPU), N / (one worker's images/s at 256 px).
4. Resolution: for each crop of the ImageNet recipes (global 224 px at scale 0.08-1 / 0.2-1 / 0.4-1, DINO's local
   96 px at 0.05-0.4), the source pixels per output pixel (linear) when the crop is cut from the 256 px decode, and
   when it is cut from the original 500 x 375 image (what torchvision's RandomResizedCrop on the file does) - below
   1 means the crop is upsampled, i.e. detail is lost that the file had.
Prints and writes RUNS/results.json. Measured figures: benchmarks/README.md.
"""
import argparse
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from hf_ssl.data import ImageDecoder, build_dataloader, load_image_dataset

WIDTH, HEIGHT = 500, 375
# (recipe, crop output size, scale range) of the shipped ImageNet recipes' views
CROPS = [("moco v3 / imagenet-v3-resnet-50 global", 224, (0.08, 1.0)),
         ("moco v2, disco, fast-moco global", 224, (0.2, 1.0)),
         ("dino / imagenet-vit-small-16 global", 224, (0.4, 1.0)),
         ("dino / imagenet-vit-small-16 local", 96, (0.05, 0.4))]


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random colour fields + a few hard-edged shapes + noise: JPEG-compresses like a photo (~50-100 kB)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        field = np.asarray(PIL.Image.fromarray(coarse).resize((WIDTH, HEIGHT), PIL.Image.BICUBIC), dtype=np.float32)
        for _ in range(4):
            x0, y0 = rng.integers(0, WIDTH - 60), rng.integers(0, HEIGHT - 60)
            w, h = rng.integers(30, 200), rng.integers(30, 150)
            field[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
        field += rng.normal(0, 6, field.shape)
        path = folder / f"class_{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def rate(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def decode_rates(dataset, image_column: str, sizes: list[int], workers: list[int]) -> dict:
    rows = [dataset[i] for i in range(len(dataset))]  # undecoded bytes/paths, read once

    def jpeg_only():
        for row in rows:
            cell = row[image_column]
            with PIL.Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
                image.load()

    out = {"jpeg_decode_only": rate(jpeg_only, len(rows))}
    for size in sizes:
        decoder = ImageDecoder(image_column, size=size)
        out[f"decoder_{size}px_1_worker"] = rate(lambda: [decoder(rows[i:i + 64]) for i in range(0, len(rows), 64)],
                                                 len(rows))
    for n in workers:
        loader = build_dataloader(dataset, ImageDecoder(image_column, size=256), 64, shuffle=False, seed=0,
                                  num_workers=n, drop_last=False)
        next(iter(loader))  # start the workers outside the timing
        out[f"dataloader_256px_{n}_workers"] = rate(lambda: [b for b in loader], len(dataset))
    return out


def source_pixels_per_output_pixel(out_size: int, scale: float, source_short: int, source_long: int,
                                   decoded: int | None) -> float:
    """Linear source pixels per output pixel of a square crop covering `scale` of the area it is cut from: the
    `decoded` x `decoded` centre crop of the shorter side, or (None) the whole source image."""
    area = decoded * decoded if decoded else source_short * source_long
    return math.sqrt(scale * area) / out_size


def resolution_table(decoded: int) -> list[dict]:
    rows = []
    for name, out_size, (low, high) in CROPS:
        for scale in (low, math.sqrt(low * high), high):
            rows.append({"crop": name, "output_px": out_size, "scale": round(scale, 3),
                         f"from_{decoded}px_decode": round(source_pixels_per_output_pixel(out_size, scale, HEIGHT,
                                                                                            WIDTH, decoded), 2),
                         "from_500x375_file": round(source_pixels_per_output_pixel(out_size, scale, HEIGHT, WIDTH,
                                                                                   None), 2)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 384])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", default="runs/data-path")
    parser.add_argument("--step_images_per_second", nargs="*", default=[], metavar="RECIPE=N")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker is one thread
    folder = Path(args.runs).resolve() / "jpegs"
    if not folder.is_dir() or sum(1 for _ in folder.rglob("*.jpg")) != args.images:
        write_jpegs(folder, args.images)
    dataset, image_column = load_image_dataset(str(folder), "train")
    sizes = sorted({*args.sizes, 256})
    rates = decode_rates(dataset, image_column, sizes, args.workers)
    per_worker = rates["decoder_256px_1_worker"]
    needs = {}
    for item in args.step_images_per_second:
        recipe, value = item.split("=")
        needs[recipe] = {"step_images_per_second": float(value), "workers": math.ceil(float(value) / per_worker)}
    kb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / args.images / 1024
    results = {"images": args.images, "jpeg_kb_mean": round(kb, 1), "size": f"{WIDTH}x{HEIGHT}",
               "images_per_second": {k: round(v, 1) for k, v in rates.items()},
               "ratio_to_jpeg_decode": {k: round(v / rates["jpeg_decode_only"], 3) for k, v in rates.items()},
               "workers_needed": needs, "resolution": resolution_table(256)}
    out = Path(args.runs) / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
