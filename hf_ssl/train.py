"""The one training loop, for every method (accelerate's example-script style).

    hf-ssl train recipes/dino/fashion-mnist-resnet-tiny.yaml --output_dir runs/dino

Per optimizer step: schedules are evaluated from the step, views are drawn on the device from a seed fixed by
(seed, step, micro-batch) for the global batch (each process applies its rows), the method model returns `loss`,
gradients are clipped, the optimizer steps, and only then does the model update its EMA state. Everything a resume
needs is either in the accelerate checkpoint (weights incl. buffers such as DINO's center, optimizer, RNG, and for
streaming the data position) or a pure function of the step.

Process-count independence: the global batch of a micro-step is the same images in the same order on any number of
processes (map-style data: accelerate's `split_batches=True` on a loader of the global micro-batch; each process
gets its contiguous slice, in rank order), their views are the same (drawn for the global batch, see
`augment.SeededViews`), BatchNorm statistics are global (`sync_batchnorm`), and losses that couple samples use the
global batch (modeling/distributed.py). So W processes x B images per process follow the run of 1 process x W*B, up to
rounding: in float32 the other summation orders can flip a ReLU whose input is within rounding of 0, and the runs then
separate; with `dtype: float64` they agree (tests/test_distributed.py).
"""
import json
import logging
import math
import os
import pickle
import shutil
import time
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig

from modeling import METHODS
from modeling.backbones import (backbone_config_from_preset, backbone_family, build_backbone, feature_dim,
                                load_backbone)

from . import schedules
from .augment import build_views
from .data import DataError, ImageDecoder, build_dataloader, label_column_of, load_image_dataset, num_examples
from .recipe import PretrainingRecipe, RecipeError, check_keys, init_keys, save_recipe

logger = logging.getLogger(__name__)


DATA_STATE_FILE = "data_state.json"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where the last good checkpoint is."""


# ----------------------------------------------------------------------------------------------- model


def backbone_config_of(recipe: PretrainingRecipe):
    if recipe.backbone_name_or_path is not None:
        try:
            return AutoConfig.from_pretrained(recipe.backbone_name_or_path)
        except OSError as err:
            raise RecipeError(f"backbone_name_or_path: {err}") from None
    if recipe.backbone_config is not None:
        if "model_type" not in recipe.backbone_config:
            raise RecipeError("backbone_config needs a model_type (e.g. resnet, vit, convnext)")
        try:
            backbone_family(recipe.backbone_config["model_type"])
        except ValueError as err:
            raise RecipeError(f"backbone_config: {err}") from None
        return AutoConfig.for_model(**recipe.backbone_config)
    if recipe.backbone is None:
        raise RecipeError("set one of backbone, backbone_config or backbone_name_or_path")
    try:
        return backbone_config_from_preset(recipe.backbone)
    except ValueError as err:
        raise RecipeError(str(err)) from None


def build_model(recipe: PretrainingRecipe):
    """The method's `XForPreTraining`, with head input sizes matched to the backbone's pooled feature, in the
    recipe's `dtype`."""
    if recipe.method not in METHODS:
        raise RecipeError(f"unknown method {recipe.method!r}; valid methods: {', '.join(METHODS)}")
    method = METHODS[recipe.method]
    config_cls = method.config_class
    model_kwargs = dict(recipe.model)
    check_keys(model_kwargs, [k for k in init_keys(config_cls) if k not in ("backbone_config", "kwargs")],
               f"model: (keys of {config_cls.__name__})")
    backbone_config = backbone_config_of(recipe)
    try:
        probe = (load_backbone(recipe.backbone_name_or_path) if recipe.backbone_name_or_path
                 else build_backbone(backbone_config))
    except ValueError as err:  # not a supported family, or not a backbone checkpoint
        raise RecipeError(f"backbone_name_or_path: {err}") from None
    dim = feature_dim(probe)
    feature_configs = getattr(config_cls, "backbone_feature_configs", ())
    for key, sub_cls in config_cls.sub_configs.items():
        if key == "backbone_config" or (model_kwargs.get(key) is None and key not in feature_configs):
            continue  # an optional head left out: the config's default (e.g. MoCo v2 has no predictor)
        sub_kwargs = dict(model_kwargs.get(key) or {})
        check_keys(sub_kwargs, [k for k in init_keys(sub_cls) if k != "kwargs"], f"model.{key}")
        if key in feature_configs:
            sub_kwargs.setdefault("in_dim", dim)
        model_kwargs[key] = sub_kwargs
    try:
        # a bad value or combination of model keys, or (DisCo) a teacher that cannot be used
        config = config_cls(backbone_config=backbone_config, **model_kwargs)
        model = method.model_class(config)
    except ValueError as err:
        raise RecipeError(f"model ({recipe.method}): {err}") from None
    if recipe.backbone_name_or_path:
        model.load_backbone_weights(probe.state_dict())
    model = model.to(getattr(torch, recipe.dtype))
    return model.to(memory_format=torch.channels_last) if recipe.channels_last else model


