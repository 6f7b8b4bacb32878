"""Export a trained run as a plain transformers encoder (safetensors + image processor + model card), and publish it.

`OUTPUT_DIR/encoder/` loads with `AutoModel.from_pretrained` / `pipeline("image-feature-extraction")` in a
process that never imports hf_ssl.

    hf-ssl export OUTPUT_DIR --output_dir DIR [--include_pretraining]
    hf-ssl push DIR --repo_id NAME [--private] [--revision BRANCH] [--commit_message MSG] [--overwrite_card]
                    [--include_pretraining] [--pretraining_dir PATH]

The model card is rendered from `model_cards/encoder.md.jinja` (per-method text in `model_cards/methods.yaml`)
with the encoder's `hf_ssl.json` (written at export: method, backbone, recipe, training summary) and
`eval_results.json` (written by the evaluation, read here, both through the one schema of `hf_ssl.eval_results`).
`push` re-renders it with the repo id in the loading snippets and uploads everything in one commit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoModel

import modeling  # noqa: F401  (registers the method models with AutoModel)
from modeling import METHODS
from modeling.backbones import at_input_size, backbone_family, pooled_features

from .eval_results import FILENAME as EVAL_RESULTS, IDENTITY_KEYS, PROTOCOL_RE, read_records

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent.parent / "model_cards"
# Stands for the repo id in the snippets of a card that has not been pushed yet; `push` replaces it.
PLACEHOLDER = "path/to/encoder"
LICENSE = "apache-2.0"
LOSS_CURVE = "loss.png"
ATTENTION_MAPS = "attention.png"  # ViT encoders: `hf-ssl plot OUTPUT_DIR --attention IMAGE...` puts it beside the encoder
PRETRAINING = "pretraining"
# Files never published: pickles (weights must be safetensors) and local bookkeeping.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ExportError(ValueError):
    """The source cannot be exported; the message names what is missing."""


class HubError(RuntimeError):
    """Publishing failed before or instead of a commit; the message says why (never containing the token)."""


# ----------------------------------------------------------------------------------------------------- export


def _locate(source: Path) -> tuple[Path, Path | None]:
    """(directory with the pretraining model, the run's OUTPUT_DIR or None) for an OUTPUT_DIR or a checkpoint."""
    if (source / "pretraining" / "config.json").is_file():
        return source / "pretraining", source
    if (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        run = source.parent.parent if source.parent.name == "checkpoints" else None
        return source, run
    raise ExportError(f"{source} is neither a training OUTPUT_DIR (with pretraining/) nor a checkpoint "
                      "(with config.json and model.safetensors)")


def image_processor(size: int, mean, std) -> "ConvNextImageProcessor":
    """The processor that reproduces training-time decoding: shorter side to `size` (bilinear), centre crop,
    rescale to [0, 1], normalise."""
    # Imported here: transformers warns about its torchvision-free fallback on first access.
    from transformers import ConvNextImageProcessor

    return ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=1.0, resample=2,
                                  image_mean=list(mean), image_std=list(std))


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_encoder(source: str | Path, output_dir: str | Path, include_pretraining: bool = False) -> Path:
    """Write the publishable encoder of a run (or checkpoint) to `output_dir`, atomically, and verify that the
    reloaded encoder gives the same features.

    Also written: `hf_ssl.json` (what the card is made from), the run's loss curve (`loss.png`, for an
    OUTPUT_DIR), `README.md` (the card), and with `include_pretraining` the full `XForPreTraining` in
    `pretraining/` (config + safetensors), which `push` publishes in the repo's `pretraining/` folder.
    An `eval_results.json` already in `output_dir` is kept only if the weights did not change."""
    source, output_dir = Path(source), Path(output_dir)
    model_dir, run_dir = _locate(source)
    model = AutoModel.from_pretrained(model_dir).eval()
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text()) if run_dir else {}
    size = recipe.get("image_size", 224)
    trained = model.get_encoder()
    encoder = at_input_size(trained, size)
    mean, std = recipe.get("image_mean", [0.485, 0.456, 0.406]), recipe.get("image_std", [0.229, 0.224, 0.225])
    checkpoint_step = int(model_dir.name[5:]) if re.fullmatch(r"step_\d+", model_dir.name) else None

    tmp = output_dir.with_name(f".tmp_{output_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp, safe_serialization=True)
    image_processor(size, mean, std).save_pretrained(tmp)

    reloaded = AutoModel.from_pretrained(tmp).eval()
    probe = torch.randn(2, encoder.config.num_channels, size, size, generator=torch.Generator().manual_seed(0),
                        dtype=encoder.dtype)
    with torch.no_grad():
        expected = pooled_features(trained, probe)
        if not torch.allclose(expected, pooled_features(reloaded, probe), atol=1e-5):
            raise ExportError(f"the encoder reloaded from {tmp} gives other features than the trained one")
    info = {
        "method": model.config.model_type.removeprefix("hf_ssl_"),
        "backbone": encoder.config.model_type,
        "feature": backbone_family(encoder.config.model_type).feature,
        "feature_dim": int(expected.shape[-1]),
        "image_size": size,
        "recipe": recipe,
        "checkpoint_step": checkpoint_step,
        "training": _training_summary(run_dir, upto_step=checkpoint_step),
    }
    if getattr(model.config, "teacher_name_or_path", None):  # DisCo: the teacher, pinned
        info["teacher"] = {key: getattr(model.config, f"teacher_{key}", None)
                           for key in ("name_or_path", "revision", "subfolder", "sha256")}
    (tmp / "hf_ssl.json").write_text(json.dumps(info, indent=2) + "\n")
    if (output_dir / EVAL_RESULTS).is_file() and \
            _sha256(output_dir / "model.safetensors") == _sha256(tmp / "model.safetensors"):
        shutil.copy(output_dir / EVAL_RESULTS, tmp / EVAL_RESULTS)
    if run_dir is not None and checkpoint_step is None:
        curve = _loss_curve(run_dir)
        if curve is not None:
            shutil.copy(curve, tmp / LOSS_CURVE)
    if include_pretraining:
        model.save_pretrained(tmp / PRETRAINING, safe_serialization=True)
    write_model_card(tmp)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)
    return output_dir


