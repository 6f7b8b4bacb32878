"""Loss curves of the shipped Fashion-MNIST recipes over their first steps, to show that a refactor leaves training
unchanged: run it on the code before and after, then compare the two files.

    python benchmarks/recipe_loss_curves.py --steps 30 --output before.json            # in a checkout of the old code
    python benchmarks/recipe_loss_curves.py --steps 30 --output after.json
    python benchmarks/recipe_loss_curves.py --compare before.json after.json

Each recipe trains for `--steps` optimizer steps (the schedules then span those steps), no evaluation, a loss logged
at every step, in a fresh output directory under --work_dir. DisCo's student distils the teacher trained just before.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPES = {
    "dino-demo": "recipes/dino/fashion-mnist-demo.yaml",
    "dino-resnet-tiny": "recipes/dino/fashion-mnist-resnet-tiny.yaml",
    "moco-v2": "recipes/moco/fashion-mnist-resnet-tiny.yaml",
    "moco-v3": "recipes/moco/fashion-mnist-v3-resnet-tiny.yaml",
    "disco-teacher": "recipes/disco/fashion-mnist-teacher-resnet-tiny-wide.yaml",
    "disco-student": "recipes/disco/fashion-mnist-student-resnet-tiny.yaml",
}


def run(name: str, recipe: str, steps: int, work_dir: Path, extra: list[str]) -> dict[int, float]:
    out = work_dir / name
    args = [sys.executable, "-m", "hf_ssl", "train", recipe, "--output_dir", str(out), "--max_steps", str(steps),
            "--do_eval", "false", "--logging_steps", "1", "--checkpointing_steps", "null", *extra]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output")
    parser.add_argument("--work_dir")
    parser.add_argument("--only", nargs="*", default=list(RECIPES))
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        for name in before:
            a, b = before[name], after.get(name, {})
            worst = max((abs(a[s] - b[s]) for s in a if s in b), default=float("nan"))
            print(f"{name:18s} steps {len(a):3d} vs {len(b):3d}  identical: {a == b}  worst |diff|: {worst:.3g}")
        return
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="loss_curves_"))
    curves = {}
    for name in args.only:
        extra = []
        if name == "disco-student":
            extra = ["--model.teacher_name_or_path", str(work_dir / "disco-teacher" / "pretraining")]
        curves[name] = run(name, RECIPES[name], args.steps, work_dir, extra)
        print(name, curves[name][args.steps], flush=True)
    Path(args.output).write_text(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