def model_inputs(views: dict[str, torch.Tensor], recipe: PretrainingRecipe) -> dict[str, torch.Tensor]:
    """The float32 views as the model takes them: in the recipe's `dtype`, image batches channels-last when the
    recipe's `channels_last` says so (like the model's weights, see `build_model`)."""
    dtype, layout = getattr(torch, recipe.dtype), torch.channels_last if recipe.channels_last else torch.preserve_format
    return {name: view.to(dtype, memory_format=layout if view.dim() == 4 else torch.preserve_format)
            for name, view in views.items()}


def parameter_groups(model: torch.nn.Module) -> list[dict]:
    """Weights decay; biases and norm parameters (1-d) do not (DINO, MoCo v3)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "apply_weight_decay": True}, {"params": no_decay, "apply_weight_decay": False}]


def build_optimizer(model, recipe: PretrainingRecipe):
    groups = parameter_groups(model)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(recipe.adam_beta1, recipe.adam_beta2))
    return torch.optim.SGD(groups, lr=recipe.learning_rate, momentum=recipe.sgd_momentum)


# ------------------------------------------------------------------------------------------- schedules


def schedule_values(recipe: PretrainingRecipe, step: int, total_steps: int, steps_per_epoch: int,
                    global_batch_size: int) -> dict[str, float]:
    """Every scheduled value at optimizer step `step` (pure)."""
    peak_lr = recipe.learning_rate
    if recipe.lr_scaling_batch_size:
        peak_lr = recipe.learning_rate * global_batch_size / recipe.lr_scaling_batch_size
    warmup = min(int(recipe.warmup_epochs * steps_per_epoch), total_steps)
    tt_warmup = int(recipe.warmup_teacher_temperature_epochs * steps_per_epoch)
    return {
        "lr": schedules.warmup_cosine(step, total_steps, warmup, peak_lr, recipe.min_learning_rate),
        "weight_decay": schedules.cosine(step, total_steps, recipe.weight_decay, recipe.weight_decay_end),
        "ema_momentum": schedules.cosine(step, total_steps, recipe.ema_momentum, recipe.ema_momentum_end),
        "teacher_temperature": schedules.linear_warmup_then_constant(
            step, tt_warmup, recipe.warmup_teacher_temperature, recipe.teacher_temperature),
    }


def view_seed(seed: int, step: int, micro_step: int) -> int:
    """The seed of one global micro-batch's augmentations: a pure function, so a resumed run draws the same views.
    It is the same on every process: each draws the augmentation parameters of the whole global batch and applies
    those of its own rows, so the views do not depend on the number of processes."""
    return ((seed * 1_000_003 + step) * 1_009 + micro_step) % (2**63 - 1)


def per_device_batch_size(recipe: PretrainingRecipe, num_processes: int) -> int:
    """Images per process per micro-step: the recipe's, or `total_train_batch_size` / (processes x accumulation)."""
    if recipe.total_train_batch_size is None:
        return recipe.per_device_train_batch_size
    share = num_processes * recipe.gradient_accumulation_steps
    if recipe.total_train_batch_size % share:
        raise RecipeError(f"total_train_batch_size={recipe.total_train_batch_size} is not divisible by "
                          f"{num_processes} processes x gradient_accumulation_steps="
                          f"{recipe.gradient_accumulation_steps}")
    return recipe.total_train_batch_size // share


