"""Export a trained run as a plain transformers encoder (safetensors + image processor + model card).

`OUTPUT_DIR/encoder/` loads with `AutoModel.from_pretrained` / `pipeline("image-feature-extraction")` in a
process that never imports hf_ssl.
"""
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoModel, ConvNextImageProcessor

import modeling  # noqa: F401  (registers the method models with AutoModel)
from modeling import METHODS
from modeling.backbones import CLS_TOKEN_MODEL_TYPES, pooled_features

TEMPLATES = Path(__file__).resolve().parent.parent / "model_cards"


class ExportError(ValueError):
    """The source cannot be exported; the message names what is missing."""


def _locate(source: Path) -> tuple[Path, Path | None]:
    """(directory with the pretraining model, the run's OUTPUT_DIR or None) for an OUTPUT_DIR or a checkpoint."""
    if (source / "pretraining" / "config.json").is_file():
        return source / "pretraining", source
    if (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        run = source.parent.parent if source.parent.name == "checkpoints" else None
        return source, run
    raise ExportError(f"{source} is neither a training OUTPUT_DIR (with pretraining/) nor a checkpoint "
                      "(with config.json and model.safetensors)")


def image_processor(size: int, mean, std) -> ConvNextImageProcessor:
    """The processor that reproduces training-time decoding: shorter side to `size` (bilinear), centre crop,
    rescale to [0, 1], normalise."""
    return ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=1.0, resample=2,
                                  image_mean=list(mean), image_std=list(std))


def export_encoder(source: str | Path, output_dir: str | Path) -> Path:
    """Write the publishable encoder of a run (or checkpoint) to `output_dir`, atomically, and verify that the
    reloaded encoder gives the same features."""
    source, output_dir = Path(source), Path(output_dir)
    model_dir, run_dir = _locate(source)
    model = AutoModel.from_pretrained(model_dir).eval()
    encoder = model.get_encoder()
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text()) if run_dir else {}
    size = recipe.get("image_size", 224)
    mean, std = recipe.get("image_mean", [0.485, 0.456, 0.406]), recipe.get("image_std", [0.229, 0.224, 0.225])

    tmp = output_dir.with_name(f".tmp_{output_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp, safe_serialization=True)
    image_processor(size, mean, std).save_pretrained(tmp)
    info = {
        "method": model.config.model_type.removeprefix("hf_ssl_"),
        "backbone": encoder.config.model_type,
        "feature": "CLS token of last_hidden_state" if encoder.config.model_type in CLS_TOKEN_MODEL_TYPES
        else "pooler_output",
        "image_size": size,
        "recipe": recipe,
        "training": _training_summary(run_dir),
    }
    (tmp / "hf_ssl.json").write_text(json.dumps(info, indent=2) + "\n")
    if (output_dir / "eval_results.json").is_file():
        shutil.copy(output_dir / "eval_results.json", tmp / "eval_results.json")

    reloaded = AutoModel.from_pretrained(tmp).eval()
    probe = torch.randn(2, encoder.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(pooled_features(encoder, probe), pooled_features(reloaded, probe), atol=1e-5):
            raise ExportError(f"the encoder reloaded from {tmp} gives other features than the trained one")
    write_model_card(tmp)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)
    return output_dir


def _training_summary(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    summary = {k: v for r in records for k, v in r.items() if k in ("train_runtime_seconds", "hardware")}
    if train:
        summary.update(steps=train[-1]["step"], epochs=train[-1]["epoch"], final_loss=train[-1]["loss"])
    return summary


def write_model_card(encoder_dir: str | Path) -> ModelCard:
    """Render `README.md` of an exported encoder from `hf_ssl.json` and `eval_results.json`."""
    encoder_dir = Path(encoder_dir)
    info = json.loads((encoder_dir / "hf_ssl.json").read_text())
    results = json.loads((encoder_dir / "eval_results.json").read_text()) \
        if (encoder_dir / "eval_results.json").is_file() else []
    method = METHODS.get(info["method"])
    dataset = info["recipe"].get("dataset_name", "unknown")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license="apache-2.0",
        tags=["self-supervised", info["method"], "hf-ssl", info["backbone"]],
        datasets=[dataset],
    )
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / "encoder.md.jinja"),
        method=info["method"], paper=method.paper if method else "", info=info, results=results,
        dataset=dataset, cls_token=info["feature"].startswith("CLS"),
    )
    card.save(encoder_dir / "README.md")
    return card
