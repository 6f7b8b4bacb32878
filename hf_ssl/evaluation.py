"""Evaluation of an encoder on a labelled 🤗 dataset (METHODS.md, "Evaluation protocol").

    hf-ssl eval knn|linear|fewshot --model PATH_OR_REPO --dataset NAME [--train_split train --test_split test]

Protocols
  * ``knn`` (:func:`knn_evaluate`): DINO's weighted kNN. Frozen features are L2-normalised; each test sample's
    k nearest training samples (cosine similarity s) vote for their class with weight exp(s / T); default k=20,
    T=0.07. Top-1 and top-5 of the summed votes.
  * ``linear`` (:func:`linear_probe_evaluate`): one linear layer on frozen, standardised features (mean/std of
    the training features), trained with AdamW + cosine schedule; the learning rate and weight decay are chosen
    on a held-out part of the training split (seeded), then the layer is re-trained on the whole split.
  * ``fewshot`` (:func:`fewshot_evaluate`): class-balanced 1 % and 10 % label subsets (seeded, see
    :func:`class_balanced_subset`); the encoder + a linear head are fine-tuned on them, and the same architecture
    from a random init (the encoder's config) is trained on the same labels with the same recipe, for comparison.

Features are extracted once per split, in batches, with a progress bar, and cached as safetensors under
``<run>/features/`` (for a training run's ``encoder/``) or ``<model_dir>/features/``; the file name carries a key
over the sha256 of the weights, the preprocessing and the dataset's fingerprint, so a changed encoder or dataset
never reuses stale features. ``--model raw-pixels`` is an identity "encoder": the normalised pixels, flattened.

Metrics go through 🤗 evaluate with the scripts in ``hf_ssl/metrics/``, loaded by path (offline-safe).
Results are added to ``<model_dir>/eval_results.json`` (:func:`record_eval_results`), which the model card's
``model-index`` reads: one record per protocol (``knn``, ``linear``, ``fewshot-finetune-1%``, ...) and metric
(``top1``, ``top5``). The schema of a record, and the key that says when a new record replaces an old one (protocol,
metric, dataset, dataset_config, train_split, test_split), are defined once, in :mod:`hf_ssl.eval_results`.

top-5 is reported only with more than 5 classes (it is 100 % otherwise). ``seconds`` is the wall time of the
protocol, feature extraction (or the cache read) included; the printed report also gives ``feature_seconds``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import datasets
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from modeling.backbones import backbone_family, build_backbone, feature_dim, pooled_features

from .data import ImageDecoder, build_dataloader, label_column_of, load_image_dataset
from .eval_results import (FILENAME, RECORD_KEYS, EvalRecordError, fewshot_protocol, fraction_name,  # noqa: F401
                           make_records, merge_records, read_records, validate_record, write_records)

logger = logging.getLogger(__name__)

RAW_PIXELS = "raw-pixels"
METRICS_DIR = Path(__file__).resolve().parent / "metrics"
FEATURE_CACHE_VERSION = 1
DEFAULT_RAW_PIXELS_SIZE = 32

# The linear probe's (AdamW) sweep, scored on a held-out part of train. On Fashion-MNIST the best lr was 1e-3
# for raw pixels and 1e-1 for a random-init resnet-tiny: the grid spans both.
LINEAR_LEARNING_RATES = (1e-3, 1e-2, 1e-1)
LINEAR_WEIGHT_DECAYS = (0.0, 0.1)

# Fine-tuning epochs per label fraction when not given: SimCLR's semi-supervised protocol (60 epochs on 1 % of
# the labels, 30 on 10 %).
FEWSHOT_EPOCHS = {0.01: 60, 0.1: 30}


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message says why."""


# ------------------------------------------------------------------------------------------------ metrics


