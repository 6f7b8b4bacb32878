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
    """YAML as recipes mean it (YAML 1.2's scalars): PyYAML (YAML 1.1) reads `1e-4` as a string, and `no`, `yes`,
    `on`, `off` as booleans, where YAML 1.2 and users read a float and strings (`mixed_precision: no`, accelerate's)."""


_BOOL = "tag:yaml.org,2002:bool"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_RecipeLoader)


class RecipeError(ValueError):
    """A recipe key, value or combination that cannot work; the message names it."""


@dataclass
class PretrainingRecipe:
    """Every key of a pretraining recipe. Names follow transformers' `TrainingArguments` where one exists; each key's
    help is its field's `metadata["help"]`, which `hf-ssl train --help` shows (written nowhere else)."""

    method: str = field(metadata={"help": "The self-supervised method: dino, moco, disco or fast_moco (hf-ssl methods)."})
    output_dir: str = field(metadata={"help": "Where config.yaml, metrics.jsonl, checkpoints/, pretraining/, encoder/ "
                                              "and plots/ are written."})
    # --- data ---
    dataset_name: str = field(default="fashion_mnist", metadata={
        "help": "A 🤗 dataset: Hub name, local path (save_to_disk or imagefolder) or parquet file(s)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_split: str = field(default="train", metadata={"help": "The split to pretrain on."})
    eval_split: str | None = field(default="test", metadata={
        "help": "The labelled split of the kNN evaluation (the train split is its memory bank); null: none."})
    image_column: str | None = field(default=None, metadata={"help": "The image column; null: the first Image "
                                                                     "feature."})
    label_column: str | None = field(default=None, metadata={
        "help": "The label column of the kNN evaluation; null: the first ClassLabel column or 'label'."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the dataset (IterableDataset, sharded per process); needs max_steps."})
    image_size: int = field(default=224, metadata={
        "help": "Images are decoded to image_size x image_size (shorter side, then centre crop)."})
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406], metadata={
        "help": "Per-channel (RGB) normalisation mean, also the exported image processor's."})
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225], metadata={
        "help": "Per-channel (RGB) normalisation std, also the exported image processor's."})
    saliency_model: str | None = field(default=None, metadata={
        "help": "For views with saliency masking (RELICv2's mask_p) on a dataset without a mask column: an encoder "
                "(directory, training OUTPUT_DIR or Hub repo, e.g. a DINO run) whose feature-norm map gives each "
                "image's foreground mask, computed once and cached."})
    on_bad_image: str = field(default="error", metadata={
        "help": "A truncated or unreadable image: error (stop, naming it) or skip (listed in bad_images.txt)."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Image-decoding DataLoader workers."})
    # --- model ---
    backbone: str | None = field(default="resnet-50", metadata={
        "help": "A backbone preset of modeling.backbones.BACKBONE_PRESETS (resnet-tiny, resnet-50, vit-small-16, ...)."})
    backbone_config: dict | None = field(default=None, metadata={
        "help": "Or a full transformers backbone config (a mapping with model_type)."})
    backbone_name_or_path: str | None = field(default=None, metadata={
        "help": "Or start from a pretrained transformers vision checkpoint (Hub id or local directory)."})
    model: dict = field(default_factory=dict, metadata={
        "help": "Keyword arguments of the method's config class (hf-ssl train RECIPE.yaml --help lists them)."})
    augmentation: dict = field(default_factory=dict, metadata={
        "help": "Keyword arguments of the method's view recipe (hf-ssl train RECIPE.yaml --help lists them)."})
    # --- optimisation ---
    # Either way the global batch of a step is the same images, with the same augmentations, on any number of
    # processes (README, "Distributed training").
    per_device_train_batch_size: int = field(default=64, metadata={
        "help": "Images per process per forward (micro-)step; a step's global batch is this x processes x "
                "gradient_accumulation_steps."})
    total_train_batch_size: int | None = field(default=None, metadata={
        "help": "The global batch of one optimizer step, whatever the number of processes; per_device_train_batch_size "
                "is then derived (it must divide) and the recipe's ignored."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-steps accumulated per optimizer step."})
    num_train_epochs: float = field(default=100.0, metadata={"help": "Training length in epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Training length in optimizer steps; > 0 overrides "
                                                         "num_train_epochs."})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw, sgd or lars (SGD with momentum and layer-wise trust ratios, MoCo v3 / BYOL); the model's "
                "parameter groups say which parameters are adapted and decayed."})
    learning_rate: float = field(default=5e-4, metadata={"help": "The peak learning rate before batch scaling."})
    lr_scaling_batch_size: int | None = field(default=256, metadata={
        "help": "Peak lr = learning_rate x global batch / this; null: learning_rate as given."})
    min_learning_rate: float = field(default=1e-6, metadata={"help": "The end of the cosine lr schedule."})
    warmup_epochs: float = field(default=10.0, metadata={"help": "Linear lr warmup, in epochs."})
    weight_decay: float = field(default=0.04, metadata={"help": "Weight decay (at the start, with weight_decay_end)."})
    weight_decay_end: float | None = field(default=None, metadata={
        "help": "Cosine from weight_decay to this (DINO: 0.04 -> 0.4); null: constant."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW's beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW's beta2."})
    sgd_momentum: float = field(default=0.9, metadata={"help": "Momentum of sgd and lars."})
    lars_trust_coefficient: float = field(default=0.001, metadata={"help": "LARS's trust coefficient."})
    max_grad_norm: float | None = field(default=3.0, metadata={"help": "Gradient clipping norm; null: no clipping."})
    clip_grad_per_parameter: bool = field(default=False, metadata={
        "help": "Clip each parameter's gradient norm separately (DINO); false: the global norm."})
    ema_momentum: float = field(default=0.996, metadata={
        "help": "Teacher / momentum-encoder EMA rate at the start, cosine to ema_momentum_end."})
    ema_momentum_end: float = field(default=1.0, metadata={"help": "The EMA rate at the end of training."})
    # Global statistics make results independent of the number of processes.
    sync_batchnorm: bool = field(default=True, metadata={
        "help": "BatchNorm statistics over the global batch on several processes; false: per process (MoCo v2 "
                "then shuffles BN, as in the paper)."})
    # --- run ---
    seed: int = field(default=42, metadata={"help": "Seed of the initialisation, data order and augmentations."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (accelerate)."})
    # In float64 a run on W processes reproduces the one-process run to rounding; in float32 rounding differences
    # grow (tests/test_distributed.py).
    dtype: str = field(default="float32", metadata={
        "help": "The weights' and computation's dtype: float32, or float64 for numerical checks."})
    # The demo's resnet, 1 thread: 1.3x its forward/backward (max-pooling alone 10x); the saved weights are the same
    # tensors in the usual layout.
    channels_last: bool = field(default=False, metadata={
        "help": "Convolution weights and views in channels-last memory format: faster for CNNs with oneDNN on CPU "
                "and with mixed precision on GPU."})
    logging_steps: int = field(default=10, metadata={"help": "Write a metrics.jsonl record every N optimizer steps."})
    checkpointing_steps: int | None = field(default=None, metadata={
        "help": "Save checkpoints/step_N every N optimizer steps; null: none."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "A checkpoints/step_N directory, or latest."})
    with_tracking: bool = field(default=False, metadata={"help": "Also log to the trackers of report_to."})
    report_to: str = field(default="all", metadata={"help": "accelerate tracker (tensorboard, wandb, ...) or all."})
    do_eval: bool = field(default=True, metadata={"help": "kNN on (train_split, eval_split) at the end of training."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the kNN evaluation."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Temperature of the weighted kNN vote."})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of feature extraction."})
    eval_steps: int | None = field(default=None, metadata={
        "help": "Online kNN every N optimizer steps (on eval_subset_size images); null: off."})
    eval_subset_size: int | None = field(default=5000, metadata={
        "help": "Online kNN: seeded random subsets of at most N train (memory bank) and N eval_split images; "
                "null: the full splits."})
    # --- Hub (TrainingArguments' names and meanings; the token comes from HF_TOKEN or `hf auth login`, never from
    # the recipe, so that it is never written to config.yaml) ---
    push_to_hub: bool = field(default=False, metadata={
        "help": "Publish the encoder and its card to the Hub after the final evaluation (checked before training)."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "The repo: NAMESPACE/NAME, or NAME in your namespace; null: the name of output_dir."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repo private (an existing one keeps "
                                                                    "its visibility)."})
    hub_revision: str | None = field(default=None, metadata={"help": "The branch to push to (created if needed); "
                                                                     "null: main."})
    hub_strategy: str = field(default="end", metadata={
        "help": "end: push after the final evaluation; every_save: also push each checkpoint's encoder as a commit."})
    # --- reliability ---
    nan_policy: str = field(default="stop", metadata={
        "help": "A NaN/Inf loss: stop (naming the step and the last good checkpoint) or skip the step (no optimizer "
                "step, no EMA, buffers restored; counted as skipped_steps)."})
    nan_max_consecutive_skips: int = field(default=10, metadata={
        "help": "With nan_policy skip: stop after this many skipped steps in a row."})
    # embedding_std: std over the batch of L2-normalised embeddings, 1/sqrt(d) when spread out, 0 when collapsed.
    collapse_std_fraction: float | None = field(default=0.1, metadata={
        "help": "Warn when the logged embedding_std falls below this / sqrt(d); null: no warning."})

    def __post_init__(self):
        choices = {"optimizer": ("adamw", "sgd", "lars"), "mixed_precision": ("no", "fp16", "bf16"),
                   "dtype": ("float32", "float64"), "on_bad_image": ("skip", "error"), "nan_policy": ("stop", "skip"),
                   "hub_strategy": ("end", "every_save")}
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
        if self.streaming and self.saliency_model:
            raise RecipeError("saliency_model needs a map-style dataset (masks are computed once per image and "
                              "cached): set streaming: false, or give the dataset a mask column (model.mask_column)")
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


def read_recipe_data(path: str | Path | None, overrides: list[str] | dict | None = None) -> dict:
    """The YAML recipe as a mapping with the overrides merged in, not yet validated."""
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
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | dict | None = None) -> PretrainingRecipe:
    """Read a YAML recipe, apply overrides, validate every key and value."""
    data = read_recipe_data(path, overrides)
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


# ------------------------------------------------------------------------------------------------ key docs
# What `hf-ssl train [RECIPE.yaml] --help` lists. The help of a key is written once: a shared key's in its field's
# metadata, a method's model key in its config class's docstring (`Args:`), a view key in its view recipe's docstring.


@dataclass(frozen=True)
class KeyDoc:
    """One recipe key: dotted name (`model.head_config.out_dim`), type, default (MISSING: required), help, and the
    value a recipe gives it (MISSING: none, or the default)."""

    name: str
    type: str
    default: object
    help: str
    value: object = dataclasses.MISSING


def _type_name(annotation) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _given(data: dict, dotted: str, default):
    """The value `data` gives the key `dotted`, or MISSING when it gives none or the default."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return dataclasses.MISSING
        data = data[part]
    as_list = list(default) if isinstance(default, tuple) else default  # YAML has lists, signatures tuples
    return dataclasses.MISSING if data == as_list else data


def shared_key_docs(data: dict | None = None) -> list[KeyDoc]:
    """Every key of `PretrainingRecipe`, with the value `data` (a recipe mapping) gives it."""
    hints = typing.get_type_hints(PretrainingRecipe)
    docs = []
    for f in dataclasses.fields(PretrainingRecipe):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        given = _given(data or {}, f.name, default) if f.name not in ("model", "augmentation") else dataclasses.MISSING
        docs.append(KeyDoc(f.name, _type_name(hints[f.name]), default, f.metadata.get("help", ""), given))
    return docs


def docstring_args(cls) -> dict[str, str]:
    """The help of each keyword argument in the `Args:` section of `cls`'s docstring (transformers' style: `name
    (`type`, defaults to x): text`, several names may share an entry), as one line."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's entry overrides its base's
        helps.update(_own_docstring_args(klass.__dict__.get("__doc__")))
    return helps


def _own_docstring_args(doc: str | None) -> dict[str, str]:
    doc = inspect.cleandoc(doc or "")
    if "\nArgs:\n" not in doc:
        return {}
    entries: list[list[str]] = []
    for line in doc.split("\nArgs:\n", 1)[1].splitlines():
        if not line.strip():
            break
        indent = len(line) - len(line.lstrip())
        if not entries or indent <= entries[0][0]:
            entries.append([indent, line.strip()])
        else:
            entries[-1][1] += " " + line.strip()
    helps, pending = {}, ""
    for _, text in entries:
        text = pending + text
        names, sep, rest = _split_outside_brackets(text)
        if not sep:  # names continue on the next entry line
            pending = text + " "
            continue
        pending = ""
        for name in re.sub(r"\([^)]*\)", "", names).split(","):
            if name.strip().isidentifier():
                helps[name.strip()] = rest.strip()
    return helps


def _split_outside_brackets(text: str) -> tuple[str, str, str]:
    """`text` split at its first ": " that is outside parentheses and backticks."""
    depth, quoted = 0, False
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        quoted ^= char == "`"
        if char == ":" and depth == 0 and not quoted and text[i + 1:i + 2] in (" ", ""):
            return text[:i], ":", text[i + 1:]
    return text, "", ""


def class_key_docs(cls, prefix: str, given: dict, defaults=None, skip=(), from_backbone=()) -> list[KeyDoc]:
    """The keyword arguments of `cls(...)` as keys `prefix.name`; defaults from the attributes of `defaults` (an
    instance, where the signature's None stands for a computed default) else the signature; help from the docstring."""
    helps = docstring_args(cls)
    docs = []
    for name, param in inspect.signature(cls).parameters.items():
        if name in skip or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        default = getattr(defaults, name, param.default) if defaults is not None else param.default
        if name in from_backbone:
            default = "the backbone's feature size"
        docs.append(KeyDoc(f"{prefix}.{name}", _type_name(param.annotation), default, helps.get(name, ""),
                           _given(given, name, default)))
    return docs


@dataclass(frozen=True)
class KeySection:
    """A group of keys in `hf-ssl train --help`."""

    title: str
    description: str | None
    keys: list[KeyDoc]


def method_key_docs(method: str, data: dict) -> list[KeySection]:
    """The `model:` keys of `method`'s config class (and of its head sub-configs), and the `augmentation:` keys of its
    view recipe; values from the recipe mapping `data`."""
    from modeling import METHODS

    from .augment import VIEW_RECIPES

    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    config_cls = METHODS[method].config_class
    model = data.get("model") or {}
    scalars = {k: v for k, v in model.items() if k not in config_cls.sub_configs}
    helps = docstring_args(config_cls)
    sections = [KeySection(f"model: keys of {config_cls.__name__}", None, class_key_docs(
        config_cls, "model", model, _config_or_none(config_cls), skip=("backbone_config", *config_cls.sub_configs)))]
    for key, sub_cls in config_cls.sub_configs.items():
        # A head's defaults depend on other keys (MoCo's version), so they come from a config built with the recipe's
        # non-head keys; a head the method refuses there (MoCo v2's predictor, DisCo's) is not listed.
        built = _config_or_none(config_cls, **scalars, **{key: {}}) or _config_or_none(config_cls, **{key: {}})
        if key == "backbone_config" or built is None:
            continue
        sections.append(KeySection(f"model.{key}: keys of {sub_cls.__name__}", helps.get(key), class_key_docs(
            sub_cls, f"model.{key}", model.get(key) or {}, getattr(built, key),
            from_backbone=("in_dim",) if key in getattr(config_cls, "backbone_feature_configs", ()) else ())))
    views = VIEW_RECIPES[METHODS[method].views]
    sections.append(KeySection(f"augmentation: keys of the {METHODS[method].views} view recipe ({views.__name__})",
                               None, class_key_docs(views, "augmentation", data.get("augmentation") or {},
                                                    skip=("mean", "std"))))
    return sections


def _config_or_none(config_cls, **kwargs):
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError):  # e.g. a recipe's invalid value: its defaults are then the class's
        return None
