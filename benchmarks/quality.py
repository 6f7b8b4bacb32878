"""Every method's Fashion-MNIST recipe at its shipped budget, side by side: training minutes, kNN and linear top-1,
against the raw-pixel and random-init baselines, as a Markdown table and a bar chart (the README shows both).

    python benchmarks/quality.py [--runs runs/quality] [--seed 42] [--only dino moco-v3 ...]

Each row is an `hf-ssl train RECIPE --seed S --output_dir RUNS/NAME` of a shipped recipe, unchanged (printed before
it starts), then `hf-ssl eval linear` on the features its final kNN cached (`run_one` of fast_moco_fashion_mnist.py;
a finished run is reused). One row per method, its best Fashion-MNIST recipe; DisCo's student is distilled from
the MoCo v2 row's encoder (trained first; `model.teacher_name_or_path` points at it). Baselines: `hf-ssl eval
knn|linear --model raw-pixels` and a random-init resnet-tiny (benchmarks/random_encoder.py). Run it on an otherwise
idle machine: the minutes column is each run's own `train_runtime_seconds` (the training loop, without the final
evaluation), on whatever cores the run had.

Writes RUNS/results.json, RUNS/results.md and RUNS/quality.png.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from fast_moco_fashion_mnist import REPO, results_of, run_one  # benchmarks/ is on sys.path when a script here runs

RAW_PIXELS = "raw-pixels"
# (name, label, recipe, extra arguments); "{runs}" is replaced by the runs directory
ROWS = [
    ("dino", "DINO (make demo)", "recipes/dino/fashion-mnist-demo.yaml", []),
    ("moco-v2", "MoCo v2", "recipes/moco/fashion-mnist-v2-demo-backbone.yaml", []),
    ("moco-v3", "MoCo v3", "recipes/moco/fashion-mnist-v3-demo-backbone.yaml", []),
    ("fast-moco", "Fast-MoCo", "recipes/fast_moco/fashion-mnist-demo-backbone.yaml", []),
    ("relic", "RELICv2 (no saliency masking)", "recipes/relic/fashion-mnist-demo-backbone.yaml", []),
    ("cpc", "CPC v2 (whole-image feature)", "recipes/cpc/fashion-mnist-convnext-patch-8.yaml", []),
    ("disco", "DisCo student, resnet-tiny (teacher: the MoCo v2 row)",
     "recipes/disco/fashion-mnist-student-resnet-tiny.yaml",
     ["--model.teacher_name_or_path", "{runs}/moco-v2/pretraining"]),
]


def recipe_summary(recipe: str) -> dict:
    """Backbone and epochs of a shipped recipe, for the table (every Fashion-MNIST recipe counts epochs)."""
    from hf_ssl.recipe import load_recipe

    r = load_recipe(REPO / recipe, ["--output_dir", "/tmp/hf_ssl_quality"])
    config = r.backbone_config or {}
    backbone = r.backbone or f"{config.get('model_type', '?')} {config.get('hidden_sizes', '')} (recipe's config)"
    return {"backbone": backbone, "epochs": r.num_train_epochs}


def baseline(name: str, runs_dir: Path, env: dict) -> dict:
    """kNN and linear top-1 of raw pixels or of a random-init resnet-tiny (its encoder saved under RUNS)."""
    model = RAW_PIXELS
    if name == "random-init":
        model = str(runs_dir / "random-init-resnet-tiny")
        if not (Path(model) / "config.json").is_file():
            subprocess.run([sys.executable, "benchmarks/random_encoder.py", model], check=True, cwd=REPO, env=env)
    cached = runs_dir / f"{name}.json"
    if not cached.is_file():
        scores = {}
        for protocol in ("knn", "linear"):
            out = subprocess.run([sys.executable, "-m", "hf_ssl", "eval", protocol, "--model", model, "--dataset",
                                  "fashion_mnist"], check=True, cwd=REPO, env=env, capture_output=True, text=True)
            report = json.loads(out.stdout[out.stdout.index("{"):])
            scores[f"{protocol}_top1"] = report["scores"][f"{protocol}/top1"]
        cached.write_text(json.dumps(scores) + "\n")
    return json.loads(cached.read_text())


def machine_speed(env: dict) -> float:
    """Images/s of a one-view supervised step of the demo backbone (throughput.py's baseline): the minutes column
    depends on the machine, and these machines' speed varies, so the table says how fast this one was."""
    out = subprocess.run([sys.executable, "benchmarks/throughput.py", ROWS[0][2], "--steps", "20"], check=True,
                         cwd=REPO, env=env, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["baseline_images_per_second"]


def write_table(rows: list[dict], baselines: dict, speeds: list[float], path: Path) -> str:
    lines = ["| method | backbone | epochs | training (min) | kNN top-1 (%) | linear top-1 (%) | kNN vs raw pixels |",
             "|---|---|---|---|---|---|---|"]
    raw = baselines[RAW_PIXELS]["knn_top1"]
    for r in rows:
        minutes = f"{r['train_seconds'] / 60:.1f}" if r["train_seconds"] else "?"
        minutes += "*" if r["reused"] else ""
        lines.append(f"| {r['label']} | {r['backbone']} | {r['epochs']:g} | {minutes} | {r['knn_top1']:.2f} | "
                     f"{r['linear_top1']:.2f} | {r['knn_top1'] - raw:+.2f} |")
    for name, b in baselines.items():
        lines.append(f"| baseline: {name} | {'resnet-tiny' if name == 'random-init' else '—'} | — | — | "
                     f"{b['knn_top1']:.2f} | {b['linear_top1']:.2f} | {b['knn_top1'] - raw:+.2f} |")
    trained = sum(not r["reused"] for r in rows)
    lines.append(f"\nMachine speed (a one-view supervised step of the demo backbone, `benchmarks/throughput.py`): "
                 f"{speeds[0]:.0f} img/s before this command trained {trained} of the {len(rows)} runs, "
                 f"{speeds[1]:.0f} img/s after.")
    if trained < len(rows):
        lines.append("\n\\* reused: trained by an earlier command, its minutes measured then, at that time's "
                     "machine speed.")
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def plot(rows: list[dict], baselines: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(10, 4.5))
    xs = range(len(rows))
    axis.bar([x - 0.2 for x in xs], [r["knn_top1"] for r in rows], width=0.4, label="kNN", color="tab:blue")
    axis.bar([x + 0.2 for x in xs], [r["linear_top1"] for r in rows], width=0.4, label="linear", color="tab:orange")
    for (name, b), style in zip(baselines.items(), (":", "--")):
        axis.axhline(b["knn_top1"], color="grey", linestyle=style, label=f"{name} kNN ({b['knn_top1']:.2f} %)")
    axis.set_xticks(list(xs), [f"{r['name']}\n{r['train_seconds'] / 60:.0f} min" if r["train_seconds"] else r["name"]
                               for r in rows], fontsize=8)
    values = [v for r in rows for v in (r["knn_top1"], r["linear_top1"])] + [b["knn_top1"] for b in baselines.values()]
    axis.set_ylim(min(values) - 2, max(values) + 1)
    axis.set_ylabel("Fashion-MNIST top-1 (%)")
    axis.set_title("Each method's shipped Fashion-MNIST recipe (32 px; training minutes under each label)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/quality")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", nargs="+", choices=[name for name, *_ in ROWS], default=None,
                        help="these rows only (DisCo's student also needs moco-v2)")
    args = parser.parse_args()
    runs_dir = Path(args.runs).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    speeds = [machine_speed(env)]
    rows = []
    for name, label, recipe, extra in ROWS:
        if args.only and name not in args.only:
            continue
        run = {"name": name, "recipe": recipe, "epochs": recipe_summary(recipe)["epochs"], "seed": args.seed,
               "extra": [e.format(runs=runs_dir) for e in extra]}
        reused = "knn" in results_of(runs_dir / name)
        rows.append({**run_one(run, runs_dir, env), "label": label, "reused": reused, **recipe_summary(recipe)})
    baselines = {name: baseline(name, runs_dir, env) for name in (RAW_PIXELS, "random-init")}
    speeds.append(machine_speed(env))
    (runs_dir / "results.json").write_text(json.dumps({"rows": rows, "baselines": baselines,
                                                       "machine_images_per_second": speeds}, indent=2) + "\n")
    print(write_table(rows, baselines, speeds, runs_dir / "results.md"))
    plot(rows, baselines, runs_dir / "quality.png")
    print(f"wrote {runs_dir}/results.json, results.md, quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