@functools.cache
def load_metric(name: str):
    """A metric script of ``hf_ssl/metrics/`` (``accuracy``, ``top_k_accuracy``), loaded by path: no Hub."""
    import evaluate

    path = METRICS_DIR / f"{name}.py"
    if not path.is_file():
        raise EvaluationError(f"no metric script {path}; available: {sorted(p.stem for p in METRICS_DIR.glob('[!_]*.py'))}")
    return evaluate.load(str(path))


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` (2 decimals) of class scores ``[N, C]`` against labels ``[N]``; top-5 only if C > 5."""
    labels = labels.cpu()
    scores = scores.float().cpu()
    top1 = load_metric("accuracy").compute(predictions=scores.argmax(1).numpy(), references=labels.numpy())
    out = {"top1": round(100 * top1["accuracy"], 2)}
    if scores.shape[1] > 5:
        ranked = scores.topk(5, dim=1).indices.numpy()
        top5 = load_metric("top_k_accuracy").compute(predictions=ranked, references=labels.numpy(), k=5)
        out["top5"] = round(100 * top5["top_k_accuracy"], 2)
    return out


# ------------------------------------------------------------------------------------------------ encoders


@dataclass
class FrozenEncoder:
    """What gets evaluated: a transformers encoder (its pooled feature, as in training) or raw pixels.

    ``model_dir`` is the local encoder directory (results are recorded there), ``weights_digest`` the sha256 over
    its weight files (None: features are not cached), ``cache_dir`` where cached features go.
    """

    name: str
    model: torch.nn.Module | None
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    model_dir: Path | None = None
    weights_digest: str | None = None
    cache_dir: Path | None = None

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` features of normalised ``pixel_values`` ``[B, 3, H, W]``."""
        if self.model is None:
            return pixel_values.flatten(1)
        return pooled_features(self.model, pixel_values.to(self.model.dtype))  # a float64 encoder (dtype: float64)


def _sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def resolve_model_dir(model_name_or_path: str | Path) -> Path | None:
    """The local encoder directory of ``model_name_or_path`` (a training OUTPUT_DIR means its ``encoder/``)."""
    path = Path(model_name_or_path)
    if (path / "encoder" / "config.json").is_file() and not (path / "config.json").is_file():
        return path / "encoder"
    return path if path.is_dir() else None


def default_cache_dir(model_dir: Path | None, model_name: str) -> Path:
    """``<run>/features`` for a run's ``encoder/``, ``<model_dir>/features`` for another local encoder, else
    ``~/.cache/hf_ssl/features/<repo>`` (a Hub repo)."""
    if model_dir is not None:
        if model_dir.name == "encoder" and (model_dir.parent / "config.yaml").is_file():
            return model_dir.parent / "features"
        return model_dir / "features"
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_ssl" / "features"
    return root / _slug(model_name.replace("/", "--"))


def load_encoder(model_name_or_path: str | Path, device="cpu", image_size: int | None = None,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 cache_dir: str | Path | None = None) -> FrozenEncoder:
    """Load an encoder directory, a training OUTPUT_DIR (its ``encoder/``), a Hub repo, or ``"raw-pixels"``.

    The input size and normalisation come from the model's image processor unless given; raw pixels default to
    32 px, mean = std = 0.5 (the Fashion-MNIST reference setting).
    """
    from transformers import AutoImageProcessor, AutoModel

    name = str(model_name_or_path)
    if name == RAW_PIXELS:
        return FrozenEncoder(RAW_PIXELS, None, image_size or DEFAULT_RAW_PIXELS_SIZE,
                             list(image_mean or [0.5] * 3), list(image_std or [0.5] * 3))
    model_dir = resolve_model_dir(name)
    source = str(model_dir) if model_dir is not None else name
    try:
        model = AutoModel.from_pretrained(source).to(device).eval()
        backbone_family(model.config.model_type)  # its pooled feature is defined
    except (OSError, ValueError) as err:
        raise EvaluationError(f"cannot load an encoder from {name!r}: {str(err).strip().splitlines()[0]}") from None
    if image_size is None or image_mean is None or image_std is None:
        try:
            processor = AutoImageProcessor.from_pretrained(source)
        except OSError as err:
            raise EvaluationError(f"{name!r} has no image processor (preprocessor_config.json); give image_size, "
                                  f"image_mean and image_std: {err}") from None
        size = processor.size
        processor_size = getattr(size, "shortest_edge", None) or getattr(size, "height", None)
        if processor_size is None and isinstance(size, dict):
            processor_size = size.get("shortest_edge") or size.get("height")
        image_size = image_size or processor_size
        image_mean = image_mean or processor.image_mean
        image_std = image_std or processor.image_std
    if model_dir is not None:
        weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model.safetensors")
        weights = [Path(cached)] if isinstance(cached, str) else []
    digest = _sha256(weights) if weights else None
    cache = Path(cache_dir) if cache_dir else default_cache_dir(model_dir, name)
    return FrozenEncoder(name, model, int(image_size), list(image_mean), list(image_std), model_dir, digest, cache)


# ------------------------------------------------------------------------------------------------ features


@dataclass
class SplitFeatures:
    """Features ``[N, D]`` (float32, not normalised) and labels ``[N]`` of one split."""

    features: torch.Tensor
    labels: torch.Tensor
    label_names: list[str] | None = None
    path: Path | None = None  # the cache file
    from_cache: bool = False
    seconds: float = 0.0


def _normalizer(mean, std, device):
    mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    return lambda pixels: (pixels.to(device).float() / 255 - mean) / std


@torch.no_grad()
def encode_loader(encoder: FrozenEncoder, loader, device="cpu", desc: str = "features", disable: bool = False,
                  autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32 on the CPU) and labels of every batch of ``loader`` (batches of :class:`ImageDecoder`)."""
    normalize = _normalizer(encoder.image_mean, encoder.image_std, device)
    features, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=disable):
        with autocast():
            out = encoder.encode(normalize(batch["pixel_values"]))
        features.append(out.float().cpu())
        labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