def _loss_curve(run_dir: Path) -> Path | None:
    """`run_dir/plots/loss.png`, (re)drawn first when older than `metrics.jsonl` (train() plots after export).
    A failure to plot leaves the card without the image rather than failing the export."""
    metrics, png = run_dir / "metrics.jsonl", run_dir / "plots" / "loss.png"
    if metrics.is_file() and (not png.is_file() or png.stat().st_mtime < metrics.stat().st_mtime):
        try:
            from .plots import plot_training_curves

            plot_training_curves(run_dir)
        except Exception as err:  # noqa: BLE001  (matplotlib missing, unreadable metrics, ...)
            logger.warning("no loss curve for the model card: %s", err)
            return None
    return png if png.is_file() else None


def _training_summary(run_dir: Path | None, upto_step: int | None = None) -> dict:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if upto_step is not None:
        records = [r for r in records if r.get("step", 0) <= upto_step and "train_runtime_seconds" not in r]
    train = [r for r in records if "loss" in r]
    summary = {k: v for r in records for k, v in r.items() if k in ("train_runtime_seconds", "hardware",
                                                                              "global_batch_size")}
    if train:
        summary.update(steps=train[-1]["step"], epochs=train[-1]["epoch"], final_loss=train[-1]["loss"])
    return summary


# ------------------------------------------------------------------------------------------------- model card


def method_texts() -> dict:
    """Per-method card text (model_cards/methods.yaml)."""
    return yaml.safe_load((TEMPLATES / "methods.yaml").read_text())


def _method_text(method: str) -> dict:
    texts = method_texts()
    if method in texts:
        return texts[method]
    registered = METHODS.get(method)
    return {"name": method.upper(), "summary": f"Self-supervised pretraining with {method}.",
            "paper": None, "bibtex": f"% {registered.paper if registered else method}"}


def hub_dataset_id(name: str | None) -> str | None:
    """The Hub id of a dataset given as `dataset_name`, or None for local paths/files."""
    if not name:
        return None
    if name == "fashion_mnist":
        from .data import FASHION_MNIST_HUB_ID

        return FASHION_MNIST_HUB_ID
    return _hub_id(name)


