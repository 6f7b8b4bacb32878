"""Time overhead of checkpointing: a DINO run checkpointing every step vs. never, measured in the same process.

    python benchmarks/checkpoint_overhead.py [--recipe recipes/dino/fashion-mnist-resnet-tiny.yaml] [--steps 20]
                                             [--repeats 3] [--key value ...]

Both variants train the same recipe (default: the resnet-tiny reference setting, batch 64) for `--steps` steps on
a generated 28 px dataset (no download), evaluation off; they run alternately `--repeats` times each and the
fastest runs are compared (the least disturbed by other load on the machine). Every save_checkpoint call is also
timed, which gives a second ratio inside each checkpointing run, immune to load changing between runs.
Prints one JSON object with:
  loop_seconds_never / loop_seconds_every_step   fastest training loop (train_runtime_seconds of metrics.jsonl)
  overhead_ratio                                 every_step / never, between runs (1.0: free)
  overhead_ratio_within_run                      median over checkpointing runs of loop / (loop - its saves)
  save_seconds_mean                              one save_checkpoint call (state to .tmp_step_N, config, rename)
  step_seconds_never                             one optimizer step without checkpointing
  checkpoint_megabytes                           size of one checkpoints/step_N directory
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

import hf_ssl.train as train_module
from hf_ssl.recipe import load_recipe


def synthetic_dataset(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    path = root / "data"
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features
                               ).save_to_disk(str(path))
    return path


def run_once(recipe_path: str, overrides: list[str], output_dir: Path, checkpointing: bool) -> float:
    extra = ["--output_dir", str(output_dir), "--checkpointing_steps", "1" if checkpointing else "null"]
    recipe = load_recipe(recipe_path, overrides + extra)
    train_module.train(recipe)
    final = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["train_runtime_seconds"] for r in final if "train_runtime_seconds" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/dino/fashion-mnist-resnet-tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    args, overrides = parser.parse_known_args()

    save_times: list[float] = []
    save_checkpoint = train_module.save_checkpoint

    def timed_save_checkpoint(*a, **k):
        start = time.perf_counter()
        result = save_checkpoint(*a, **k)
        save_times.append(time.perf_counter() - start)
        return result

    train_module.save_checkpoint = timed_save_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_dataset(tmp, args.steps * args.batch_size)
        common = ["--dataset_name", str(data), "--max_steps", str(args.steps), "--per_device_train_batch_size",
                  str(args.batch_size), "--do_eval", "false", "--logging_steps", str(args.steps),
                  "--dataloader_num_workers", "0", "--save_total_limit", "2", *overrides]
        loops = {"never": [], "every_step": []}
        within = []
        size_mb = 0.0
        for repeat in range(args.repeats):
            for name in ("never", "every_step"):
                out = tmp / f"{name}-{repeat}"
                n_saves = len(save_times)
                loops[name].append(run_once(args.recipe, common, out, name == "every_step"))
                if name == "every_step":
                    saved = sum(save_times[n_saves:])
                    within.append(loops[name][-1] / (loops[name][-1] - saved))
                    last = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
                    size_mb = sum(f.stat().st_size for f in last.iterdir()) / 2**20
    never, every = min(loops["never"]), min(loops["every_step"])
    print(json.dumps({
        "recipe": args.recipe, "steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
        "loop_seconds_never": never, "loop_seconds_every_step": every,
        "overhead_ratio": round(every / never, 3),
        "overhead_ratio_within_run": round(statistics.median(within), 3),
        "save_seconds_mean": round(statistics.mean(save_times), 4),
        "step_seconds_never": round(never / args.steps, 4),
        "checkpoint_megabytes": round(size_mb, 2),
        "all_loop_seconds": loops,
    }))


if __name__ == "__main__":
    main()