def convert_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`sync_batchnorm`: every BatchNorm of the model normalises with the statistics of the global batch: torch's
    SyncBatchNorm on CUDA, modeling.distributed.SyncBatchNorm (all-reduce with gradient, gloo) elsewhere."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from modeling.distributed import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def synchronized_batches(accelerator: Accelerator, batches, move_to_device: bool):
    """Yields `(batch, sizes)` while every process has a batch; `sizes` are the batch sizes of all processes, in
    rank order (they differ only after bad images were skipped). One process running out of data ends the epoch
    for all of them (a streamed dataset can give the processes slightly different numbers of batches)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if batch is not None and move_to_device:
            batch["pixel_values"] = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        n = -1 if batch is None else batch["pixel_values"].shape[0]
        if accelerator.num_processes == 1:
            sizes = [n]
        else:
            sizes = accelerator.gather(torch.tensor([n], device=accelerator.device)).tolist()
        if min(sizes) < 0:
            if batch is not None:
                logger.warning("another process ran out of data: this process's remaining batches of the epoch "
                               "are not used")
            return
        yield batch, sizes


def clip_gradients(parameters, max_norm: float, per_parameter: bool) -> None:
    params = [p for p in parameters if p.grad is not None]
    if per_parameter:
        for p in params:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


# ----------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints `checkpoints/step_N`, oldest first (`.tmp_step_N` are unfinished saves)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_checkpoint(output_dir: Path, value: str) -> Path:
    if value == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise TrainingError(f"--resume_from_checkpoint latest: no checkpoint under {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(value)
    if not (path.is_dir() and path.name.startswith("step_") and path.name[5:].isdigit()):
        raise TrainingError(f"--resume_from_checkpoint {value}: not a checkpoint directory (checkpoints/step_N)")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, save_total_limit: int | None,
                    model_config, data_state: dict | None = None) -> Path:
    """accelerate state written to a temporary dir, then renamed: a kill during the save keeps the old ones."""
    root = output_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # config.json beside accelerate's model.safetensors: the checkpoint loads with from_pretrained / export.
        model_config.save_pretrained(tmp)
        if data_state is not None:  # streaming: where the data stream is (plain JSON, no pickle)
            (tmp / DATA_STATE_FILE).write_text(json.dumps(data_state))
        if final.exists():  # renamed away first: a kill at any point leaves a complete step_N or none
            os.replace(final, root / f".tmp_old_step_{step}")
        os.replace(tmp, final)
        shutil.rmtree(root / f".tmp_old_step_{step}", ignore_errors=True)
        if save_total_limit:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                doomed = root / f".tmp_deleting_{old.name}"  # never a half-deleted step_N
                os.replace(old, doomed)
                shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final


def required_checkpoint_files(accelerator: Accelerator) -> list[str]:
    """What a resume needs from `accelerator.save_state` (one model, one optimizer, safetensors weights)."""
    files = ["model.safetensors", "optimizer.bin", f"random_states_{accelerator.process_index}.pkl"]
    if accelerator.scaler is not None:
        files.append("scaler.pt")
    return files


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    """`accelerator.load_state`, made strict: every piece of state must be there and really be restored.

    accelerate loads the weights from model.safetensors, and optimizer.bin / RNG states with
    `torch.load(weights_only=True)` (a pickle that would run code is refused); but it catches any failure to
    restore the RNG states and goes on with a log line. Here a missing file, a refused pickle, or RNG states that
    are not the saved ones raise a TrainingError naming the piece.
    """
    missing = [name for name in required_checkpoint_files(accelerator) if not (checkpoint / name).is_file()]
    if missing:
        raise TrainingError(f"cannot resume from {checkpoint}: missing {', '.join(missing)} "
                            "(weights must be model.safetensors; optimizer and RNG states are required)")
    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as err:
        culprit = next((name for name in refused_state_files(checkpoint)), "a state file")
        raise TrainingError(f"cannot resume from {checkpoint}: {culprit} holds more than tensors and plain data "
                            f"(a pickle that could run code) and was refused (weights_only=True): "
                            f"{str(err).splitlines()[0]}") from None
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise TrainingError(f"cannot resume from {checkpoint}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None
    check_rng_restored(checkpoint / f"random_states_{accelerator.process_index}.pkl")


def refused_state_files(checkpoint: Path) -> list[str]:
    """The pickled state files of `checkpoint` that `torch.load(weights_only=True)` refuses (an error path)."""
    from accelerate.utils import load as accelerate_load

    refused = []
    for path in sorted(checkpoint.iterdir()):
        if path.suffix in (".bin", ".pkl", ".pt"):
            try:
                accelerate_load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                refused.append(path.name)
    return refused


def check_rng_restored(path: Path) -> None:
    """TrainingError unless the global RNGs (python, numpy, torch, CUDA) now hold the states saved in `path`."""
    import random

    import numpy as np
    from accelerate.utils import load as accelerate_load

    try:
        saved = accelerate_load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any failure to read the file means the RNG was not restored
        raise TrainingError(f"cannot resume: the RNG states in {path} cannot be read "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    checks = {
        "python random": lambda: random.getstate() == saved["random_state"],
        "numpy": lambda: all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), saved["numpy_random_seed"])),
        "torch": lambda: torch.equal(torch.get_rng_state(), saved["torch_manual_seed"]),
    }
    if torch.cuda.is_available():
        checks["CUDA"] = lambda: all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(),
                                                                      saved["torch_cuda_manual_seed"]))
    for name, restored in checks.items():
        try:
            ok = restored()
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise TrainingError(f"cannot resume: the {name} RNG state saved in {path} was not restored "
                                "(accelerate's load_state skips RNG states it cannot load); refusing to continue "
                                "with a different random stream")


def supersede_after(output_dir: Path, step: int) -> None:
    """Start (or restart) the run's history at `step` (0: a fresh run in a used OUTPUT_DIR).

    What a previous run wrote about later steps belongs to a timeline that is being replaced: checkpoints
    `step_N` with N > step move to `checkpoints/superseded/` (so `latest` cannot pick them), metrics.jsonl
    records of later steps (and a line cut short by a kill) move to `metrics.superseded.jsonl`. Nothing is
    deleted except unfinished saves (`.tmp_*`). metrics.jsonl then holds each step at most once, in order.
    """
    root = output_dir / "checkpoints"
    if root.is_dir():
        for tmp in root.glob(".tmp_*"):
            logger.warning("removing %s, an unfinished checkpoint save", tmp)
            shutil.rmtree(tmp)
        later = [p for p in checkpoint_dirs(output_dir) if int(p.name[5:]) > step]
        for path in later:
            target, n = root / "superseded" / path.name, 1
            while target.exists():  # superseded before, by an earlier restart: keep both
                target, n = root / "superseded" / f"{path.name}.{n}", n + 1
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            logger.warning("moved %s to %s: training restarts at step %d", path, target, step)
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    kept, superseded = [], []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and record.get("step", 0) <= step
        except json.JSONDecodeError:
            record, keep = {"unreadable_line": line}, False
        if keep:
            kept.append(line)
        else:
            superseded.append(json.dumps({**record, "superseded_at_restart_from_step": step}))
    if superseded:
        with (output_dir / "metrics.superseded.jsonl").open("a") as f:
            f.write("".join(line + "\n" for line in superseded))
        tmp = output_dir / "metrics.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)
        logger.warning("moved %d metrics.jsonl records after step %d to metrics.superseded.jsonl",
                       len(superseded), step)


# ------------------------------------------------------------------------------------------ monitoring


def loss_is_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all of them must take the same branch)."""
    finite = torch.isfinite(loss.detach()).reshape(1)
    return bool(accelerator.gather(finite).all())


