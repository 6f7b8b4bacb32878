"""Frozen-feature evaluation of an encoder directory (or Hub repo) on a labelled 🤗 dataset.

kNN follows DINO's protocol: cosine similarity of L2-normalised features, the k nearest training samples vote
with weight exp(sim / T), top-1 of the summed votes.
"""
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel

from modeling.backbones import pooled_features

from .data import ImageDecoder, build_dataloader, label_column_of, load_image_dataset


def load_encoder(model_name_or_path: str | Path, device="cpu"):
    """The encoder and the (size, mean, std) of its image processor."""
    encoder = AutoModel.from_pretrained(str(model_name_or_path)).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(str(model_name_or_path))
    size = getattr(processor.size, "shortest_edge", None) or getattr(processor.size, "height", None)
    return encoder, (size, processor.image_mean, processor.image_std)


@torch.no_grad()
def extract_features(encoder, dataset, image_column: str, label_column: str, size: int, mean, std,
                     batch_size: int = 256, device="cpu", desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features `[N, D]` and labels `[N]` of a whole split."""
    decoder = ImageDecoder(image_column, size=size, label_column=label_column, on_bad_image="error")
    loader = build_dataloader(dataset, decoder, batch_size, shuffle=False, seed=0, num_workers=1, drop_last=False)
    mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=device).view(1, -1, 1, 1)
    features, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        pixels = (batch["pixel_values"].to(device).float() / 255 - mean) / std
        features.append(F.normalize(pooled_features(encoder, pixels).float(), dim=-1).cpu())
        labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int = 1024) -> torch.Tensor:
    """Weighted-kNN class scores `[N_test, C]` (features must be L2-normalised)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    scores = []
    for chunk in test_features.split(chunk_size):
        sims, idx = (chunk @ train_features.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_evaluate(model_name_or_path, dataset_name: str, train_split: str = "train", test_split: str = "test",
                 dataset_config: str | None = None, image_column: str | None = None,
                 label_column: str | None = None, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 256, device="cpu") -> dict:
    """kNN top-1 (%) of the encoder on `test_split` with `train_split` as the memory bank."""
    start = time.perf_counter()
    encoder, (size, mean, std) = load_encoder(model_name_or_path, device)
    feats = {}
    for split in (train_split, test_split):
        dataset, column = load_image_dataset(dataset_name, split, dataset_config=dataset_config,
                                             image_column=image_column)
        labels = label_column_of(dataset, label_column)
        feats[split] = extract_features(encoder, dataset, column, labels, size, mean, std, batch_size, device,
                                        desc=f"features {split}")
    (train_x, train_y), (test_x, test_y) = feats[train_split], feats[test_split]
    scores = knn_predict(train_x, train_y, test_x, k, temperature, int(max(train_y.max(), test_y.max())) + 1)
    top1 = (scores.argmax(1) == test_y).float().mean().item() * 100
    return {"knn_top1": round(top1, 2), "knn_k": k, "knn_temperature": temperature, "dataset": dataset_name,
            "train_split": train_split, "test_split": test_split, "seconds": round(time.perf_counter() - start, 1)}


def record_eval_result(model_dir: Path, result: dict) -> None:
    """Append `result` to `model_dir/eval_results.json`, which the model card's model-index reads."""
    path = Path(model_dir) / "eval_results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    results.append(result)
    path.write_text(json.dumps(results, indent=2) + "\n")
