"""Fast-MoCo at E epochs against MoCo v3 at E, 2E and 4E epochs on Fashion-MNIST (resnet-tiny, 32 px), two seeds,
plus two Fast-MoCo ablations (target from the same view; n=3 crops per combination), one seed.

    python benchmarks/fast_moco_fashion_mnist.py [--epochs 1] [--seeds 42 43] [--jobs 2] [--runs runs/fast-moco-benchmark]

Every run is an `hf-ssl train` of a shipped recipe (printed before it starts), which ends with the full-split
weighted kNN (k=20, T=0.07), followed by `hf-ssl eval linear` on the cached features:
  MoCo v3:   recipes/moco/fashion-mnist-v3-fast-moco-baseline.yaml --num_train_epochs {E,2E,4E} --seed S
  Fast-MoCo: recipes/fast_moco/fashion-mnist-resnet-tiny.yaml --num_train_epochs E --seed S
--jobs N runs N trainings at a time, each with OMP_NUM_THREADS=1 (on 2 cores, two single-thread runs finish
sooner than one after the other with two threads each). A finished run (its encoder has both results) is reused.

The cost of one epoch of each method is measured first (and counted: GFLOP per image of a training step, backbones'
share apart), on an otherwise idle machine, as training images/s of
`benchmarks/throughput.py` (data preloaded), alternating MoCo v3 / Fast-MoCo --cost_pairs times, and reported as a
ratio. The wall-clock axis of the figure is epochs x that measured seconds per epoch (the runs themselves share the
cores, so their own run times are in the table only as measured under --jobs).

Writes RUNS/results.json, RUNS/results.md (the table) and RUNS/accuracy.png (top-1 against epochs and against
wall-clock time). Measured figures: benchmarks/README.md.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from disco_fashion_mnist import train_seconds  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parent.parent
MOCO_V3 = "recipes/moco/fashion-mnist-v3-fast-moco-baseline.yaml"
FAST_MOCO = "recipes/fast_moco/fashion-mnist-resnet-tiny.yaml"
TRAIN_IMAGES = 60_000


def plan_runs(epochs: float, seeds: list[int]) -> list[dict]:
    runs = []
    for seed in seeds:
        for factor in (1, 2, 4):
            runs.append({"name": f"moco-v3-{factor}e-seed{seed}", "method": "MoCo v3", "variant": "",
                         "recipe": MOCO_V3, "epochs": factor * epochs, "seed": seed, "extra": []})
        runs.append({"name": f"fast-moco-1e-seed{seed}", "method": "Fast-MoCo", "variant": "",
                     "recipe": FAST_MOCO, "epochs": epochs, "seed": seed, "extra": []})
    ablations = [("same-view", "target from the same view", ["--model.target_view", "same"]),
                 ("n3", "n=3 (4 combinations per view)", ["--model.num_combined", "3"])]
    for tag, variant, extra in ablations:
        runs.append({"name": f"fast-moco-{tag}-1e-seed{seeds[0]}", "method": "Fast-MoCo", "variant": variant,
                     "recipe": FAST_MOCO, "epochs": epochs, "seed": seeds[0], "extra": extra})
    # longest first, so that --jobs finishes together
    return sorted(runs, key=lambda r: -r["epochs"] * (2.2 if r["method"] == "Fast-MoCo" else 1.0))


def results_of(run_dir: Path) -> dict[str, float]:
    path = run_dir / "encoder" / "eval_results.json"
    found = {}
    if path.is_file():
        for entry in json.loads(path.read_text()):
            if entry["metric"] == "top1":
                found[entry["protocol"]] = entry["value"]
    return found


def run_one(run: dict, runs_dir: Path, env: dict) -> dict:
    out = runs_dir / run["name"]
    found = results_of(out)
    if "knn" not in found:
        command = ["hf-ssl", "train", run["recipe"], "--num_train_epochs", str(run["epochs"]), "--seed",
                   str(run["seed"]), *run["extra"], "--output_dir", str(out)]
        print("$ " + " ".join(command), flush=True)
        subprocess.run([sys.executable, "-m", "hf_ssl", *command[1:]], check=True, cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=(out.parent / f"{run['name']}.log").open("w"))
    if "linear" not in results_of(out):
        subprocess.run([sys.executable, "-m", "hf_ssl", "eval", "linear", "--model", str(out), "--dataset",
                        "fashion_mnist"], check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    found = results_of(out)
    result = {**run, "knn_top1": found["knn"], "linear_top1": found["linear"], "train_seconds": train_seconds(out)}
    print(json.dumps({k: result[k] for k in ("name", "knn_top1", "linear_top1", "train_seconds")}), flush=True)
    return result


def epoch_cost(pairs: int, steps: int) -> dict:
    """Training images/s of each recipe, measured alternately (MoCo v3, Fast-MoCo, ...) so drifts hit both."""
    rates = {MOCO_V3: [], FAST_MOCO: []}
    for _ in range(pairs):
        for recipe in rates:
            out = subprocess.run([sys.executable, "benchmarks/throughput.py", recipe, "--steps", str(steps)],
                                 check=True, cwd=REPO, capture_output=True, text=True).stdout
            rates[recipe].append(json.loads(out.strip().splitlines()[-1])["train_images_per_second"])
    moco, fast = (sum(r) / len(r) for r in rates.values())
    return {"moco_v3_images_per_second": rates[MOCO_V3], "fast_moco_images_per_second": rates[FAST_MOCO],
            "moco_v3_seconds_per_epoch": TRAIN_IMAGES / moco, "fast_moco_seconds_per_epoch": TRAIN_IMAGES / fast,
            "fast_moco_epoch_cost_ratio": moco / fast}


def flops_per_image(recipe_path: str, batch: int = 16) -> dict:
    """GFLOP per image of one training forward + backward (torch's FlopCounterMode), and the backbones' share
    (online forward + backward on what the method feeds it, momentum encoder forward on the two full views)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hf_ssl.recipe import load_recipe
    from hf_ssl.train import build_model
    from modeling.backbones import pooled_features

    recipe = load_recipe(recipe_path, ["--output_dir", "/tmp/hf_ssl_flops"])
    model, size = build_model(recipe).train(), recipe.image_size
    views = {"view_1": torch.randn(batch, 3, size, size), "view_2": torch.randn(batch, 3, size, size)}
    online = [views["view_1"], views["view_2"]]
    if recipe.method == "fast_moco":
        m = model.config.grid_size
        crops = {f"crops_{i}": torch.randn(batch * m * m, 3, size // m, size // m) for i in (1, 2)}
        views, online = {**views, **crops}, list(crops.values())
    with FlopCounterMode(display=False) as total:
        model(**views).loss.backward()
    with FlopCounterMode(display=False) as backbones:
        sum(pooled_features(model.query_backbone, x).sum() for x in online).backward()
        with torch.no_grad():
            for x in (views["view_1"], views["view_2"]):
                pooled_features(model.key_backbone, x)
    return {"total": total.get_total_flops() / batch / 1e9, "backbones": backbones.get_total_flops() / batch / 1e9}


def mean_cell(rows: list[dict], key: str, digits: int = 2) -> str:
    """A table cell: the mean of `key` over `rows`, then each row's value in brackets when there are several."""
    values = [r[key] for r in rows]
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f}" + (" (" + ", ".join(f"{v:.{digits}f}" for v in values) + ")" if len(values) > 1 else "")


def write_table(results: list[dict], cost: dict, epochs: float, path: Path) -> str:
    lines = ["| method | epochs | seeds | kNN top-1 (%) | linear top-1 (%) | est. time on 2 idle cores (min) | "
             "measured run time, --jobs (min) |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["variant"], r["epochs"]), []).append(r)
    for (method, variant, ep), rs in sorted(groups.items(), key=lambda g: (g[0][1] != "", g[0][0], g[0][2])):
        seconds = cost["fast_moco_seconds_per_epoch" if method == "Fast-MoCo" else "moco_v3_seconds_per_epoch"]
        label = method + (f", {variant}" if variant else "")
        lines.append(f"| {label} | {ep:g} | {', '.join(str(r['seed']) for r in rs)} | {mean_cell(rs, 'knn_top1')} | "
                     f"{mean_cell(rs, 'linear_top1')} | {ep * seconds / 60:.1f} | "
                     f"{sum(r['train_seconds'] for r in rs) / len(rs) / 60:.1f} |")
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def plot(results: list[dict], cost: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    styles = {"MoCo v3": ("tab:blue", "o"), "Fast-MoCo": ("tab:red", "s")}
    for method, (colour, marker) in styles.items():
        rs = [r for r in results if r["method"] == method and not r["variant"]]
        seconds = cost["fast_moco_seconds_per_epoch" if method == "Fast-MoCo" else "moco_v3_seconds_per_epoch"]
        for metric, line in (("knn_top1", "-"), ("linear_top1", "--")):
            epochs = sorted({r["epochs"] for r in rs})
            means = [sum(r[metric] for r in rs if r["epochs"] == e) / len([r for r in rs if r["epochs"] == e])
                     for e in epochs]
            name = f"{method} {'kNN' if metric == 'knn_top1' else 'linear'}"
            for axis, xs in ((axes[0], epochs), (axes[1], [e * seconds / 60 for e in epochs])):
                axis.plot(xs, means, line, color=colour, marker=marker, label=name)
                axis.scatter([x for x, e in zip(xs, epochs) for r in rs if r["epochs"] == e],
                             [r[metric] for e in epochs for r in rs if r["epochs"] == e], color=colour, s=8)
    for axis in axes:
        axis.axhline(85.18, color="grey", linestyle=":", label="raw pixels kNN (85.18 %)")
        axis.grid(alpha=0.3)
    axes[0].set_xlabel("epochs")
    axes[1].set_xlabel("estimated minutes on 2 idle cores (epochs x measured s/epoch)")
    axes[0].set_ylabel("Fashion-MNIST top-1 (%)")
    axes[0].legend(fontsize=8)
    figure.suptitle("Fast-MoCo vs MoCo v3, resnet-tiny, 32 px (mean of seeds; dots: each seed)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0, help="E: Fast-MoCo's epochs; MoCo v3 runs E, 2E, 4E")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", default="runs/fast-moco-benchmark")
    parser.add_argument("--cost_pairs", type=int, default=3)
    parser.add_argument("--cost_steps", type=int, default=20)
    args = parser.parse_args()
    runs_dir = Path(args.runs).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    cost_path = runs_dir / "epoch_cost.json"
    if not cost_path.is_file():
        cost_path.write_text(json.dumps(epoch_cost(args.cost_pairs, args.cost_steps), indent=2) + "\n")
    cost = json.loads(cost_path.read_text())
    if "gflop_per_image" not in cost:
        cost["gflop_per_image"] = {"moco_v3": flops_per_image(MOCO_V3), "fast_moco": flops_per_image(FAST_MOCO)}
        cost_path.write_text(json.dumps(cost, indent=2) + "\n")
    print(json.dumps(cost), flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda run: run_one(run, runs_dir, env), plan_runs(args.epochs, args.seeds)))
    (runs_dir / "results.json").write_text(json.dumps({"epoch_cost": cost, "runs": results}, indent=2) + "\n")
    print(write_table(results, cost, args.epochs, runs_dir / "results.md"))
    plot(results, cost, runs_dir / "accuracy.png")
    fast = [r["knn_top1"] for r in results if r["method"] == "Fast-MoCo" and not r["variant"]]
    moco_4e = [r["knn_top1"] for r in results if r["method"] == "MoCo v3" and r["epochs"] == 4 * args.epochs]
    gap = sum(fast) / len(fast) - sum(moco_4e) / len(moco_4e)
    print(f"Fast-MoCo at E - MoCo v3 at 4E: {gap:+.2f} points kNN top-1 (target: >= 0); "
          f"epoch cost ratio Fast-MoCo / MoCo v3: {cost['fast_moco_epoch_cost_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