class CollapseMonitor:
    """Logs a warning when the logged `embedding_std` falls below `fraction / sqrt(dim)` (and when it recovers).

    The std over a batch of L2-normalised d-dim embeddings is about 1/sqrt(d) when they are spread out and 0
    when every image gets the same embedding (collapse). DINO also logs `teacher_entropy` (collapse: 0 or ln K).
    """

    def __init__(self, fraction: float | None, dim: int):
        self.threshold = None if fraction is None else fraction / math.sqrt(dim)
        self.fraction, self.dim = fraction, dim
        self.collapsed = False

    def check(self, record: dict) -> bool:
        """Whether `record` shows a collapse; warns on the way down, logs on the way back up."""
        std = record.get("embedding_std")
        if self.threshold is None or std is None:
            return False
        collapsed = std < self.threshold
        if collapsed and not self.collapsed:
            extra = f", teacher_entropy {record['teacher_entropy']:.4g}" if "teacher_entropy" in record else ""
            logger.warning("representation collapse at step %d: embedding_std %.4g < collapse_std_fraction %g / "
                           "sqrt(%d) = %.4g%s", record["step"], std, self.fraction, self.dim, self.threshold, extra)
        elif self.collapsed and not collapsed:
            logger.warning("embedding_std recovered at step %d: %.4g >= %.4g", record["step"], std, self.threshold)
        self.collapsed = collapsed
        return collapsed


