"""Training curves from `metrics.jsonl` as PNGs under `OUTPUT_DIR/plots/` (matplotlib, no display)."""
import json
from pathlib import Path


def plot_training_curves(output_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    plots_dir = output_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    written = []
    for key in ("loss", "lr", "embedding_std", "teacher_entropy"):
        points = [(r["step"], r[key]) for r in train if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(*zip(*points))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = plots_dir / f"{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
