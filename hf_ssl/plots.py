"""Plots of a training run as PNGs under ``OUTPUT_DIR/plots/`` (matplotlib, Agg backend, no display).

    hf-ssl plot OUTPUT_DIR        # redraw everything

* training curves from ``metrics.jsonl``: loss, lr, kNN top-1 over steps (online kNN on subsets and the
  end-of-training kNN on the full splits), collapse monitors (embedding_std, teacher_entropy) when logged;
* an embedding map: t-SNE of the encoder's features of the eval split, coloured by label.

The t-SNE is implemented here (exact t-SNE, van der Maaten & Hinton 2008, in torch; O(N²) per iteration, so
the map subsamples ``max_points`` points) rather than taken from scikit-learn or umap-learn: it is ~60 lines,
a 1 000-point map takes seconds on a CPU, and it spares the package a large dependency used for one figure.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class MissingDependencyError(RuntimeError):
    """A plotting library is not installed; the message says what to install."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("plots need matplotlib: pip install matplotlib (it is in hf-ssl's "
                                     "install_requires; reinstall hf-ssl)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(output_dir: str | Path) -> list[Path]:
    """loss / lr / kNN / collapse-monitor curves from ``metrics.jsonl``; returns the PNGs written."""
    plt = _pyplot()
    output_dir = Path(output_dir)
    records = _read_metrics(output_dir)
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
    knn = [r for r in records if "eval/knn_top1" in r]
    if knn:
        # One series per (memory bank, queries) size: online kNN on subsets vs the full splits at the end.
        series: dict[tuple, list] = {}
        for r in knn:
            series.setdefault((r.get("eval/knn_bank_size"), r.get("eval/knn_query_size")), []).append(
                (r["step"], r["eval/knn_top1"]))
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for (bank, queries), points in series.items():
            label = f"bank {bank}, queries {queries}" if bank is not None else "kNN"
            ax.plot(*zip(*sorted(points)), marker="o", markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = plots_dir / "knn_top1.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------- t-SNE


def _affinities(features: torch.Tensor, perplexity: float, tol: float = 1e-5, steps: int = 100) -> torch.Tensor:
    """Symmetric joint probabilities P of t-SNE: a per-point Gaussian bandwidth found by bisection so that each
    conditional distribution has the given perplexity."""
    n = features.shape[0]
    d = torch.cdist(features, features).pow(2)
    d.fill_diagonal_(float("inf"))
    d = d - d.min(dim=1, keepdim=True).values  # shift per row: P_j|i is unchanged, exp() does not underflow
    target = math.log(perplexity)
    beta = torch.ones(n, 1, dtype=d.dtype)
    lo = torch.zeros(n, 1, dtype=d.dtype)
    hi = torch.full((n, 1), float("inf"), dtype=d.dtype)
    for _ in range(steps):
        p = torch.exp(-d * beta)
        sum_p = p.sum(1, keepdim=True)
        entropy = torch.log(sum_p) + beta * (torch.nan_to_num(d * p, nan=0.0)).sum(1, keepdim=True) / sum_p
        diff = entropy - target
        if diff.abs().max() < tol:
            break
        too_flat = diff > 0  # entropy too high: narrower kernel, larger beta
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    p = torch.exp(-d * beta)
    p = p / p.sum(1, keepdim=True)
    p = (p + p.T) / (2 * n)
    return p.clamp_min(1e-12)


def tsne(features: torch.Tensor, perplexity: float = 30.0, iterations: int = 1000, seed: int = 0,
         early_exaggeration: float = 12.0, exaggeration_iterations: int = 250) -> torch.Tensor:
    """Exact t-SNE of ``features`` ``[N, D]`` to ``[N, 2]`` (PCA to 50 dims first, perplexity capped at
    (N-1)/3, learning rate max(N / 12 / 4, 50), momentum 0.5 then 0.8, gains as in the reference code)."""
    x = features.double()  # affinities in float64 (bandwidth bisection), the optimisation in float32
    n = x.shape[0]
    if n < 3:
        return torch.zeros(n, 2)
    x = x - x.mean(0)
    if x.shape[1] > 50:
        _, _, v = torch.pca_lowrank(x, q=50, center=False)
        x = x @ v
    p = _affinities(x, min(perplexity, (n - 1) / 3)).float()
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 2, generator=generator) * 1e-4
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    lr = max(n / early_exaggeration / 4, 50.0)
    for it in range(iterations):
        exaggeration = early_exaggeration if it < exaggeration_iterations else 1.0
        momentum = 0.5 if it < exaggeration_iterations else 0.8
        sq = (y * y).sum(1)
        num = torch.addmm(sq[:, None] + sq[None, :], y, y.T, alpha=-2).clamp_min_(0).add_(1).reciprocal_()
        num.fill_diagonal_(0.0)  # Student-t kernel 1 / (1 + |y_i - y_j|^2)
        q = (num / num.sum()).clamp_min_(1e-12)
        w = q.neg_().add_(p, alpha=exaggeration).mul_(num)
        grad = 4.0 * (w.sum(1, keepdim=True) * y - w @ y)
        same_sign = (grad > 0) == (update > 0)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min(0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)
    return y.float()


def plot_embedding_map(features: torch.Tensor, labels: torch.Tensor, path: str | Path,
                       label_names: list[str] | None = None, max_points: int = 1000, seed: int = 0,
                       title: str | None = None) -> Path:
    """t-SNE scatter of (at most ``max_points``, seeded random) features, coloured by label."""
    plt = _pyplot()
    path = Path(path)
    if len(labels) > max_points:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_points]
        features, labels = features[keep], labels[keep]
    points = tsne(torch.nn.functional.normalize(features.float(), dim=1), seed=seed)
    fig, ax = plt.subplots(figsize=(6, 5))
    classes = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        mask = labels == c
        name = label_names[c] if label_names and c < len(label_names) else str(c)
        ax.scatter(points[mask, 0], points[mask, 1], s=4, color=cmap(i % cmap.N), label=name)
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(labels)} features")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(output_dir: str | Path, embedding_map: bool = True, max_points: int = 1000,
             extract: bool = True) -> list[Path]:
    """Redraw every plot of a training run. The embedding map uses the eval-split features of ``encoder/``
    (from the feature cache; extracted and cached when missing unless ``extract=False``)."""
    output_dir = Path(output_dir)
    if not (output_dir / "metrics.jsonl").is_file():
        from .evaluation import EvaluationError

        raise EvaluationError(f"{output_dir} is not a training OUTPUT_DIR (no metrics.jsonl)")
    written = plot_training_curves(output_dir)
    if embedding_map:
        path = _embedding_map_of_run(output_dir, max_points, extract)
        if path is not None:
            written.append(path)
    return written


def _embedding_map_of_run(output_dir: Path, max_points: int, extract: bool) -> Path | None:
    import yaml

    from .evaluation import load_encoder, split_features

    config = yaml.safe_load((output_dir / "config.yaml").read_text()) if (output_dir / "config.yaml").is_file() else {}
    split = config.get("eval_split")
    if not split or not (output_dir / "encoder" / "config.json").is_file():
        return None
    encoder = load_encoder(output_dir / "encoder")
    feats = split_features(encoder, config["dataset_name"], split, dataset_config=config.get("dataset_config"),
                           image_column=config.get("image_column"), label_column=config.get("label_column"),
                           batch_size=config.get("eval_batch_size", 256), extract=extract)
    if feats is None:
        return None
    return plot_embedding_map(feats.features, feats.labels, output_dir / "plots" / "embedding_tsne.png",
                              feats.label_names, max_points,
                              title=f"t-SNE of encoder features, {config['dataset_name']} {split}")