class BadImageLog:
    """OUTPUT_DIR/bad_images.txt: one `row/file<TAB>reason` line per bad image, each listed once, written as
    they are found (a killed run keeps its list; a resumed run adds to it, a fresh run starts it anew)."""

    def __init__(self, path: Path, is_main_process: bool, resumed: bool):
        self.path, self.write = path, is_main_process
        self.seen: set[str] = set()
        if is_main_process and path.is_file():
            if resumed:
                self.seen.update(line for line in path.read_text().splitlines() if line)
            else:
                path.unlink()

    @property
    def count(self) -> int:
        return len(self.seen)

    def add(self, entries: list[str]) -> None:
        new = [e for e in dict.fromkeys(entries) if e not in self.seen]
        if not new:
            return
        self.seen.update(new)
        if self.write:
            with self.path.open("a") as f:
                f.write("".join(e + "\n" for e in new))


def check_eval_data(recipe: PretrainingRecipe, train_dataset) -> None:
    """Before any training: the kNN evaluation (at the end, or online) needs labels in both splits."""
    if not ((recipe.do_eval and recipe.eval_split) or recipe.eval_steps):
        return
    eval_dataset, _ = load_image_dataset(recipe.dataset_name, recipe.eval_split, dataset_config=recipe.dataset_config,
                                         image_column=recipe.image_column)
    for split, dataset in ((recipe.train_split, train_dataset), (recipe.eval_split, eval_dataset)):
        try:
            label_column_of(dataset, recipe.label_column)
        except DataError as err:
            raise DataError(f"the kNN evaluation (do_eval / eval_steps) needs labels in split {split!r}: {err} "
                            "Set label_column, or do_eval: false and eval_steps: null.") from None


# -------------------------------------------------------------------------------------------- the loop


def hardware_description(accelerator: Accelerator) -> str:
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n} process(es) on CPU ({os.cpu_count()} cores)"


