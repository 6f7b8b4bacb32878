"""DisCo on Fashion-MNIST: kNN top-1 of a MoCo v2 teacher, of a small student trained with MoCo v2 alone, and of the
same student distilled from that teacher with DisCo, at one epoch budget.

    python benchmarks/disco_fashion_mnist.py [--epochs 1] [--runs runs/disco-benchmark] [--student resnet-tiny]
        [--teacher_epochs E] [--teacher_recipe R | --teacher_run DIR] [--seed S] [--extra --key value ...]

It runs three `hf-ssl train` commands (printed before each run), from the shipped recipes:
  1. teacher:  recipes/disco/fashion-mnist-teacher-resnet-tiny-wide.yaml (MoCo v2, resnet-tiny twice as wide, 32 px;
               --teacher_recipe recipes/disco/fashion-mnist-teacher-resnet-18.yaml for a ResNet-18-shaped one)
  2. student alone: recipes/moco/fashion-mnist-resnet-tiny.yaml     (MoCo v2, --backbone STUDENT)
  3. DisCo:    recipes/disco/fashion-mnist-student-resnet-tiny.yaml (--backbone STUDENT, teacher = run 1)
(--teacher_run DIR: an existing MoCo v2 run is the teacher, run 1 is skipped; --seed S goes to every run it trains),
each followed by the full-split weighted kNN (k=20, T=0.07) that `hf-ssl train` does at the end, and prints a
table of kNN top-1 (%) and wall time. Results are also written to RUNS/results.json. An existing finished run
(its metrics.jsonl has the kNN result) is reused, not retrained. Measured figures: benchmarks/README.md.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def knn_top1(run: Path) -> float | None:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    found = [r["eval/knn_top1"] for r in records if "eval/knn_top1" in r and "eval/knn_bank_size" in r]
    return found[-1] if found else None


def train_seconds(run: Path) -> float | None:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    found = [r["train_runtime_seconds"] for r in records if "train_runtime_seconds" in r]
    return found[-1] if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs of the student runs")
    parser.add_argument("--teacher_epochs", type=float, default=None, help="default: --epochs")
    parser.add_argument("--teacher_recipe", default="recipes/disco/fashion-mnist-teacher-resnet-tiny-wide.yaml")
    parser.add_argument("--teacher_run", default=None, help="a finished MoCo v2 run: the teacher (not retrained)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", default="runs/disco-benchmark")
    parser.add_argument("--student", default="resnet-tiny", help="student backbone preset (e.g. mobilenet-v2)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="overrides for the DisCo run only")
    args = parser.parse_args()
    runs = Path(args.runs)
    teacher_dir = Path(args.teacher_run) if args.teacher_run else runs / "teacher"
    teacher_name = teacher_dir.name if args.teacher_run else \
        Path(args.teacher_recipe).stem.removeprefix("fashion-mnist-teacher-")
    if args.teacher_run and knn_top1(teacher_dir) is None:
        parser.error(f"--teacher_run {teacher_dir}: not a finished hf-ssl run (no kNN result in its metrics.jsonl)")
    plan = [
        (f"teacher (MoCo v2, {teacher_name})", teacher_dir,
         [args.teacher_recipe,
          "--num_train_epochs", str(args.teacher_epochs or args.epochs)]),
        (f"student alone (MoCo v2, {args.student})", runs / "student-moco",
         ["recipes/moco/fashion-mnist-resnet-tiny.yaml", "--backbone", args.student, "--num_train_epochs",
          str(args.epochs)]),
        (f"student with DisCo ({args.student} <- {teacher_name})", runs / "student-disco",
         ["recipes/disco/fashion-mnist-student-resnet-tiny.yaml", "--backbone", args.student, "--num_train_epochs",
          str(args.epochs), "--model.teacher_name_or_path", str(teacher_dir / "pretraining"), *args.extra]),
    ]
    results = []
    for label, run, recipe_args in plan:
        command = [sys.executable, "-m", "hf_ssl", "train", *recipe_args, "--seed", str(args.seed), "--output_dir",
                   str(run)]
        seconds = None
        if knn_top1(run) is None:
            print("$ " + " ".join(["hf-ssl", *command[3:]]), flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True, cwd=REPO)
            seconds = round(time.perf_counter() - start)
        results.append({"run": label, "output_dir": str(run), "knn_top1": knn_top1(run),
                        "train_seconds": train_seconds(run), "wall_seconds": seconds})
        print(json.dumps(results[-1]), flush=True)
    (runs / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n| run | kNN top-1 (%) | training (s) | wall time incl. kNN (s; None: reused run) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['knn_top1']:.2f} | {r['train_seconds']} | {r['wall_seconds']} |")
    gain = results[2]["knn_top1"] - results[1]["knn_top1"]
    print(f"\nDisCo - student alone: {gain:+.2f} points kNN top-1 (target: >= +2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
