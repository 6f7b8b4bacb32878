"""Training recipes: one dataclass of every key a recipe may set, read from YAML plus `--key value` overrides.

Unknown keys are refused with the closest valid key; method-specific model keys (`model:`) and view keys
(`augmentation:`) are checked against the method's config class and view recipe.
"""
import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class _RecipeLoader(yaml.SafeLoader):
    """YAML as recipes mean it: PyYAML (YAML 1.1) reads `1e-4` as a string, YAML 1.2 and users as a float."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_RecipeLoader)


class RecipeError(ValueError):
    """A recipe key, value or combination that cannot work; the message names it."""


@dataclass
class PretrainingRecipe:
    """Every key of a pretraining recipe. Names follow transformers' `TrainingArguments` where one exists."""

    method: str
    output_dir: str
    # --- data ---
    dataset_name: str = "fashion_mnist"
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    image_column: str | None = None
    label_column: str | None = None
    streaming: bool = False
    image_size: int = 224  # images are decoded to image_size x image_size (shorter side, then centre crop)
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    on_bad_image: str = "error"
    dataloader_num_workers: int = 2
    # --- model ---
    backbone: str | None = "resnet-50"  # a preset of modeling.backbones.BACKBONE_PRESETS
    backbone_config: dict | None = None  # or a full transformers config (with model_type)
    backbone_name_or_path: str | None = None  # or start from a pretrained transformers checkpoint
    model: dict = field(default_factory=dict)  # keyword arguments of the method's config class
    augmentation: dict = field(default_factory=dict)  # keyword arguments of the method's view recipe
    # --- optimisation ---
    # Batch size. per_device_train_batch_size: images per process per forward (micro-)step, as in transformers; the
    # global batch of one optimizer step is per_device_train_batch_size x processes x gradient_accumulation_steps.
    # total_train_batch_size (optional): that global batch, fixed by the recipe whatever the number of processes;
    # per_device_train_batch_size is then derived (total / (processes x accumulation), which must divide) and the
    # recipe's per_device_train_batch_size is ignored. Either way the global batch of a step is the same images,
    # with the same augmentations, on any number of processes (README, "Distributed training").
    per_device_train_batch_size: int = 64
    total_train_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 100.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    # adamw | sgd | lars (SGD with momentum and layer-wise trust ratios, as in MoCo v3 / BYOL; the model's
    # parameter groups say which parameters are adapted and decayed: by default not biases and norms)
    optimizer: str = "adamw"
    learning_rate: float = 5e-4
    lr_scaling_batch_size: int | None = 256  # peak lr = learning_rate * global batch / this (None: as given)
    min_learning_rate: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float | None = None  # cosine from weight_decay to this (DINO: 0.04 -> 0.4); null: constant
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    sgd_momentum: float = 0.9  # sgd and lars
    lars_trust_coefficient: float = 0.001
    max_grad_norm: float | None = 3.0
    clip_grad_per_parameter: bool = False  # true: each parameter's gradient norm separately (DINO); false: global
    ema_momentum: float = 0.996  # teacher / momentum-encoder EMA rate, cosine to ema_momentum_end
    ema_momentum_end: float = 1.0
    # BatchNorm statistics over the global batch (SyncBatchNorm) when training on several processes, so that results
    # do not depend on the number of processes. false: per-process statistics (MoCo v2 then uses shuffle-BN, as in
    # the paper). No effect on one process or on LayerNorm-only models (ViT).
    sync_batchnorm: bool = True
    # --- run ---
    seed: int = 42
    mixed_precision: str = "no"  # no | fp16 | bf16
    # The model's weights and computation: float32, or float64 for numerical checks (in float64 a run on W processes
    # reproduces the one-process run to rounding; in float32 rounding differences grow, see tests/test_distributed.py).
    dtype: str = "float32"  # float32 | float64
    # Convolution weights and views in channels-last (NHWC) memory format: faster for CNN backbones with oneDNN on CPU
    # (the demo's resnet, 1 thread: 1.3x its forward/backward; max-pooling alone 10x) and with mixed precision on GPU.
    # The saved weights are the same tensors in the usual layout.
    channels_last: bool = False
    logging_steps: int = 10
    checkpointing_steps: int | None = None
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint dir or "latest"
    with_tracking: bool = False
    report_to: str = "all"
    do_eval: bool = True  # kNN on (train_split, eval_split) at the end of training
    knn_k: int = 20
    knn_temperature: float = 0.07
    eval_batch_size: int = 256
    eval_steps: int | None = None  # online kNN (knn_k, knn_temperature) every N optimizer steps; None: off
    eval_subset_size: int | None = 5000  # online kNN: seeded random subsets of at most N train (memory bank) and
    # N eval_split (query) images; None: the full splits
    # --- reliability ---
    # A non-finite (NaN/Inf) loss. stop: raise, naming the step and the last good checkpoint. skip: the optimizer
    # step is skipped (gradients zeroed, no optimizer step, no EMA update, buffers such as DINO's center and
    # BatchNorm statistics restored to their values before the step), it is counted as `skipped_steps` in
    # metrics.jsonl, and training goes on; after nan_max_consecutive_skips skipped steps in a row it stops as
    # under stop.
    nan_policy: str = "stop"
    nan_max_consecutive_skips: int = 10
    # Collapse monitor: a warning is logged when the logged embedding_std (std over the batch of L2-normalised
    # embeddings, 1/sqrt(d) when they are spread out, 0 when collapsed) falls below
    # collapse_std_fraction / sqrt(d); null: no warning (embedding_std is logged regardless).
    collapse_std_fraction: float | None = 0.1

    def __post_init__(self):
        choices = {"optimizer": ("adamw", "sgd", "lars"), "mixed_precision": ("no", "fp16", "bf16"),
                   "dtype": ("float32", "float64"), "on_bad_image": ("skip", "error"), "nan_policy": ("stop", "skip")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise RecipeError(f"{key}={getattr(self, key)!r} is not one of {list(valid)}")
        if self.dtype == "float64" and self.mixed_precision != "no":
            raise RecipeError(f"dtype=float64 trains in float64: mixed_precision must be 'no', got "
                              f"{self.mixed_precision!r}")
        positive = ("image_size", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                    "eval_batch_size", "knn_k", "learning_rate", "knn_temperature", "lars_trust_coefficient",
                    "nan_max_consecutive_skips")
        for key in positive:
            if getattr(self, key) <= 0:
                raise RecipeError(f"{key} must be > 0, got {getattr(self, key)}")
        non_negative = ("min_learning_rate", "warmup_epochs", "weight_decay", "dataloader_num_workers", "seed")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise RecipeError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.weight_decay_end is not None and self.weight_decay_end < 0:
            raise RecipeError(f"weight_decay_end must be >= 0 or null, got {self.weight_decay_end}")
        for key in ("max_grad_norm", "lr_scaling_batch_size", "save_total_limit", "collapse_std_fraction",
                    "total_train_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise RecipeError(f"{key} must be > 0 or null, got {getattr(self, key)}")
        for key in ("adam_beta1", "adam_beta2", "sgd_momentum"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise RecipeError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise RecipeError("set num_train_epochs > 0 or max_steps > 0")
        if self.streaming and self.max_steps <= 0:
            raise RecipeError("streaming: set max_steps > 0 (a streamed dataset is read until max_steps optimizer steps; "
                              "num_train_epochs is not used)")
        if self.checkpointing_steps is not None and self.checkpointing_steps <= 0:
            raise RecipeError(f"checkpointing_steps must be > 0 or null, got {self.checkpointing_steps}")
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != 3:  # images are decoded to RGB
                raise RecipeError(f"{key} needs one value per RGB channel (3), got {getattr(self, key)}")
        if any(s <= 0 for s in self.image_std):
            raise RecipeError(f"image_std values must be > 0, got {self.image_std}")
        for key in ("ema_momentum", "ema_momentum_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise RecipeError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("eval_steps", "eval_subset_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise RecipeError(f"{key} must be > 0 or null, got {getattr(self, key)}")
        if self.eval_steps is not None and not self.eval_split:
            raise RecipeError("eval_steps (online kNN) needs an eval_split with labels")
        sources = [k for k in ("backbone_config", "backbone_name_or_path") if getattr(self, k) is not None]
        if len(sources) > 1:
            raise RecipeError(f"give only one of backbone_config and backbone_name_or_path, got {sources}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


# Keys that moved from the shared recipe into a method's config (`model:`): a recipe still using the old place is
# refused with the new one, never silently ignored.
MOVED_KEYS = {
    "warmup_teacher_temperature": "model.warmup_teacher_temperature (DINO's config)",
    "teacher_temperature": "model.teacher_temperature (DINO's config)",
    "warmup_teacher_temperature_epochs": "model.warmup_teacher_temperature_epochs (DINO's config)",
}


def check_keys(given: dict, valid, where: str) -> None:
    """Refuse keys of `given` that are not in `valid`, naming each with its closest valid key."""
    unknown = [k for k in given if k not in valid]
    if unknown:
        hints = "; ".join(f"{k!r}{_closest(k, valid)}" for k in unknown)
        raise RecipeError(f"unknown key(s) in {where}: {hints}")


def init_keys(cls) -> list[str]:
    """The keyword arguments that `cls(...)` accepts by name."""
    return [n for n, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_type(key: str, value, annotation) -> None:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
    else:
        options = (annotation,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if base in (str, bool, list, dict) and isinstance(value, base):
            return
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise RecipeError(f"{key}={value!r} has the wrong type: expected {names}")


def _parse_value(text: str):
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> dict:
    """`["--a", "1", "--model.head_config.out_dim", "4096", "--flag=true"]` -> nested dict with YAML-typed values."""
    overrides: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise RecipeError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise RecipeError(f"{arg} needs a value")
            key, text = arg[2:], args[i + 1]
            i += 2
        target = overrides
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = _parse_value(text)
    return overrides


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(path: str | Path | None, overrides: list[str] | dict | None = None) -> PretrainingRecipe:
    """Read a YAML recipe, apply overrides, validate every key and value."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        data = _yaml_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path} must hold a mapping of recipe keys, got {type(data).__name__}")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = _merge(data, extra)
    moved = [k for k in data if k in MOVED_KEYS]
    if moved:
        raise RecipeError("; ".join(f"recipe key {k!r} moved to {MOVED_KEYS[k]}" for k in moved))
    fields = {f.name: f for f in dataclasses.fields(PretrainingRecipe)}
    check_keys(data, fields, "the recipe")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and n not in data]
    if missing:
        raise RecipeError(f"the recipe must set {missing}")
    hints = typing.get_type_hints(PretrainingRecipe)
    for key, value in data.items():
        _check_type(key, value, hints[key])
    return PretrainingRecipe(**data)


def save_recipe(recipe: PretrainingRecipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