def train(recipe: PretrainingRecipe) -> dict:
    """Pretrain, save `pretraining/`, export `encoder/`, evaluate; returns the final metrics."""
    from .evaluation import OnlineKnn, knn_evaluate, record_eval_results
    from .hub import export_encoder, write_model_card
    from .plots import plot_run

    output_dir = Path(recipe.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        mixed_precision=recipe.mixed_precision,
        log_with=recipe.report_to if recipe.with_tracking else None,
        project_dir=str(output_dir),
        # split_batches: the loader yields the global micro-batch, each process takes its contiguous slice
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True),
    )
    set_seed(recipe.seed)
    method = METHODS.get(recipe.method)
    model = build_model(recipe)
    try:
        views = build_views(method.views, recipe.image_mean, recipe.image_std, **recipe.augmentation)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"augmentation: {err}") from None
    views.to(accelerator.device)
    embedding_dim = model.embedding_std_dim()

    dataset, image_column = load_image_dataset(recipe.dataset_name, recipe.train_split,
                                               dataset_config=recipe.dataset_config,
                                               image_column=recipe.image_column, streaming=recipe.streaming)
    check_eval_data(recipe, dataset)
    decoder = ImageDecoder(image_column, size=recipe.image_size, on_bad_image=recipe.on_bad_image)
    accum, world = recipe.gradient_accumulation_steps, accelerator.num_processes
    per_device = per_device_batch_size(recipe, world)
    global_batch = per_device * world * accum  # images per optimizer step, over all processes
    streaming = isinstance(dataset, datasets.IterableDataset)
    if streaming:  # split between the processes by split_dataset_by_node; not handed to accelerate
        loader = build_dataloader(dataset, decoder, per_device, shuffle=True, seed=recipe.seed,
                                  num_workers=recipe.dataloader_num_workers, process_index=accelerator.process_index,
                                  num_processes=world)
    else:  # the global micro-batch; accelerate (split_batches) gives each process its slice
        loader = build_dataloader(dataset, decoder, per_device * world, shuffle=True, seed=recipe.seed,
                                  num_workers=recipe.dataloader_num_workers)
    if recipe.sync_batchnorm and world > 1:
        model = convert_batchnorm(model, accelerator.device)
    optimizer = build_optimizer(model, recipe)
    if streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    core = accelerator.unwrap_model(model)

    if streaming:
        # Nominal epochs (schedules in epochs, the logged epoch): the declared size over the global batch.
        size = num_examples(dataset)
        if size is None:
            raise RecipeError(f"streaming: dataset {recipe.dataset_name!r} does not declare the size of split "
                              f"{recipe.train_split!r}, so epoch-based settings (warmup_epochs, ...) cannot be "
                              "converted to steps; load it without streaming")
        steps_per_epoch = size // global_batch
        if steps_per_epoch == 0:
            raise RecipeError(f"streaming: {size} images are fewer than one global batch of {global_batch}")
    else:
        steps_per_epoch = len(loader) // accum
        if steps_per_epoch == 0:
            raise RecipeError(f"one epoch has {len(loader)} batches, fewer than gradient_accumulation_steps={accum}")
    total_steps = recipe.max_steps if recipe.max_steps > 0 else math.ceil(recipe.num_train_epochs * steps_per_epoch)

    step = 0
    data_state = {"epoch": 0, "batches": 0}  # streaming: data epoch, micro-batches consumed in it
    if recipe.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(output_dir, recipe.resume_from_checkpoint)
        if streaming and not (checkpoint / DATA_STATE_FILE).is_file():
            raise TrainingError(f"cannot resume a streaming run from {checkpoint}: missing {DATA_STATE_FILE} "
                                "(the position in the data stream)")
        load_checkpoint(accelerator, checkpoint)
        step = int(checkpoint.name[5:])
        if streaming:
            data_state = json.loads((checkpoint / DATA_STATE_FILE).read_text())
        accelerator.print(f"Resumed from {checkpoint} at step {step}")
        if step % recipe.logging_steps and step < total_steps:
            logger.warning("resumed at step %d, not a multiple of logging_steps=%d: the next record averages the "
                           "steps since the resume only", step, recipe.logging_steps)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        supersede_after(output_dir, step)
        save_recipe(recipe, output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if recipe.with_tracking:
        accelerator.init_trackers("hf-ssl", config={k: str(v) for k, v in recipe.to_dict().items()})
        if not accelerator.trackers:
            if recipe.report_to != "all":
                raise RecipeError(f"with_tracking: report_to={recipe.report_to!r}, but that tracker is not installed "
                                  f"(pip install {recipe.report_to})")
            logger.warning("with_tracking: no tracker (tensorboard, wandb, ...) is installed; "
                           "metrics go to metrics.jsonl only")

    metrics_path = output_dir / "metrics.jsonl"
    online_knn = None
    if recipe.eval_steps and accelerator.is_main_process:
        online_knn = OnlineKnn(recipe.dataset_name, recipe.train_split, recipe.eval_split, recipe.image_size,
                               list(recipe.image_mean), list(recipe.image_std), dataset_config=recipe.dataset_config,
                               image_column=recipe.image_column, label_column=recipe.label_column,
                               subset_size=recipe.eval_subset_size, k=recipe.knn_k,
                               temperature=recipe.knn_temperature, batch_size=recipe.eval_batch_size,
                               num_workers=recipe.dataloader_num_workers, seed=recipe.seed)
    last_checkpoint = next(reversed(checkpoint_dirs(output_dir)), None)
    bad_images = BadImageLog(output_dir / "bad_images.txt", accelerator.is_main_process, resumed=step > 0)
    collapse = CollapseMonitor(recipe.collapse_std_fraction, embedding_dim)
    skipped_in_a_row, skipped_in_window = 0, 0
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="pretraining")
    running: dict[str, float] = {}
    n_running, images_seen, t_start = 0, 0, time.perf_counter()
    model.train()
    train_start = time.perf_counter()

    micro = 0
    while step < total_steps:
        epoch = step // steps_per_epoch
        if streaming:
            # The stream of this data epoch, past the micro-batches a resumed run already consumed (read again
            # and dropped: a streamed dataset cannot seek).
            loader.dataset.set_epoch(data_state["epoch"])
            epoch_batches = synchronized_batches(accelerator, loader, move_to_device=True)
            for _ in range(data_state["batches"]):
                if next(epoch_batches, None) is None:
                    break
        else:
            loader.set_epoch(epoch)
            skip = (step - epoch * steps_per_epoch) * accum
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            epoch_batches = synchronized_batches(accelerator, epoch_loader, move_to_device=False)
            micro = 0
        for batch, sizes in epoch_batches:
            if streaming:  # nominal epochs, independent of the data epochs
                epoch = step // steps_per_epoch
            data_state["batches"] += 1
            bad_images.add(batch.get("bad_images", []))
            values = schedule_values(recipe, step, total_steps, steps_per_epoch, global_batch)
            for group in optimizer.param_groups:
                group["lr"] = values["lr"]
                group["weight_decay"] = values["weight_decay"] if group["apply_weight_decay"] else 0.0
            if micro == 0:
                step_terms: dict[str, float] = {}
                nonfinite, used = None, 0
                # nan_policy=skip: a skipped step must leave no trace, also in buffers updated by forward.
                saved_buffers = ([b.detach().clone() for b in core.buffers()] if recipe.nan_policy == "skip"
                                 else None)
            with accelerator.accumulate(model):
                if min(sizes) == 0 and world > 1:  # every image of a process's micro-batch was a bad image
                    raise TrainingError(f"every image of a micro-batch of process {sizes.index(0)} at step {step} was "
                                        f"a bad image (see {output_dir / 'bad_images.txt'}); with several processes "
                                        "this cannot be skipped: raise the batch size or clean the data")
                if batch["pixel_values"].shape[0] > 0:
                    used += 1
                    # this process's rows of the views of the global micro-batch
                    inputs = views(batch["pixel_values"], view_seed(recipe.seed, step, micro),
                                   offset=sum(sizes[:accelerator.process_index]), total=sum(sizes))
                    inputs = model_inputs(inputs, recipe)
                    outputs = model(**inputs, **{k: values[k] for k in core.schedule_inputs})
                    loss = outputs.loss
                    if not loss_is_finite(accelerator, loss):
                        nonfinite = loss.item()
                        stop = recipe.nan_policy == "stop" or skipped_in_a_row >= recipe.nan_max_consecutive_skips
                        if stop:
                            where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                                     else "no checkpoint was saved")
                            why = ("" if recipe.nan_policy == "stop" else
                                   f", after {skipped_in_a_row} skipped steps in a row (nan_max_consecutive_skips)")
                            raise TrainingError(f"loss is {nonfinite} at step {step + 1} (epoch {epoch}){why}; "
                                                f"{where}")
                    accelerator.backward(loss)
                    for key, value in outputs.items():
                        if torch.is_tensor(value) and value.numel() == 1:
                            step_terms[key] = step_terms.get(key, 0.0) + value.detach().float().item() / accum
                    images_seen += batch["pixel_values"].shape[0]
                if accelerator.sync_gradients:
                    if nonfinite is None and used:
                        core.before_optimizer_step(epoch)
                        if recipe.max_grad_norm:
                            accelerator.unscale_gradients(optimizer)
                            clip_gradients(model.parameters(), recipe.max_grad_norm, recipe.clip_grad_per_parameter)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            if nonfinite is None and used:
                core.post_optimizer_step(momentum=values["ema_momentum"])
                for key, value in step_terms.items():
                    running[key] = running.get(key, 0.0) + value
                n_running += 1
                skipped_in_a_row = 0
            else:  # skipped: no optimizer step, no EMA; forward's buffer updates (center, BN stats) undone
                if saved_buffers is not None:
                    with torch.no_grad():
                        for buffer, saved in zip(core.buffers(), saved_buffers):
                            buffer.copy_(saved)
                skipped_in_a_row += nonfinite is not None
                why = f"loss {nonfinite}" if nonfinite is not None else "no usable image"
                logger.warning("step %d skipped (%s); the optimizer did not step", step + 1, why)
                skipped_in_window += 1
            micro = 0
            step += 1
            progress.update(1)
            if step % recipe.logging_steps == 0 or step == total_steps:
                reduced = (accelerator.reduce(torch.tensor(list(running.values()), device=accelerator.device),
                                              reduction="mean").tolist() if running else [])
                elapsed = time.perf_counter() - t_start
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                          **{k: v / n_running for k, v in zip(running, reduced)},
                          **values, "images_per_second": images_seen * accelerator.num_processes / elapsed,
                          "skipped_steps": skipped_in_window}
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    collapse.check(record)
                if "loss" in record:
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                if recipe.with_tracking:
                    accelerator.log(record, step=step)
                running, n_running, images_seen, t_start = {}, 0, 0, time.perf_counter()
                skipped_in_window = 0
            if recipe.eval_steps and step % recipe.eval_steps == 0:
                if accelerator.is_main_process:  # the publishable encoder, in eval mode; train modes restored
                    knn = online_knn(core.get_encoder(), accelerator.device, accelerator.autocast)
                    record = {"step": step, "eval/knn_top1": knn["top1"], "eval/knn_bank_size": knn["bank_size"],
                              "eval/knn_query_size": knn["query_size"]}
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    if recipe.with_tracking:
                        accelerator.log({"eval/knn_top1": knn["top1"]}, step=step)
                accelerator.wait_for_everyone()
                t_start = time.perf_counter()  # throughput excludes the evaluation
            if recipe.checkpointing_steps and step % recipe.checkpointing_steps == 0:
                last_checkpoint = save_checkpoint(accelerator, output_dir, step, recipe.save_total_limit, core.config,
                                                  data_state=data_state if streaming else None)
            if step >= total_steps:
                break
        else:  # the data epoch is over (not a break at total_steps)
            if streaming:
                if data_state["batches"] == 0:
                    raise TrainingError("the streamed dataset gave no batch in a whole epoch")
                data_state = {"epoch": data_state["epoch"] + 1, "batches": 0}
    progress.close()

    results: dict = {"step": step}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, "train_runtime_seconds": round(time.perf_counter() - train_start, 1),
                                "hardware": hardware_description(accelerator)}) + "\n")
        if bad_images.count:
            logger.warning("skipped %d bad images, listed in %s", bad_images.count, bad_images.path)
        core.save_pretrained(output_dir / "pretraining", safe_serialization=True)
        export_encoder(output_dir, output_dir / "encoder")
        if recipe.do_eval and recipe.eval_split:
            # Full-split kNN; the features are cached in OUTPUT_DIR/features/ (reused by `hf-ssl eval`, plots).
            report = knn_evaluate(output_dir / "encoder", recipe.dataset_name, train_split=recipe.train_split,
                                  test_split=recipe.eval_split, dataset_config=recipe.dataset_config,
                                  image_column=recipe.image_column, label_column=recipe.label_column,
                                  k=recipe.knn_k, temperature=recipe.knn_temperature,
                                  batch_size=recipe.eval_batch_size, num_workers=recipe.dataloader_num_workers,
                                  device=accelerator.device)
            scores = {f"eval/{key.replace('/', '_')}": value for key, value in report["scores"].items()}
            params = report["records"][0]["params"]
            results.update(scores)
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, **scores, "eval/knn_bank_size": params["num_train"],
                                    "eval/knn_query_size": params["num_test"]}) + "\n")
            if recipe.with_tracking:
                accelerator.log(scores, step=step)
            record_eval_results(output_dir / "encoder", report["records"])
            write_model_card(output_dir / "encoder")
        # curves; t-SNE map of the eval features cached by the kNN above (none without it: labels may be missing)
        plot_run(output_dir, extract=False, embedding_map=bool(recipe.do_eval and recipe.eval_split))
    if recipe.with_tracking:
        accelerator.end_training()
    return results