def _hub_id(name: str | None) -> str | None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.exists(name) \
            or re.search(r"\.(parquet|arrow|csv|json|jsonl|zip|tar|gz)$|[*?\\]", name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _dataset_label(name: str | None) -> str:
    if not name:
        return "unknown data"
    hub = hub_dataset_id(name)
    return f"[{hub}](https://huggingface.co/datasets/{hub})" if hub else f"`{Path(name).name}` (a local dataset)"


def _protocol_label(protocol: str) -> str:
    if protocol == "knn":
        return "kNN"
    if protocol == "linear":
        return "linear probe"
    match = PROTOCOL_RE.match(protocol)
    if match and match["init"]:
        how = "fine-tuned" if match["init"] == "finetune" else "random init (baseline), trained"
        return f"{match['fraction']}% labels, {how}"
    return protocol


def _metric_type(protocol: str, metric: str) -> str:
    """A distinct model-index metric id per (protocol, metric): knn-top1, linear-top5, fewshot-finetune-1pct-top1."""
    return re.sub(r"[^a-z0-9.]+", "-", f"{protocol.replace('%', 'pct')}-{metric}".lower()).strip("-")


def load_eval_results(encoder_dir: str | Path) -> list[dict]:
    """`eval_results.json` as a list of records of the `hf_ssl.eval_results` schema, the latest per evaluation
    (`hf_ssl.eval_results.record_key`). Entries of the earlier `{"knn_top1": ...}` form are converted; entries that
    are not records of the schema are skipped."""
    return read_records(Path(encoder_dir) / EVAL_RESULTS)


def eval_results_for_card(results: list[dict]) -> list[EvalResult]:
    """huggingface_hub `EvalResult`s: one metric per record, grouped by the Hub per test dataset (name, config,
    split). The train split is in the metric's args, and in its name where it is not "train", so that two
    evaluations that differ only in the train split stay two distinguishable metrics."""
    out = []
    for r in results:
        dataset_id = hub_dataset_id(r["dataset"]) or Path(r["dataset"]).name
        params = {k: v for k, v in r["params"].items() if v is not None}
        out.append(EvalResult(
            task_type="image-classification", task_name="Image Classification",
            dataset_type=dataset_id, dataset_name=dataset_id, dataset_config=r["dataset_config"],
            dataset_split=r["test_split"],
            metric_type=_metric_type(r["protocol"], r["metric"]), metric_value=round(r["value"], 2),
            metric_name=f"{_protocol_label(r['protocol'])} {r['metric'].replace('top', 'top-')} accuracy (%)"
            + (f", trained on {r['train_split']}" if r["train_split"] != "train" else ""),
            metric_args={"train_split": r["train_split"], **params} or None,
        ))
    return out


def _cell(value) -> str:
    """A markdown table cell: `|` escaped, no line breaks."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _results_rows(results: list[dict]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for r in results:
        key = tuple(r[k] for k in IDENTITY_KEYS if k != "metric")  # one row per evaluation, its metrics as columns
        row = rows.setdefault(key, {
            "protocol": _protocol_label(r["protocol"]),
            "dataset": (hub_dataset_id(r["dataset"]) or Path(r["dataset"]).name)
            + (f" ({r['dataset_config']})" if r["dataset_config"] else ""),
            "train_split": r["train_split"], "test_split": r["test_split"], "top1": "–", "top5": "–",
            "params": ", ".join(f"{k}={v}" for k, v in r["params"].items() if v is not None) or "–"})
        if r["metric"] in ("top1", "top5"):
            row[r["metric"]] = f"{r['value']:.2f}"
        else:
            row["params"] = (row["params"] if row["params"] != "–" else "") + f" {r['metric']}={r['value']:.2f}"
    return [{k: _cell(v) for k, v in row.items()} for row in rows.values()]


def _base_models(recipe: dict) -> list[str]:
    """Hub checkpoints this encoder derives from: the backbone it started from; a distillation teacher."""
    candidates = [recipe.get("backbone_name_or_path"), (recipe.get("model") or {}).get("teacher_name_or_path")]
    return [m for m in (_hub_id(c) for c in candidates if isinstance(c, str)) if m]


def _backbone_label(info: dict) -> str:
    recipe = info.get("recipe") or {}
    start = recipe.get("backbone_name_or_path")
    if start:
        return f"{info['backbone']} ({start if _hub_id(start) else Path(start).name})"
    if recipe.get("backbone_config"):
        return info["backbone"]
    return recipe.get("backbone") or info["backbone"]


def _training_rows(info: dict) -> list[tuple[str, str]]:
    recipe, training = info.get("recipe") or {}, info.get("training") or {}
    rows = [("method", _method_text(info["method"])["name"]), ("backbone", _backbone_label(info))]
    if recipe.get("backbone_name_or_path"):
        rows.append(("initialised from", f"`{recipe['backbone_name_or_path']}`"))
    teacher = info.get("teacher")
    if teacher:
        pinned = [f"revision `{teacher['revision']}`" if teacher.get("revision") else None,
                  f"subfolder `{teacher['subfolder']}`" if teacher.get("subfolder") else None,
                  f"model.safetensors sha256 `{teacher['sha256']}`" if teacher.get("sha256") else None]
        rows.append(("distilled from (teacher)", f"`{teacher['name_or_path']}`"
                     + "".join(f", {p}" for p in pinned if p)))
    rows.append(("dataset", f"{_dataset_label(recipe.get('dataset_name'))}"
                 + (f" ({recipe['dataset_config']})" if recipe.get("dataset_config") else "")
                 + (f", split `{recipe['train_split']}`" if recipe.get("train_split") else "")))
    rows.append(("image size", f"{info['image_size']} px"))
    if training.get("steps") is not None:
        rows.append(("steps / epochs", f"{training['steps']} / {training.get('epochs')}"))
    if info.get("checkpoint_step") is not None:
        rows.append(("exported from", f"checkpoint at step {info['checkpoint_step']}"))
    if training.get("global_batch_size"):
        rows.append(("batch", f"{training['global_batch_size']} images per optimizer step (the global batch; a run "
                     "resumes from its checkpoints on any number of processes that keep it)"))
    elif recipe.get("per_device_train_batch_size"):
        accum = recipe.get("gradient_accumulation_steps", 1)
        rows.append(("batch", f"{recipe['per_device_train_batch_size']} per device"
                     + (f" x {accum} accumulation steps" if accum and accum > 1 else "")))
    mask_p = (recipe.get("augmentation") or {}).get("mask_p")
    if mask_p:
        column = (recipe.get("model") or {}).get("mask_column")
        source = (f"the dataset's column `{column}`" if column else
                  f"the feature-norm map of `{recipe.get('saliency_model')}` (thresholded at each image's mean, "
                  "computed once per image)")
        rows.append(("saliency masking", f"background removed from a large crop with probability {mask_p}, "
                     f"foreground masks from {source}"))
    if recipe.get("optimizer"):
        rows.append(("optimizer", f"{recipe['optimizer']}, lr {recipe.get('learning_rate')} "
                     f"(scaled by batch/{recipe.get('lr_scaling_batch_size', 256)}), "
                     f"weight decay {recipe.get('weight_decay')}"))
    if recipe.get("mixed_precision"):
        full = "fp64" if recipe.get("dtype") == "float64" else "fp32"
        rows.append(("precision", recipe["mixed_precision"] if recipe["mixed_precision"] != "no" else full))
    if training.get("hardware"):
        rows.append(("hardware", training["hardware"]))
    if training.get("train_runtime_seconds") is not None:
        seconds = float(training["train_runtime_seconds"])
        rows.append(("wall time", f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.2f} h"))
    if training.get("final_loss") is not None:
        rows.append(("final loss", f"{training['final_loss']:.4f}"))
    return [(label, _cell(value)) for label, value in rows]


def render_model_card(encoder_dir: str | Path, repo_id: str | None = None,
                      pretraining: bool | None = None) -> ModelCard:
    """The card of an exported encoder, from its `hf_ssl.json` and `eval_results.json`; the loading snippets name
    `repo_id` (or PLACEHOLDER). `pretraining`: whether the repo has the pretraining model in `pretraining/`
    (default: whether `encoder_dir/pretraining/` exists)."""
    encoder_dir = Path(encoder_dir)
    info = json.loads((encoder_dir / "hf_ssl.json").read_text())
    info.setdefault("training", {})
    info.setdefault("recipe", {})
    results = load_eval_results(encoder_dir)
    method = _method_text(info["method"])
    dataset = info["recipe"].get("dataset_name")
    hub_dataset = hub_dataset_id(dataset)
    base_models = _base_models(info["recipe"])
    name = repo_id or f"{info['method']}-{info['backbone']}"
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=LICENSE,
        tags=["self-supervised", info["method"], "hf-ssl", info["backbone"], "image-feature-extraction"],
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        model_name=name,
        eval_results=eval_results_for_card(results) or None,
    )
    if pretraining is None:
        pretraining = (encoder_dir / PRETRAINING / "config.json").is_file()
    cls_token = info["feature"].startswith("CLS")
    dim = info.get("feature_dim")
    recipe = {k: v for k, v in info["recipe"].items() if k not in ("output_dir", "resume_from_checkpoint")}
    # a method's own "How to use" text (methods.yaml `how_to_use`) is a template of the card's values too
    how_to_use = jinja2.Template(method.get("how_to_use") or "").render(
        info=info, repo=repo_id or PLACEHOLDER, cls_token=cls_token).strip()
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / "encoder.md.jinja"),
        method=method, info=info, repo=repo_id or PLACEHOLDER, cls_token=cls_token, how_to_use=how_to_use,
        backbone=_backbone_label(info), dataset_label=_dataset_label(dataset),
        feature_shape=f"a {dim}-dimensional vector per image" if dim else "one vector per image",
        training_rows=_training_rows(info),
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).strip() if recipe else "",
        loss_curve=LOSS_CURVE if (encoder_dir / LOSS_CURVE).is_file() else None,
        attention_maps=ATTENTION_MAPS if (encoder_dir / ATTENTION_MAPS).is_file() else None,
        results=_results_rows(results), any_fewshot=any(r["protocol"].startswith("fewshot") for r in results),
        pretraining=pretraining,
    )


def write_model_card(encoder_dir: str | Path) -> ModelCard:
    """Render `README.md` of an exported encoder from `hf_ssl.json` and `eval_results.json`."""
    card = render_model_card(encoder_dir)
    card.save(Path(encoder_dir) / "README.md")
    return card


# ------------------------------------------------------------------------------------------------------- push


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str | None
    commit_oid: str | None
    files: list[str]
    card: str  # "uploaded", "kept" (the Hub's card was kept) or "none"
    skipped: list[str]  # local folders not published (e.g. features/, the evaluation's feature cache)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _encoder_dir_of(folder: Path) -> Path:
    if not folder.exists():
        raise HubError(f"{folder} does not exist; export an encoder first: hf-ssl export OUTPUT_DIR --output_dir DIR")
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory")
    if not (folder / "config.json").is_file() and (folder / "encoder" / "config.json").is_file():
        folder = folder / "encoder"  # an OUTPUT_DIR: push its encoder/
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise HubError(f"{folder} is not an exported encoder directory (needs config.json and *.safetensors); "
                       "export one with: hf-ssl export OUTPUT_DIR --output_dir DIR")
    return folder


def _pretraining_dir_of(encoder_dir: Path, explicit: str | Path | None) -> Path:
    candidates = [Path(explicit)] if explicit else [encoder_dir / PRETRAINING, encoder_dir.parent / PRETRAINING]
    for candidate in candidates:
        config = candidate / "config.json"
        if config.is_file() and (candidate / "model.safetensors").is_file():
            model_type = json.loads(config.read_text()).get("model_type", "")
            if not model_type.startswith("hf_ssl_"):
                raise HubError(f"{candidate} holds a {model_type!r} model, not an hf-ssl pretraining model")
            return candidate
    raise HubError("no pretraining model (config.json + model.safetensors) in "
                   f"{' or '.join(str(c) for c in candidates)}; export with --include_pretraining, "
                   "or name it with --pretraining_dir")


def _check_no_pickles(files: list[Path]) -> None:
    pickles = [str(f) for f in files if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise HubError(f"refusing to publish pickle files (weights must be safetensors): {', '.join(pickles)}")


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _card_bytes(encoder_dir: Path, repo_id: str, pretraining: bool) -> bytes | None:
    if (encoder_dir / "hf_ssl.json").is_file():
        return str(render_model_card(encoder_dir, repo_id=repo_id, pretraining=pretraining)).encode()
    if (encoder_dir / "README.md").is_file():
        return (encoder_dir / "README.md").read_text().replace(PLACEHOLDER, repo_id).encode()
    return None


def validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id as hf_validate

    try:
        hf_validate(repo_id)
    except HFValidationError as err:
        raise HubError(f"invalid repo id {repo_id!r}: {err}") from None
    if repo_id.count("/") > 1:
        raise HubError(f"invalid repo id {repo_id!r}: use NAME or NAMESPACE/NAME")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, overwrite_card: bool = False, include_pretraining: bool = False,
                pretraining_dir: str | Path | None = None, token: str | None = None,
                endpoint: str | None = None) -> PushResult:
    """Publish an exported encoder directory (or an OUTPUT_DIR's `encoder/`) to the Hub in one commit.

    Published: the files of the directory (weights must be safetensors: pickles are refused), with the card
    re-rendered for `repo_id`; its folders are local state (e.g. `features/`, the evaluation's feature cache) and
    stay local, except `pretraining/`.

    Creates the repo (and the branch `revision`) if needed; keeps a README.md already on the Hub unless
    `overwrite_card`; with `include_pretraining` (or `pretraining_dir`) adds the pretraining model
    (`DIR/pretraining`, else the sibling `DIR/../pretraining`) under `pretraining/` in the repo. The token comes
    from `token`, else huggingface_hub's usual places (HF_TOKEN, `hf auth login`); it is never written anywhere.
    Everything is checked before the first request, so a bad argument leaves the Hub untouched."""
    from huggingface_hub import CommitOperationAdd, HfApi

    validate_repo_id(repo_id)
    encoder_dir = _encoder_dir_of(Path(folder))
    # the files of the encoder directory itself; its folders are local state (features/: the evaluation's feature
    # cache) except pretraining/, handled below
    entries = sorted(p for p in encoder_dir.iterdir() if not p.name.startswith("."))
    uploads = {p.name: p for p in entries if p.is_file() and p.name != "README.md"}
    skipped = [f"{p.name}/" for p in entries if p.is_dir() and p.name != PRETRAINING]
    if include_pretraining or pretraining_dir is not None or (encoder_dir / PRETRAINING / "config.json").is_file():
        source = _pretraining_dir_of(encoder_dir, pretraining_dir)
        for f in _files_under(source):
            # only the model (a checkpoint dir also holds accelerate's optimizer/RNG state, which stays local)
            if f.name == "config.json" or f.name.endswith((".safetensors", ".safetensors.index.json")):
                uploads[f"{PRETRAINING}/{f.relative_to(source).as_posix()}"] = f
    _check_no_pickles(list(uploads.values()))
    pretraining = any(path.startswith(f"{PRETRAINING}/") for path in uploads)

    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(api.endpoint, repo_id) as stage:
        repo_id = stage.repo_id = _create_repo(api, repo_id, private, revision)
        card = _card_bytes(encoder_dir, repo_id, pretraining)
        branch = revision or "main"
        head = api.model_info(repo_id, revision=branch)
        card_status = "none"
        if card is not None:
            on_hub = any(s.rfilename == "README.md" for s in head.siblings or [])
            card_status = "kept" if on_hub and not overwrite_card else "uploaded"
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
                      for path, local in sorted(uploads.items())]
        if card_status == "uploaded":
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
        method = _hf_ssl_info(encoder_dir).get("method", "hf-ssl")
        stage.committing = True
        # parent_commit: the commit fails (and changes nothing) if the branch moved since the card was checked
        info = api.create_commit(
            repo_id, operations, revision=branch, parent_commit=head.sha,
            commit_message=commit_message or f"Upload {method} encoder"
            + (" and pretraining model" if pretraining else "") + " with hf-ssl")
    return PushResult(repo_id=repo_id, revision=branch, commit_url=info.commit_url, commit_oid=info.oid,
                      files=sorted([*uploads] + (["README.md"] if card_status == "uploaded" else [])), card=card_status,
                      skipped=skipped)


def _create_repo(api, repo_id: str, private: bool, revision: str | None) -> str:
    """Create the repo (NAME: in the token's namespace) and the branch `revision` if needed; the full repo id. Fails
    on a missing or rejected token and on a namespace the token cannot write to."""
    if api.token is None:
        from huggingface_hub import get_token

        if get_token() is None:
            raise HubError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN "
                           "(a token with write access)")
    if "/" not in repo_id:
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return repo_id


# ------------------------------------------------------------------------------------ push from training
# The recipe keys push_to_hub, hub_model_id, hub_private_repo, hub_revision, hub_strategy (TrainingArguments' names
# and meanings), through the same push_to_hub as `hf-ssl push`.


def hub_repo_id(recipe) -> str:
    """The recipe's hub_model_id, else (as in TrainingArguments) the name of its output_dir."""
    return recipe.hub_model_id or Path(recipe.output_dir).resolve().name


def init_hub_repo(recipe) -> str:
    """Before any training step (push_to_hub): a valid repo id, a token, and the repo (and branch) created as
    transformers' Trainer does, so that a run never trains and then fails to publish. Returns the full repo id."""
    repo_id = hub_repo_id(recipe)
    try:
        validate_repo_id(repo_id)
    except HubError as err:
        raise HubError(f"push_to_hub: {err} (hub_model_id, or the name of output_dir when it is null)") from None
    from huggingface_hub import HfApi

    api = HfApi()
    with _hub_errors(api.endpoint, repo_id):
        repo_id = _create_repo(api, repo_id, recipe.hub_private_repo, recipe.hub_revision)
    logger.info("push_to_hub: the encoder will be pushed to %s", repo_id)
    return repo_id


def push_checkpoint(recipe, checkpoint: Path) -> None:
    """hub_strategy every_save: the checkpoint's encoder (exported, with its card) as a new commit to the run's repo.
    A failure is logged and training goes on: the end-of-training push publishes the final encoder."""
    import tempfile

    repo_id = hub_repo_id(recipe)
    with tempfile.TemporaryDirectory(prefix=".hub_push_", dir=recipe.output_dir) as tmp:
        try:
            encoder_dir = export_encoder(checkpoint, Path(tmp) / "encoder")
            result = push_to_hub(encoder_dir, repo_id, private=recipe.hub_private_repo, revision=recipe.hub_revision,
                                 commit_message=f"Training in progress, {checkpoint.name.replace('_', ' ')}")
        except (ExportError, HubError) as err:
            logger.warning("push_to_hub: %s was not pushed: %s", checkpoint.name, err)
            return
    logger.info("push_to_hub: %s pushed to %s (%s)", checkpoint.name, result.repo_id, result.commit_url)


def push_trained_encoder(recipe) -> PushResult:
    """The end of a push_to_hub run: OUTPUT_DIR/encoder with its card (eval results included) as one commit; the
    run's card replaces the one on the Hub (a checkpoint's, or an earlier run's), as Trainer.push_to_hub does."""
    repo_id, output_dir = hub_repo_id(recipe), Path(recipe.output_dir)
    try:
        result = push_to_hub(output_dir / "encoder", repo_id, private=recipe.hub_private_repo,
                             revision=recipe.hub_revision, commit_message="End of training", overwrite_card=True)
    except HubError as err:
        raise HubError(f"{err}. The run is complete in {output_dir}: publish it with hf-ssl push {output_dir} "
                       f"--repo_id {repo_id}") from None
    logger.info("push_to_hub: pushed to %s (%s)", result.repo_id, result.commit_url)
    return result


def _hf_ssl_info(encoder_dir: Path) -> dict:
    try:
        return json.loads((encoder_dir / "hf_ssl.json").read_text())
    except (OSError, ValueError):
        return {}


class _hub_errors:
    """Turn huggingface_hub / network failures into a HubError with a one-line reason (no token, no traceback)."""

    def __init__(self, endpoint: str, repo_id: str):
        self.endpoint, self.repo_id, self.committing = endpoint, repo_id, False

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, HubError):
            return False
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        outcome = "the commit was refused, so nothing was published" if self.committing else "nothing was committed"
        if isinstance(err, OfflineModeIsEnabled):
            raise HubError("HF_HUB_OFFLINE is set: unset it to push to the Hub") from None
        if isinstance(err, HfHubHTTPError):
            status = err.response.status_code if err.response is not None else None
            reason = err.server_message or str(err).splitlines()[0]
            if status == 401:
                raise HubError(f"the Hub at {self.endpoint} rejected the credentials (401): log in with "
                               f"`hf auth login` or set HF_TOKEN to a token with write access; {outcome}") from None
            if status == 403:
                raise HubError(f"no write access to {self.repo_id} (403): {reason}; {outcome}") from None
            if status == 404:
                raise HubError(f"{self.repo_id} or its revision was not found on {self.endpoint} (404): {reason}; "
                               f"{outcome}") from None
            if status == 412:
                raise HubError(f"{self.repo_id} changed on the Hub while pushing (412); {outcome}: push again") \
                    from None
            raise HubError(f"the Hub at {self.endpoint} answered {status} for {self.repo_id}: {reason}; {outcome}") \
                from None
        if isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError)):
            where = "while committing; check the repo before pushing again" if self.committing else outcome
            raise HubError(f"cannot reach the Hub at {self.endpoint} ({type(err).__name__}: {err}); {where}. "
                           "Check the network, or HF_ENDPOINT") from None
        if isinstance(err, ValueError):  # e.g. "Invalid metadata in README.md"
            raise HubError(f"{self.repo_id}: {err}; {outcome}") from None
        return False