def extract_features(encoder: FrozenEncoder, dataset, image_column: str, label_column: str, batch_size: int = 256,
                     num_workers: int = 2, device="cpu", desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, not normalised) and labels ``[N]`` of a whole split, in dataset order."""
    decoder = ImageDecoder(image_column, size=encoder.image_size, label_column=label_column, on_bad_image="error")
    loader = build_dataloader(dataset, decoder, batch_size, shuffle=False, seed=0, num_workers=num_workers,
                              drop_last=False)
    return encode_loader(encoder, loader, device, desc)


def _label_names(dataset, label_column: str) -> list[str] | None:
    feature = (dataset.features or {}).get(label_column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _cache_key(encoder: FrozenEncoder, dataset_name: str, dataset_config, split: str, dataset, image_column: str,
               label_column: str) -> dict:
    local = Path(dataset_name).exists()
    return {"version": FEATURE_CACHE_VERSION, "encoder_sha256": encoder.weights_digest,
            "image_size": encoder.image_size, "image_mean": encoder.image_mean, "image_std": encoder.image_std,
            "dataset": str(Path(dataset_name).resolve()) if local else dataset_name,
            "dataset_config": dataset_config, "split": split, "fingerprint": getattr(dataset, "_fingerprint", None),
            "num_rows": len(dataset), "image_column": image_column, "label_column": label_column}


def split_features(encoder: FrozenEncoder, dataset_name: str, split: str, *, dataset_config: str | None = None,
                   image_column: str | None = None, label_column: str | None = None, batch_size: int = 256,
                   num_workers: int = 2, device="cpu", use_cache: bool = True,
                   extract: bool = True) -> SplitFeatures | None:
    """The features of one split: from the cache when its key matches, else extracted (and cached).

    With ``extract=False`` a cache miss returns None. Raw pixels are never cached (decoding is all the work).
    """
    start = time.perf_counter()
    dataset, image_column = load_image_dataset(dataset_name, split, dataset_config=dataset_config,
                                               image_column=image_column)
    label_column = label_column_of(dataset, label_column)
    names = _label_names(dataset, label_column)
    cacheable = use_cache and encoder.weights_digest is not None and encoder.cache_dir is not None
    path = None
    if cacheable:
        key = _cache_key(encoder, dataset_name, dataset_config, split, dataset, image_column, label_column)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        prefix = "-".join(_slug(p) for p in (Path(dataset_name).name, dataset_config, split) if p)
        path = encoder.cache_dir / f"{prefix}-{digest}.safetensors"
        if path.is_file():
            tensors = load_file(path)
            if tensors["labels"].shape[0] == len(dataset):
                return SplitFeatures(tensors["features"], tensors["labels"], names, path, True,
                                     time.perf_counter() - start)
    if not extract:
        return None
    features, labels = extract_features(encoder, dataset, image_column, label_column, batch_size, num_workers,
                                        device, desc=f"features {split}")
    if cacheable:
        _write_cache(path, prefix, features, labels, {"key": json.dumps(key), "label_names": json.dumps(names)})
    return SplitFeatures(features, labels, names, path, False, time.perf_counter() - start)


def _write_cache(path: Path, prefix: str, features, labels, metadata: dict) -> None:
    """Write atomically; older caches of the same dataset/split (another encoder state) are removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    this_key = json.loads(metadata["key"])
    for old in path.parent.glob(f"{prefix}-*.safetensors"):
        try:
            with safe_open(str(old), "pt") as f:
                old_key = json.loads((f.metadata() or {}).get("key", "{}"))
        except Exception:  # an unreadable cache file is garbage
            old_key = this_key
        if all(old_key.get(k) == this_key[k] for k in ("dataset", "dataset_config", "split")) and old != path:
            old.unlink(missing_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


@dataclass
class FrozenFeatures:
    """Train and test features of one encoder on one dataset, plus what the records need."""

    encoder: FrozenEncoder
    train: SplitFeatures
    test: SplitFeatures
    num_classes: int
    dataset: str
    dataset_config: str | None
    train_split: str
    test_split: str
    seconds: float = 0.0


def frozen_features(model_name_or_path, dataset_name: str, *, train_split: str = "train", test_split: str = "test",
                    dataset_config: str | None = None, image_column: str | None = None,
                    label_column: str | None = None, batch_size: int = 256, num_workers: int = 2, device="cpu",
                    image_size: int | None = None, image_mean=None, image_std=None, cache_dir=None,
                    use_cache: bool = True, encoder: FrozenEncoder | None = None) -> FrozenFeatures:
    """Load the encoder (unless given) and the (cached) features of both splits."""
    start = time.perf_counter()
    encoder = encoder or load_encoder(model_name_or_path, device, image_size, image_mean, image_std, cache_dir)
    kwargs = dict(dataset_config=dataset_config, image_column=image_column, label_column=label_column,
                  batch_size=batch_size, num_workers=num_workers, device=device, use_cache=use_cache)
    train = split_features(encoder, dataset_name, train_split, **kwargs)
    test = split_features(encoder, dataset_name, test_split, **kwargs)
    names = train.label_names or test.label_names
    num_classes = len(names) if names else int(max(train.labels.max(), test.labels.max())) + 1
    return FrozenFeatures(encoder, train, test, num_classes, dataset_name, dataset_config, train_split, test_split,
                          time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ records


def record_eval_results(model_dir: str | Path, records: Sequence[dict]) -> Path:
    """Add ``records`` to ``model_dir/eval_results.json`` (a JSON list), written atomically: a record replaces an
    earlier one of the same evaluation (:func:`hf_ssl.eval_results.record_key`), all others are kept. What is
    already in the file is read as the model card reads it (:func:`hf_ssl.eval_results.read_records`)."""
    path = Path(model_dir) / FILENAME
    try:
        for record in records:
            validate_record(record)
        return write_records(path, merge_records(read_records(path), records))
    except EvalRecordError as err:
        raise EvaluationError(str(err)) from None


def _report(protocol: str, features: FrozenFeatures | None, records: list[dict], seconds: float, **extra) -> dict:
    """The one JSON object `hf-ssl eval` prints."""
    first = records[0] if records else {}
    return {"protocol": protocol,
            "model": features.encoder.name if features else extra.pop("model", None),
            "model_dir": str(features.encoder.model_dir) if features and features.encoder.model_dir
            else extra.pop("model_dir", None),
            "dataset": first.get("dataset"), "dataset_config": first.get("dataset_config"),
            "train_split": first.get("train_split"), "test_split": first.get("test_split"),
            "scores": {f"{r['protocol']}/{r['metric']}": r["value"] for r in records},
            "seconds": round(seconds, 2), **extra, "records": records}


# ------------------------------------------------------------------------------------------------ kNN


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int = 1024) -> torch.Tensor:
    """Weighted-kNN class scores ``[N_test, C]`` (DINO): the k most cosine-similar training samples vote for
    their class with weight exp(sim / T). Features must be L2-normalised."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    train_labels = train_labels.to(train_features.device)
    scores = []
    for chunk in test_features.split(chunk_size):
        sims, idx = (chunk @ train_features.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_scores(train: SplitFeatures, test: SplitFeatures, num_classes: int, k: int = 20,
               temperature: float = 0.07) -> dict[str, float]:
    """Top-1/top-5 (%) of weighted kNN on L2-normalised ``train``/``test`` features."""
    scores = knn_predict(F.normalize(train.features.float(), dim=1), train.labels,
                         F.normalize(test.features.float(), dim=1), k, temperature, num_classes)
    return classification_metrics(scores, test.labels)


def knn_evaluate(model_name_or_path, dataset_name: str, *, k: int = 20, temperature: float = 0.07,
                 **options) -> dict:
    """kNN top-1/top-5 of the encoder on ``test_split`` with ``train_split`` as the memory bank.

    ``options`` are those of :func:`frozen_features` (splits, columns, batch_size, num_workers, device, image
    size/mean/std overrides, cache_dir, use_cache). Returns the report `hf-ssl eval` prints; its ``records``
    follow the eval_results.json schema.
    """
    start = time.perf_counter()
    feats = frozen_features(model_name_or_path, dataset_name, **options)
    scores = knn_scores(feats.train, feats.test, feats.num_classes, k, temperature)
    seconds = time.perf_counter() - start
    params = {"k": k, "temperature": temperature, "similarity": "cosine", "weighting": "exp(sim/T)",
              "num_train": len(feats.train.labels), "num_test": len(feats.test.labels),
              "feature_dim": feats.train.features.shape[1]}
    records = make_records("knn", scores, dataset=dataset_name, dataset_config=feats.dataset_config,
                           train_split=feats.train_split, test_split=feats.test_split, params=params,
                           seconds=seconds)
    return _report("knn", feats, records, seconds, feature_seconds=round(feats.seconds, 2),
                   features_cached=feats.train.from_cache and feats.test.from_cache)


# ------------------------------------------------------------------------------------------------ linear probe


class LinearProbe(torch.nn.Module):
    """Standardisation (fixed mean/std of the training features) followed by one linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = torch.nn.Linear(mean.shape[0], num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def _cosine_lambda(total_steps: int, warmup_steps: int = 0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float = 1e-3,
                     weight_decay: float = 0.0, epochs: int = 30, batch_size: int = 1024,
                     seed: int = 0, device="cpu") -> LinearProbe:
    """Train a :class:`LinearProbe` with AdamW (cosine schedule, mini-batches reshuffled every epoch)."""
    features = features.to(device).float()
    labels = labels.to(device).long()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    generator = torch.Generator().manual_seed(seed)
    probe = LinearProbe(mean, std, num_classes).to(device)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.randn(probe.linear.weight.shape, generator=generator) * 0.01)
        probe.linear.bias.zero_()
    standardized = (features - mean) / std  # once, not per step
    optimizer = torch.optim.AdamW(probe.linear.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(epochs * steps_per_epoch))
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).to(device).split(batch_size):
            loss = F.cross_entropy(probe.linear(standardized[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return probe.eval()


@torch.no_grad()
def _probe_scores(probe: LinearProbe, features: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    device = probe.mean.device
    return torch.cat([probe(x.to(device).float()).cpu() for x in features.split(chunk)])


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, *, epochs: int = 30, batch_size: int = 1024,
                 learning_rates: Sequence[float] = LINEAR_LEARNING_RATES,
                 weight_decays: Sequence[float] = LINEAR_WEIGHT_DECAYS,
                 val_fraction: float = 0.1, seed: int = 0, device="cpu") -> tuple[dict[str, float], dict]:
    """Linear-probe metrics (``{"top1", "top5"}``) and the settings used.

    Every (lr, weight decay) pair is trained on ``1 - val_fraction`` of the training features and scored on the
    held-out rest (a seeded random split); the best pair (the first on ties) is re-trained on all training
    features and scored on the test features.
    """
    if not 0 < val_fraction < 1:
        raise EvaluationError(f"val_fraction must be in (0, 1), got {val_fraction}")
    x, y = train_features, train_labels
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * len(y))))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    sweep = []
    grid = [(lr, wd) for lr in learning_rates for wd in weight_decays]
    for lr, wd in tqdm(grid, desc="linear probe sweep", leave=False):
        probe = fit_linear_probe(x[fit_idx], y[fit_idx], num_classes, lr, wd, epochs, batch_size, seed, device)
        top1 = (_probe_scores(probe, x[val_idx]).argmax(1) == y[val_idx]).float().mean().item() * 100
        sweep.append({"lr": lr, "weight_decay": wd, "val_top1": round(top1, 2)})
    best = max(sweep, key=lambda r: r["val_top1"])
    probe = fit_linear_probe(x, y, num_classes, best["lr"], best["weight_decay"], epochs, batch_size, seed, device)
    scores = classification_metrics(_probe_scores(probe, test_features), test_labels)
    params = {"lr": best["lr"], "weight_decay": best["weight_decay"], "epochs": epochs, "batch_size": batch_size,
              "optimizer": "adamw", "schedule": "cosine", "features": "standardized", "val_fraction": val_fraction,
              "val_top1": best["val_top1"], "sweep": sweep, "seed": seed, "num_train": len(y),
              "num_test": len(test_labels), "feature_dim": x.shape[1]}
    return scores, params


