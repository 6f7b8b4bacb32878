"""hf-ssl side by side with lightly: DINO, MoCo v2 and MoCo v3 at the settings of our Fashion-MNIST recipes.

How to run (repository root, an otherwise idle machine; hf-ssl's venv at .venv, lightly's made once by
`bash benchmarks/peers/make_venv.sh`):

    PYTHONPATH=. .venv/bin/python benchmarks/peers/compare.py                         # the measurement
    PYTHONPATH=. .venv/bin/python benchmarks/peers/compare.py --methods dino --pairs 1 \
        --max_steps 3 --subset_train 2048 --subset_test 512 --linear_epochs 2 --output_dir /tmp/peers-smoke

For each method (`--methods`, default all three) it writes the settings file of our recipe (`settings` below), then
runs `--pairs` pairs of trainings, alternating ours and lightly's (ours, theirs, ours, theirs, ...; pair i uses seed
recipe seed + i), each as its own process timed from the outside (`--earlier RESULTS_JSON`: the pairs measured by an
earlier command count, and only the pairs after them are trained):

    hf-ssl train RECIPE --output_dir W/ours-M-i --seed S --do_eval false --checkpointing_steps null
    benchmarks/peers/.venv/bin/python benchmarks/peers/lightly_train.py --settings W/settings/M.json \
        --output_dir W/lightly-M-i --seed S

(+ `--max_steps N` on both, `--dataset_name W/data/subset` on ours and `--max_images N` on theirs for smoke runs).
Both runs skip in-training evaluation and checkpoints (lightly's loop has neither). Measured per run:
  * process: wall seconds of the whole command (start-up, imports, data set-up, training, saving the encoder; ours
    also writes its model card and loss plots);
  * loop: images trained / seconds of the training loop (first batch requested -> last optimizer step; ours is
    metrics.jsonl's train_runtime_seconds, theirs lightly_metrics.json's loop_seconds).
Reported per pair as ratios (ours / theirs for images per second, theirs / ours for process seconds: > 1 = ours
faster) and their median over pairs. Quality: `hf-ssl eval knn` and `hf-ssl eval linear` of every run's encoder
(both sides evaluated by our evaluation, on the same splits), mean and spread over the runs.

Writes OUTPUT_DIR/results.json and OUTPUT_DIR/results.md (default benchmarks/peers/), runs under WORK_DIR (default
benchmarks/peers/work/, git-ignored); a run directory already there is deleted and trained again.

    PYTHONPATH=. .venv/bin/python benchmarks/peers/compare.py settings RECIPE.yaml [--key value ...] --output F.json

writes only the settings file that lightly_train.py reads: the resolved recipe, the method's resolved config, the
view keys with their defaults, the backbone config, our model's parameter count per part, our image processor.
"""
import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LIGHTLY_PYTHON = HERE / ".venv" / "bin" / "python"

# The Fashion-MNIST recipes each lightly rebuild follows.
RECIPES = {
    "dino": "recipes/dino/fashion-mnist-demo.yaml",
    "mocov2": "recipes/moco/fashion-mnist-resnet-tiny.yaml",
    "mocov3": "recipes/moco/fashion-mnist-v3-resnet-tiny.yaml",
}


# ------------------------------------------------------------------------------------------------ settings


