"""CPC v2's data-efficiency claim on Fashion-MNIST (issue 18, "Measure and report"): the CPC-pretrained patch encoder
fine-tuned end to end against the same network trained from scratch on the same labels, at 1 %, 10 % and 100 % of
the labels, two seeds; plus kNN and linear probe of the frozen encoder, 1 %-label ablations of the v2 changes that
are cheap to switch, and the two whole-image features side by side.

    python benchmarks/cpc_fewshot_fashion_mnist.py [--runs runs/cpc-benchmark] [--seeds 0 1] [--ablation_seeds 0]
        [--fractions 0.01 0.1 1] [--epochs 60 30 2]

Every step is an `hf-ssl` command of a shipped recipe (printed before it starts), one at a time:
  1. pretraining: recipes/cpc/fashion-mnist-convnext-patch-8.yaml --seed 42 (ends with the full-split kNN), and the
     ablations, same recipe and seed: `--model.directions '[down]'` (1 direction instead of 4) and
     `--augmentation.color_drop_p 1.0` (the paper's colour dropping, off in the recipe);
  2. `hf-ssl eval fewshot --model RUN --fractions F --seed S --epochs E` per fraction F (epochs E: --epochs, one per
     fraction) and seed S: fine-tuned and from scratch (the ablations: fine-tuned only, at the first fraction, seeds
     --ablation_seeds, default the first seed; their from-scratch twin is the main run's: the same architecture,
     init seed and labels);
  3. `hf-ssl eval knn` (when the training's own is missing) and `hf-ssl eval linear` of the main run;
  4. benchmarks/cpc_image_features.py --linear on the full splits: the encoder run on the whole image vs the mean of
     the patch vectors over the grid.
A finished step is reused (a run with an encoder and a training time; a few-shot report saved as
RUNS/fewshot/NAME-seedS-F.json; RUNS/image_features.json), so an interrupted benchmark resumes where it stopped. The
printed few-shot reports are the record here: the encoder's eval_results.json keys a few-shot result by protocol and
dataset, not seed, so it keeps only the last seed run.

Set OMP_NUM_THREADS / MKL_NUM_THREADS for the commands (they inherit the environment); data loading runs in the main
process (--num_workers 0) except in pretraining, which keeps the recipe's one worker.

Writes RUNS/results.json, RUNS/results.md (the tables) and RUNS/accuracy.png (top-1 against the label fraction),
after every step, so that a partial run already shows what is measured. Measured figures: benchmarks/README.md.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from disco_fashion_mnist import train_seconds  # benchmarks/ is on sys.path when a script here runs
from fast_moco_fashion_mnist import results_of

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/cpc/fashion-mnist-convnext-patch-8.yaml"
PATCH_SIZE, PATCH_STRIDE = 8, 4  # the recipe's grid, which cpc_image_features.py needs to cut the patches
PRETRAIN_SEED = 42
RAW_PIXELS_KNN = 85.18  # benchmarks/README.md, DINO demo section: `hf-ssl eval knn --model raw-pixels`
PRETRAININGS = [
    {"name": "cpc", "variant": "", "extra": []},
    {"name": "cpc-down-only", "variant": "1 direction (down) instead of 4", "extra": ["--model.directions", "[down]"]},
    {"name": "cpc-color-drop", "variant": "colour dropping on (p = 1)",
     "extra": ["--augmentation.color_drop_p", "1.0"]},
]


def hf_ssl(args: list[str], log: Path, capture: bool = False) -> str:
    print("$ hf-ssl " + " ".join(args), flush=True)
    with log.open("a") as stderr:
        done = subprocess.run([sys.executable, "-m", "hf_ssl", *args], check=True, cwd=REPO, text=True,
                              stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=stderr)
    return done.stdout if capture else ""


def pretrain(run: dict, runs_dir: Path) -> Path:
    """The run's OUTPUT_DIR, trained unless finished, with a kNN result (the training's own, else `hf-ssl eval knn`:
    a run copied from elsewhere may have stopped during its final kNN)."""
    out = runs_dir / run["name"]
    log = runs_dir / f"{run['name']}.log"
    if not ((out / "encoder" / "model.safetensors").is_file() and train_seconds(out)):
        hf_ssl(["train", RECIPE, "--seed", str(PRETRAIN_SEED), *run["extra"], "--output_dir", str(out)], log)
    if "knn" not in results_of(out):
        hf_ssl(["eval", "knn", "--model", str(out), "--dataset", "fashion_mnist", "--num_workers", "0"], log)
    return out


def fewshot(out: Path, fraction: float, seed: int, epochs: int, scratch: bool, runs_dir: Path) -> dict:
    """{"finetune": top-1, "scratch": top-1 (when run), "seconds": ...} of one `hf-ssl eval fewshot` call."""
    path = runs_dir / "fewshot" / f"{out.name}-seed{seed}-{fraction:g}.json"
    if not path.is_file():
        args = ["eval", "fewshot", "--model", str(out), "--dataset", "fashion_mnist", "--fractions", str(fraction),
                "--seed", str(seed), "--epochs", str(epochs), "--num_workers", "0"]
        stdout = hf_ssl(args + ([] if scratch else ["--no_scratch"]), runs_dir / f"{out.name}.log", capture=True)
        path.parent.mkdir(exist_ok=True)
        path.write_text(stdout.strip().splitlines()[-1] + "\n")
    report = json.loads(path.read_text())
    found = {"epochs": epochs}
    for record in report["records"]:
        if record["metric"] == "top1":
            kind = record["protocol"].split("-")[1]  # fewshot-finetune-1% -> finetune
            found[kind], found[f"{kind}_seconds"] = record["value"], record["seconds"]
            found["num_labels"] = record["params"]["num_labels"]
    return found


def image_features(out: Path, runs_dir: Path) -> dict:
    path = runs_dir / "image_features.json"
    if not path.is_file():
        command = [sys.executable, "benchmarks/cpc_image_features.py", str(out / "encoder"), "--patch_size",
                   str(PATCH_SIZE), "--patch_stride", str(PATCH_STRIDE), "--linear", "--num_workers", "0"]
        print("$ " + " ".join(command[1:]), flush=True)
        with (runs_dir / "image_features.log").open("a") as stderr:
            stdout = subprocess.run(command, check=True, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                    stderr=stderr).stdout
        path.write_text(stdout.strip().splitlines()[-1] + "\n")
    return json.loads(path.read_text())


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def cell(values: list[float]) -> str:
    return f"{mean(values):.2f}" + (" (" + ", ".join(f"{v:.2f}" for v in values) + ")" if len(values) > 1 else "")


def write_tables(results: dict, path: Path) -> str:
    lines = ["| labels | epochs | labels x epochs | seeds | CPC fine-tuned top-1 (%) | from scratch top-1 (%) | "
             "gap (points) |", "|---|---|---|---|---|---|---|"]
    for row in results["fewshot"]:
        done = [s for s in row["seeds"] if "finetune" in s and "scratch" in s]
        if not done:
            continue
        gap = mean([s["finetune"] for s in done]) - mean([s["scratch"] for s in done])
        lines.append(f"| {row['fraction'] * 100:g} % ({done[0]['num_labels']}) | {row['epochs']} | "
                     f"{done[0]['num_labels'] * row['epochs']:,} | {', '.join(str(s['seed']) for s in done)} | "
                     f"{cell([s['finetune'] for s in done])} | {cell([s['scratch'] for s in done])} | {gap:+.2f} |")
    seeds = results["ablation_seeds"]
    lines += ["", "| pretraining (seed 42) | kNN top-1 (%) | linear top-1 (%) | 1 % labels, fine-tuned, seeds "
              f"{', '.join(map(str, seeds))} (%) | vs the recipe (points) |", "|---|---|---|---|---|"]
    reference = results["pretrainings"][0]["finetune_1pct"]  # {seed: top-1}; json keys are strings
    for run in results["pretrainings"]:
        label = run["variant"] or "the recipe: 4 directions, no colour dropping"
        linear = f"{run['linear']:.2f}" if run.get("linear") is not None else "–"
        ft = [run["finetune_1pct"][str(seed)] for seed in seeds if str(seed) in run["finetune_1pct"]]
        shared = [str(seed) for seed in seeds if str(seed) in run["finetune_1pct"] and str(seed) in reference]
        delta = (f"{mean([run['finetune_1pct'][k] for k in shared]) - mean([reference[k] for k in shared]):+.2f}"
                 if shared and run["variant"] else "–")
        lines.append(f"| {label} | {run['knn']:.2f} | {linear} | {cell(ft) if ft else '–'} | {delta} |")
    lines.append(f"| raw pixels (no encoder) | {RAW_PIXELS_KNN:.2f} | – | – | – |")
    if results.get("image_features"):
        feats = results["image_features"]
        lines += ["", "| whole-image feature (frozen) | kNN top-1 (%) | linear top-1 (%) |", "|---|---|---|"]
        for name, label in (("whole_image", "encoder on the whole image (`pooler_output`, AutoModel / pipeline)"),
                            ("patch_mean", "mean of the 7 x 7 patch vectors (`patch_mean_features`)")):
            lines.append(f"| {label} | {feats[name]['knn']['top1']:.2f} | {feats[name]['linear']['top1']:.2f} |")
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for kind, label, colour in (("finetune", "CPC v2, fine-tuned", "tab:red"),
                                ("scratch", "same network from scratch", "tab:blue")):
        points = [(row["fraction"] * 100, [s[kind] for s in row["seeds"] if kind in s]) for row in results["fewshot"]]
        points = [(x, ys) for x, ys in points if ys]
        if not points:
            continue
        axis.plot([x for x, _ in points], [mean(ys) for _, ys in points], "-o", color=colour, label=label + " (mean)")
        axis.scatter([x for x, ys in points for _ in ys], [y for _, ys in points for y in ys], color=colour, s=12,
                     marker="x", label=label + " (each seed)")
    for run, marker in zip(results["pretrainings"][1:], ("^", "v")):
        values = list(run["finetune_1pct"].values())
        axis.scatter([results["fewshot"][0]["fraction"] * 100] * len(values), values, marker=marker,
                     color="tab:orange", label=f"ablation, fine-tuned: {run['variant']}")
    axis.set_xscale("log")
    fractions = [row["fraction"] * 100 for row in results["fewshot"]]
    axis.set_xticks(fractions, [f"{row['fraction'] * 100:g} %\n{row['epochs']} epochs" for row in results["fewshot"]])
    axis.minorticks_off()
    axis.set_xlabel("labelled training images (% of the 60,000)")
    axis.set_ylabel("Fashion-MNIST test top-1 (%)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    axis.set_title("CPC v2 (convnext-patch-8, 0.25 epoch) vs from scratch, 32 px", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/cpc-benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="label subsets and classifier init")
    parser.add_argument("--ablation_seeds", type=int, nargs="+", default=None,
                        help="seeds of the ablations' 1 %% fine-tuning (default: the first of --seeds)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[60, 30, 2],
                        help="fine-tuning epochs, one per fraction (default: the protocol's 60 at 1 %%, 30 at 10 %%; "
                             "2 at 100 %%, a CPU budget: 120,000 images, 2/3 of the 10 %% run's)")
    args = parser.parse_args()
    if len(args.epochs) != len(args.fractions):
        parser.error("--epochs needs one value per fraction")
    runs_dir = Path(args.runs).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    ablation_seeds = args.ablation_seeds or args.seeds[:1]
    results = {"recipe": RECIPE, "pretrain_seed": PRETRAIN_SEED, "ablation_seeds": ablation_seeds,
               "pretrainings": [], "fewshot": [{"fraction": f, "epochs": e, "seeds": []}
                                               for f, e in zip(args.fractions, args.epochs)]}

    def report() -> None:
        (runs_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(write_tables(results, runs_dir / "results.md"), flush=True)
        plot(results, runs_dir / "accuracy.png")

    # In the order of what the issue asks most: the 1 % comparison, the ablations, the frozen evaluations, then the
    # larger (slower) fractions, so that an interrupted benchmark already has the 1 % answer.
    main_run = pretrain(PRETRAININGS[0], runs_dir)
    first = results["fewshot"][0]
    for seed in args.seeds:
        first["seeds"].append({"seed": seed, **fewshot(main_run, first["fraction"], seed, first["epochs"], True,
                                                       runs_dir)})
    results["pretrainings"].append({**PRETRAININGS[0], "knn": results_of(main_run)["knn"],
                                    "finetune_1pct": {str(s["seed"]): s["finetune"] for s in first["seeds"]},
                                    "train_seconds": train_seconds(main_run)})
    report()
    for run in PRETRAININGS[1:]:
        out = pretrain(run, runs_dir)
        ft = {str(seed): fewshot(out, first["fraction"], seed, first["epochs"], False, runs_dir)["finetune"]
              for seed in ablation_seeds}
        results["pretrainings"].append({**run, "knn": results_of(out)["knn"], "finetune_1pct": ft,
                                        "train_seconds": train_seconds(out)})
        report()
    if "linear" not in results_of(main_run):
        hf_ssl(["eval", "linear", "--model", str(main_run), "--dataset", "fashion_mnist", "--num_workers", "0"],
               runs_dir / "cpc.log")
    results["pretrainings"][0]["linear"] = results_of(main_run)["linear"]
    results["image_features"] = image_features(main_run, runs_dir)
    report()
    for row in results["fewshot"][1:]:
        for seed in args.seeds:
            row["seeds"].append({"seed": seed, **fewshot(main_run, row["fraction"], seed, row["epochs"], True,
                                                         runs_dir)})
            report()
    one = [s["finetune"] - s["scratch"] for s in first["seeds"]]
    ahead = all(mean([s["finetune"] for s in r["seeds"]]) > mean([s["scratch"] for s in r["seeds"]])
                for r in results["fewshot"])
    print(f"1 % labels: CPC - scratch = {mean(one):+.2f} points (target >= +10); CPC ahead at every fraction: {ahead}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