def linear_probe_evaluate(model_name_or_path, dataset_name: str, *, epochs: int = 30, probe_batch_size: int = 1024,
                          learning_rates: Sequence[float] = LINEAR_LEARNING_RATES,
                          weight_decays: Sequence[float] = LINEAR_WEIGHT_DECAYS, val_fraction: float = 0.1,
                          seed: int = 0, **options) -> dict:
    """Linear-probe top-1/top-5 of the encoder's frozen features (see :func:`linear_probe`).

    ``options`` are those of :func:`frozen_features`. Returns the report `hf-ssl eval` prints.
    """
    start = time.perf_counter()
    feats = frozen_features(model_name_or_path, dataset_name, **options)
    scores, params = linear_probe(feats.train.features, feats.train.labels, feats.test.features, feats.test.labels,
                                  feats.num_classes, epochs=epochs, batch_size=probe_batch_size,
                                  learning_rates=learning_rates, weight_decays=weight_decays,
                                  val_fraction=val_fraction, seed=seed, device=options.get("device", "cpu"))
    seconds = time.perf_counter() - start
    records = make_records("linear", scores, dataset=dataset_name, dataset_config=feats.dataset_config,
                           train_split=feats.train_split, test_split=feats.test_split, params=params,
                           seconds=seconds)
    return _report("linear", feats, records, seconds, feature_seconds=round(feats.seconds, 2),
                   features_cached=feats.train.from_cache and feats.test.from_cache)