def resolved_settings(name: str, recipe_path: str, overrides: list[str]) -> dict:
    """What lightly_train.py needs to rebuild `recipe_path`: every value resolved by hf-ssl itself."""
    from hf_ssl.augment import VIEW_RECIPES
    from hf_ssl.hub import image_processor
    from hf_ssl.recipe import load_recipe
    from hf_ssl.train import build_model
    from modeling import METHODS

    recipe = load_recipe(recipe_path, overrides + ["--output_dir", "/tmp/unused"])
    model = build_model(recipe)
    view_recipe = METHODS[recipe.method].views
    defaults = {key: p.default for key, p in inspect.signature(VIEW_RECIPES[view_recipe]).parameters.items()
                if key not in ("mean", "std")}
    augmentation = {key: list(value) if isinstance(value, tuple) else value
                    for key, value in {**defaults, **recipe.augmentation}.items()}
    config = model.config.to_dict()
    return {
        "name": name,
        "method": recipe.method,
        "recipe_path": recipe_path,
        "overrides": overrides,
        "recipe": recipe.to_dict(),
        "model_config": config,
        "backbone_config": model.config.backbone_config.to_dict(),
        "view_recipe": view_recipe,
        "augmentation": augmentation,
        "parameter_counts": {part: sum(p.numel() for p in module.parameters())
                             for part, module in model.named_children() if any(True for _ in module.parameters())},
        "preprocessor_config": preprocessor_config(image_processor(recipe.image_size, recipe.image_mean,
                                                                   recipe.image_std)),
    }


def preprocessor_config(processor) -> dict:
    """The preprocessor_config.json our export writes for `processor` (what `hf-ssl eval` reads)."""
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        return json.loads((Path(tmp) / "preprocessor_config.json").read_text())


def write_settings(name: str, recipe_path: str, overrides: list[str], output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(resolved_settings(name, recipe_path, overrides), indent=2, default=str) + "\n")
    return output


# ------------------------------------------------------------------------------------------------ runs