# ------------------------------------------------------------------------------------------------ low-label


def class_balanced_subset(labels: Sequence[int] | torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-balanced subset holding ``fraction`` of the labels.

    Every class present gets the same count, ``max(1, round(fraction * N / num_classes))`` samples drawn at
    random (one seeded generator, classes in ascending order), or all of its samples if it has fewer.
    The same (labels, fraction, seed) always gives the same subset.
    """
    if not 0 < fraction <= 1:
        raise EvaluationError(f"a label fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels)
    classes = labels.unique(sorted=True)
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            logger.warning("class %s has only %d samples, fewer than %d: the subset is not balanced",
                           int(c), len(members), per_class)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


class _Classifier(torch.nn.Module):
    def __init__(self, backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(feature_dim(backbone), num_classes)

    def forward(self, pixel_values):
        return self.head(pooled_features(self.backbone, pixel_values))


def random_crop_flip(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard small-image augmentation: reflect-pad by size/8, random crop back to size, random h-flip."""
    b, _, h, w = pixels.shape
    pad = max(1, h // 8)
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).tolist()
    flips = torch.rand(b, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    return torch.where(flips.view(b, 1, 1, 1).to(out.device), out.flip(3), out)


def train_classifier(backbone, dataset, image_column: str, label_column: str, num_classes: int, *,
                     image_size: int, image_mean, image_std, epochs: int, lr: float = 1e-3,
                     weight_decay: float = 0.05, batch_size: int = 64, augment: bool = True, seed: int = 0,
                     num_workers: int = 2, device="cpu", desc: str = "fine-tuning") -> _Classifier:
    """Train ``backbone`` + a linear head end to end with AdamW (no decay on biases/norms), 5 % linear warmup
    then cosine, cross-entropy; augmentation: :func:`random_crop_flip`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _Classifier(backbone, num_classes).to(device).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    batch_size = min(batch_size, len(dataset))
    decoder = ImageDecoder(image_column, size=image_size, label_column=label_column)
    loader = build_dataloader(dataset, decoder, batch_size, shuffle=True, seed=seed, num_workers=num_workers,
                              drop_last=True)  # a last batch of 1 breaks BatchNorm on 1x1 maps
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(total, int(0.05 * total)))
    normalize = _normalizer(image_mean, image_std, device)
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=total, desc=desc, leave=False) as progress:
        for _ in range(epochs):
            for batch in loader:
                pixels = normalize(batch["pixel_values"])
                if augment:
                    pixels = random_crop_flip(pixels, generator)
                loss = F.cross_entropy(model(pixels), batch["labels"].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def _classifier_scores(model: _Classifier, loader, image_mean, image_std, device, desc) -> tuple[torch.Tensor, torch.Tensor]:
    normalize = _normalizer(image_mean, image_std, device)
    scores, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        scores.append(model(normalize(batch["pixel_values"])).float().cpu())
        labels.append(batch["labels"])
    return torch.cat(scores), torch.cat(labels)


def _labels_of(dataset, label_column: str) -> torch.Tensor:
    return torch.as_tensor(dataset.select_columns([label_column]).with_format("numpy")[label_column][:])


def fewshot_evaluate(model_name_or_path, dataset_name: str, *, fractions: Sequence[float] = (0.01, 0.1),
                     epochs: int | None = None, lr: float = 1e-3, weight_decay: float = 0.05,
                     train_batch_size: int = 64, augment: bool = True, seed: int = 0, finetune: bool = True,
                     scratch: bool = True, train_split: str = "train", test_split: str = "test",
                     dataset_config: str | None = None, image_column: str | None = None,
                     label_column: str | None = None, batch_size: int = 256, num_workers: int = 2, device="cpu",
                     image_size: int | None = None, image_mean=None, image_std=None) -> dict:
    """Low-label evaluation: for each fraction of the labels (a :func:`class_balanced_subset`), fine-tune the
    encoder + a linear head (``fewshot-finetune-X%``) and train the same architecture from a random init of the
    encoder's config (``fewshot-scratch-X%``) with the same recipe and labels; top-1/top-5 on ``test_split``.

    ``epochs`` defaults to 60 for fractions up to 1 % and 30 above (SimCLR's semi-supervised protocol).
    """
    encoder = load_encoder(model_name_or_path, device, image_size, image_mean, image_std)
    if encoder.model is None:
        raise EvaluationError("fewshot fine-tunes an encoder; raw-pixels has none (use knn or linear)")
    train_ds, image_col = load_image_dataset(dataset_name, train_split, dataset_config=dataset_config,
                                             image_column=image_column)
    test_ds, _ = load_image_dataset(dataset_name, test_split, dataset_config=dataset_config, image_column=image_col)
    label_col = label_column_of(train_ds, label_column)
    labels = _labels_of(train_ds, label_col)
    names = _label_names(train_ds, label_col)
    num_classes = len(names) if names else int(max(labels.max(), _labels_of(test_ds, label_col).max())) + 1
    test_loader = build_dataloader(test_ds, ImageDecoder(image_col, size=encoder.image_size, label_column=label_col),
                                   batch_size, shuffle=False, seed=0, num_workers=num_workers, drop_last=False)
    kinds = [k for k, on in (("finetune", finetune), ("scratch", scratch)) if on]
    if not kinds:
        raise EvaluationError("nothing to do: both finetune and scratch are off")
    records, start = [], time.perf_counter()
    for fraction in fractions:
        subset = class_balanced_subset(labels, fraction, seed)
        n_epochs = epochs or (FEWSHOT_EPOCHS[0.01] if fraction <= 0.01 else FEWSHOT_EPOCHS[0.1])
        for kind in kinds:
            t0 = time.perf_counter()
            if kind == "finetune":
                backbone = copy.deepcopy(encoder.model)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    backbone = build_backbone(encoder.model.config)
            model = train_classifier(backbone, train_ds.select(subset.tolist()), image_col, label_col, num_classes,
                                     image_size=encoder.image_size, image_mean=encoder.image_mean,
                                     image_std=encoder.image_std, epochs=n_epochs, lr=lr, weight_decay=weight_decay,
                                     batch_size=train_batch_size, augment=augment, seed=seed,
                                     num_workers=num_workers, device=device,
                                     desc=f"{kind} {fraction_name(fraction)}")
            scores, test_labels = _classifier_scores(model, test_loader, encoder.image_mean, encoder.image_std,
                                                     device, desc=f"test {kind} {fraction_name(fraction)}")
            params = {"fraction": fraction, "num_labels": len(subset),
                      "labels_per_class": int(torch.bincount(labels[subset]).max()), "epochs": n_epochs, "lr": lr,
                      "weight_decay": weight_decay, "batch_size": min(train_batch_size, len(subset)),
                      "optimizer": "adamw", "schedule": "warmup 5% + cosine",
                      "augmentation": "pad size/8 + random crop + h-flip" if augment else "none",
                      "init": "pretrained encoder" if kind == "finetune" else "random (encoder config)",
                      "seed": seed}
            records += make_records(fewshot_protocol(kind, fraction),
                                    classification_metrics(scores, test_labels), dataset=dataset_name,
                                    dataset_config=dataset_config, train_split=train_split, test_split=test_split,
                                    params=params, seconds=time.perf_counter() - t0)
    return _report("fewshot", None, records, time.perf_counter() - start, model=encoder.name,
                   model_dir=str(encoder.model_dir) if encoder.model_dir else None)


# ------------------------------------------------------------------------------------------------ online kNN


def _random_subset(dataset, size: int | None, seed: int):
    if size is None or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return dataset.select(sorted(order.tolist()))


@dataclass
class OnlineKnn:
    """kNN top-1 of the current encoder during training, on seeded random subsets (at most ``subset_size``
    images each) of the train split (memory bank) and the eval split (queries).

    The subsets and their DataLoaders are made once; each call runs the encoder in eval mode and restores
    every submodule's train/eval mode afterwards, and leaves the global RNG state as it found it (so a resumed
    run draws the same numbers as an uninterrupted one).
    """

    dataset_name: str
    train_split: str
    test_split: str
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    dataset_config: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    subset_size: int | None = 5000
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256
    num_workers: int = 0
    seed: int = 0
    loaders: dict = field(default_factory=dict, init=False, repr=False)
    num_classes: int = field(default=0, init=False)

    def __post_init__(self):
        for i, split in enumerate((self.train_split, self.test_split)):
            dataset, column = load_image_dataset(self.dataset_name, split, dataset_config=self.dataset_config,
                                                 image_column=self.image_column)
            label_column = label_column_of(dataset, self.label_column)
            names = _label_names(dataset, label_column)
            self.num_classes = max(self.num_classes, len(names) if names else 0)
            subset = _random_subset(dataset, self.subset_size, self.seed + i)
            decoder = ImageDecoder(column, size=self.image_size, label_column=label_column)
            self.loaders[split] = build_dataloader(subset, decoder, self.batch_size, shuffle=False, seed=0,
                                                   num_workers=self.num_workers, drop_last=False)

    @torch.no_grad()
    def __call__(self, encoder: torch.nn.Module, device="cpu", autocast=contextlib.nullcontext) -> dict:
        """``{"top1": %, "bank_size": n, "query_size": m}`` of ``encoder`` (a transformers backbone)."""
        modes = [(module, module.training) for module in encoder.modules()]
        frozen = FrozenEncoder("online", encoder, self.image_size, self.image_mean, self.image_std)
        encoder.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                train = SplitFeatures(*encode_loader(frozen, self.loaders[self.train_split], device, "online kNN bank",
                                                     autocast=autocast))
                test = SplitFeatures(*encode_loader(frozen, self.loaders[self.test_split], device, "online kNN queries",
                                                    autocast=autocast))
        finally:
            for module, training in modes:
                module.training = training
        num_classes = max(self.num_classes, int(max(train.labels.max(), test.labels.max())) + 1)
        scores = knn_scores(train, test, num_classes, self.k, self.temperature)
        return {"top1": scores["top1"], "bank_size": len(train.labels), "query_size": len(test.labels)}