def timed(command: list[str], log: Path) -> float:
    """Run `command` (output to `log`), return its wall seconds; a failure stops the comparison, naming the log."""
    print("$ " + " ".join(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"exit code {code} after {seconds:.0f} s; {log} ends with:\n{tail}")
    return seconds


def run_ours(recipe_path: str, run_dir: Path, seed: int, extra: list[str]) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "hf_ssl", "train", recipe_path, "--output_dir", str(run_dir), "--seed", str(seed),
               "--do_eval", "false", "--checkpointing_steps", "null", *extra]
    seconds = timed(command, run_dir.with_suffix(".log"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = next(r for r in reversed(records) if "train_runtime_seconds" in r)
    steps = max(r["step"] for r in records)
    images = steps * final["global_batch_size"]
    return {"side": "ours", "run_dir": str(run_dir), "seed": seed, "process_seconds": round(seconds, 2),
            "steps": steps, "images": images, "loop_seconds": final["train_runtime_seconds"],
            "loop_images_per_second": round(images / final["train_runtime_seconds"], 2),
            "encoder": str(run_dir / "encoder")}


def run_lightly(python: str, settings: Path, run_dir: Path, seed: int, extra: list[str]) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [python, str(HERE / "lightly_train.py"), "--settings", str(settings), "--output_dir", str(run_dir),
               "--seed", str(seed), *extra]
    seconds = timed(command, run_dir.with_suffix(".log"))
    metrics = json.loads((run_dir / "lightly_metrics.json").read_text())
    return {"side": "lightly", "run_dir": str(run_dir), "seed": seed, "process_seconds": round(seconds, 2),
            "steps": metrics["steps"], "images": metrics["images"], "loop_seconds": metrics["loop_seconds"],
            "loop_images_per_second": metrics["loop_images_per_second"], "lightly_version": metrics["lightly_version"],
            "encoder": str(run_dir / "encoder")}


def evaluate(encoder: str, dataset: str, protocol: str, extra: list[str], log: Path) -> dict:
    """Our evaluation (`hf-ssl eval`) of an encoder directory: its scores, e.g. {"top1": 85.2, "top5": 99.1}."""
    command = [sys.executable, "-m", "hf_ssl", "eval", protocol, "--model", encoder, "--dataset", dataset, *extra]
    timed(command, log)
    report = json.loads(log.read_text().strip().splitlines()[-1])
    return {key.split("/", 1)[1]: value for key, value in report["scores"].items()}


def make_subset(work_dir: Path, train: int, test: int) -> str:
    """The first `train` / `test` images of Fashion-MNIST as a save_to_disk DatasetDict (lightly_train.py's
    --max_images reads the same first images of the idx files)."""
    import datasets

    from hf_ssl.data import fashion_mnist

    target = work_dir / "data" / f"fashion_mnist_{train}_{test}"
    if not (target / "dataset_dict.json").is_file():
        datasets.DatasetDict({"train": fashion_mnist("train").select(range(train)),
                              "test": fashion_mnist("test").select(range(test))}).save_to_disk(str(target))
    return str(target)


# ------------------------------------------------------------------------------------------------ summary


def earlier_runs(path: str, methods: list[str], dataset: str, max_steps: int | None
                 ) -> tuple[dict[str, list[dict]], dict]:
    """The measured pairs of an earlier compare.py command (its results.json) per method, and that command's
    provenance (command, start, machine): this command adds pairs to them instead of training them again. Refused
    unless they were measured on the same data, steps and recipes."""
    earlier = json.loads(Path(path).read_text())
    if (earlier["dataset"], earlier["max_steps"]) != (dataset, max_steps):
        raise SystemExit(f"--earlier {path} was measured with dataset={earlier['dataset']}, max_steps="
                         f"{earlier['max_steps']}; this command uses dataset={dataset}, max_steps={max_steps}")
    found = {}
    for summary in earlier["methods"]:
        if summary["method"] in methods:
            if summary["recipe"] != RECIPES[summary["method"]]:
                raise SystemExit(f"--earlier {path}: {summary['method']} was measured with {summary['recipe']}, "
                                 f"not {RECIPES[summary['method']]}")
            found[summary["method"]] = summary["runs"]
    return found, {key: earlier[key] for key in ("command", "started", "machine")}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def summarize(method: str, runs: list[dict], scores: dict) -> dict:
    pairs = []
    ours_runs = [r for r in runs if r["side"] == "ours"]
    lightly_runs = [r for r in runs if r["side"] == "lightly"]
    for ours, theirs in zip(ours_runs, lightly_runs):
        pairs.append({"seed": ours["seed"],
                      "loop_images_per_second": [ours["loop_images_per_second"], theirs["loop_images_per_second"]],
                      "loop_speedup": ratio(ours["loop_images_per_second"], theirs["loop_images_per_second"]),
                      "process_seconds": [ours["process_seconds"], theirs["process_seconds"]],
                      "process_speedup": ratio(theirs["process_seconds"], ours["process_seconds"])})
    quality = {}
    for side, side_runs in (("ours", ours_runs), ("lightly", lightly_runs)):
        for metric in ("knn_top1", "linear_top1"):
            values = [scores[r["run_dir"]][metric] for r in side_runs if metric in scores.get(r["run_dir"], {})]
            if values:
                quality.setdefault(side, {})[metric] = {
                    "mean": round(statistics.mean(values), 2), "values": values,
                    "spread": round(max(values) - min(values), 2)}
    return {"method": method, "recipe": RECIPES[method], "pairs": pairs,
            "median_loop_speedup": round(statistics.median(p["loop_speedup"] for p in pairs), 3) if pairs else None,
            "median_process_speedup": (round(statistics.median(p["process_speedup"] for p in pairs), 3)
                                       if pairs else None),
            "quality": quality, "runs": runs}


def write_markdown(results: dict, path: Path, differences: list[str]) -> None:
    lines = ["# hf-ssl vs lightly at equal settings (benchmarks/peers/compare.py)", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}; lightly "
             f"{results.get('lightly_version', '?')}; started {results['started']}.", "",
             *([f"Earlier pairs (`--earlier`): `{results['earlier']['command']}`, {results['earlier']['machine']}, "
                f"started {results['earlier']['started']}.", ""] if "earlier" in results else []),
             "| method (recipe) | pairs | loop img/s ours / lightly (speedup, median) | process s ours / lightly "
             "(speedup, median) | kNN top-1 ours / lightly | linear top-1 ours / lightly |",
             "|---|---|---|---|---|---|"]
    for m in results["methods"]:
        loop = "; ".join(f"{a:.0f} / {b:.0f}" for a, b in (p["loop_images_per_second"] for p in m["pairs"]))
        proc = "; ".join(f"{a:.0f} / {b:.0f}" for a, b in (p["process_seconds"] for p in m["pairs"]))

        def q(metric):
            got = [m["quality"].get(side, {}).get(metric) for side in ("ours", "lightly")]
            return " / ".join("–" if g is None else f"{g['mean']:.2f} % (±{g['spread'] / 2:.2f})" for g in got)

        lines.append(f"| {m['method']} (`{m['recipe']}`) | {len(m['pairs'])} | {loop} (**{m['median_loop_speedup']}x**)"
                     f" | {proc} (**{m['median_process_speedup']}x**) | {q('knn_top1')} | {q('linear_top1')} |")
    lines += ["", "Speedup: ours / lightly images per second of the training loop; lightly / ours wall seconds of the "
              "whole training command. Quality: our `hf-ssl eval knn` (k=20, T=0.07) and `hf-ssl eval linear` of "
              "each run's encoder; mean over the runs (± half the range).", "",
              "## Settings that differ between our recipes and the lightly rebuild", ""]
    lines += [f"- {d}" for d in differences]
    path.write_text("\n".join(lines) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# How the measurement itself treats both sides (added to results.md after lightly_train.KNOWN_DIFFERENCES).
MEASUREMENT_NOTES = [
    "Both sides train without checkpoints and without in-training evaluation: ours runs with --checkpointing_steps "
    "null --do_eval false (the DINO demo recipe checkpoints every 500 steps), lightly's loop has neither.",
    "Ours still computes its logged terms every step (teacher entropy, centre KL, embedding std: the collapse "
    "monitor), writes metrics.jsonl and, after training, its model card and loss plots (in the process time).",
    "Same DataLoader workers on both sides (the recipe's dataloader_num_workers, unless --lightly_num_workers): ours "
    "decodes there and augments in the training process; lightly decodes and augments there.",
    "channels_last follows the recipe on both sides (the DINO demo recipe sets it; lightly_train.py applies it to "
    "the model and the views).",
]


def known_differences(python: str) -> list[str]:
    """lightly_train.KNOWN_DIFFERENCES, read in lightly's venv (the module imports lightly)."""
    out = subprocess.run([python, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                          "from lightly_train import KNOWN_DIFFERENCES; print(json.dumps(KNOWN_DIFFERENCES))",
                          str(HERE)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "settings":
        parser = argparse.ArgumentParser(prog="compare.py settings")
        parser.add_argument("recipe")
        parser.add_argument("--output", required=True)
        parser.add_argument("--name", default=None, help="default: the recipe's file name")
        args, overrides = parser.parse_known_args(sys.argv[2:])
        name = args.name or Path(args.recipe).stem
        print(write_settings(name, args.recipe, overrides, Path(args.output)))
        return 0

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--pairs", type=int, default=2, help="alternating (ours, lightly) pairs per method")
    parser.add_argument("--work_dir", default=str(HERE / "work"))
    parser.add_argument("--output_dir", default=str(HERE), help="where results.json and results.md go")
    parser.add_argument("--lightly_python", default=str(LIGHTLY_PYTHON))
    parser.add_argument("--max_steps", type=int, default=None, help="smoke runs: training steps of every run")
    parser.add_argument("--subset_train", type=int, default=None,
                        help="smoke runs: train (and kNN/linear memory bank) on the first N training images")
    parser.add_argument("--subset_test", type=int, default=None, help="smoke runs: evaluate on the first N test images")
    parser.add_argument("--eval", choices=["all", "none"], default="all", help="kNN + linear of every run, or none")
    parser.add_argument("--linear_epochs", type=int, default=None, help="linear probe epochs (default: ours, 30)")
    parser.add_argument("--eval_workers", type=int, default=2)
    parser.add_argument("--earlier", default=None, metavar="RESULTS_JSON",
                        help="an earlier command's results.json: its pairs count towards --pairs, not trained again")
    parser.add_argument("--lightly_num_workers", type=int, default=None,
                        help="lightly's DataLoader workers (default: the recipe's dataloader_num_workers, as ours); "
                             "its augmentation runs there, per image")
    args = parser.parse_args()

    work_dir, output_dir = Path(args.work_dir).resolve(), Path(args.output_dir)
    if not Path(args.lightly_python).is_file():
        raise SystemExit(f"{args.lightly_python} not found: run bash benchmarks/peers/make_venv.sh first")
    dataset, ours_extra, lightly_extra = "fashion_mnist", [], []
    if args.max_steps:
        ours_extra += ["--max_steps", str(args.max_steps)]
        lightly_extra += ["--max_steps", str(args.max_steps)]
    if args.subset_train or args.subset_test:
        if not (args.subset_train and args.subset_test):
            raise SystemExit("give both --subset_train and --subset_test")
        dataset = make_subset(work_dir, args.subset_train, args.subset_test)
        ours_extra += ["--dataset_name", dataset]
        lightly_extra += ["--max_images", str(args.subset_train)]
    if args.lightly_num_workers is not None:
        lightly_extra += ["--num_workers", str(args.lightly_num_workers)]
    eval_extra = ["--num_workers", str(args.eval_workers)]
    linear_extra = eval_extra + (["--epochs", str(args.linear_epochs)] if args.linear_epochs else [])

    import torch
    results = {"command": " ".join(["python", "benchmarks/peers/compare.py", *sys.argv[1:]]),
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "machine": f"{cpu_name()}, {os.cpu_count()} cores, "
                          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch (ours) "
                          f"{torch.__version__}",
               "dataset": dataset, "max_steps": args.max_steps, "methods": []}
    earlier = {}
    if args.earlier:
        earlier, results["earlier"] = earlier_runs(args.earlier, args.methods, dataset, args.max_steps)
    for method in args.methods:
        recipe_path = RECIPES[method]
        settings = write_settings(method, recipe_path, [], work_dir / "settings" / f"{method}.json")
        base_seed = json.loads(settings.read_text())["recipe"]["seed"]
        runs = list(earlier.get(method, []))
        scores = {r["run_dir"]: {k: r[k] for k in ("knn_top1", "linear_top1")} for r in runs if "linear_top1" in r}
        for i in range(len(runs) // 2, args.pairs):
            seed = base_seed + i
            runs.append(run_ours(recipe_path, work_dir / f"ours-{method}-{i}", seed, ours_extra))
            runs.append(run_lightly(args.lightly_python, settings, work_dir / f"lightly-{method}-{i}", seed,
                                    lightly_extra))
            print(json.dumps(runs[-2:]), flush=True)
        if args.eval == "all":
            for run in (r for r in runs if r["run_dir"] not in scores):
                run_dir = Path(run["run_dir"])
                knn = evaluate(run["encoder"], dataset, "knn", eval_extra, run_dir.with_name(run_dir.name + "-knn.log"))
                linear = evaluate(run["encoder"], dataset, "linear", linear_extra,
                                  run_dir.with_name(run_dir.name + "-linear.log"))
                scores[run["run_dir"]] = {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}
                run.update(scores[run["run_dir"]])
                print(json.dumps({"run": run["run_dir"], **scores[run["run_dir"]]}), flush=True)
        summary = summarize(method, runs, scores)
        results["methods"].append(summary)
        results["lightly_version"] = next((r["lightly_version"] for r in runs if "lightly_version" in r), None)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_markdown(results, output_dir / "results.md", known_differences(args.lightly_python) + MEASUREMENT_NOTES)
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
