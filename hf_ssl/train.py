"""The one training loop, for every method (accelerate's example-script style).

    hf-ssl train recipes/dino/fashion-mnist-resnet-tiny.yaml --output_dir runs/dino

`train()` reads top to bottom: `setup` (model, views, data, optimizer), `start_or_resume`, then per micro-batch
views -> forward -> backward -> (at the optimizer step) clip -> step -> `post_optimizer_step`, with the NaN guard,
logging, online kNN and checkpoints as a few marked lines, and `finish` (save, export, evaluate, plot).

Per optimizer step: the generic schedules (lr, weight decay, EMA momentum) are evaluated from the step, the method
adds its own (`schedule_values`), views are drawn on the device from a seed fixed by (seed, step, micro-batch) for the
global batch (each process applies its rows), the method model returns `loss`, gradients are clipped, the optimizer
steps, and only then does the model update its EMA state. Everything a resume needs is either in the accelerate
checkpoint (weights incl. buffers such as DINO's center, optimizer, RNG, and for streaming the data position) or a
pure function of the step.

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
import time
from dataclasses import dataclass, field
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
from modeling.pretraining import SSLPreTrainedModel, TrainingProgress
from modeling.schedules import cosine, warmup_cosine

from .augment import build_views, check_input_columns_cover_views, check_views_match_forward
from .checkpointing import (DATA_STATE_FILE, BatchLayout, TrainingError, checkpoint_dirs, load_checkpoint,
                            resolve_checkpoint, save_checkpoint, supersede_after)
from .data import DataError, ImageDecoder, build_dataloader, label_column_of, load_image_dataset, num_examples
from .hub import init_hub_repo, push_checkpoint, push_trained_encoder
from .monitoring import BadImageLog, CollapseMonitor, loss_is_finite
from .optimization import apply_schedule, build_optimizer, clip_gradients
from .recipe import PretrainingRecipe, RecipeError, check_keys, init_keys, save_recipe
from .saliency import SALIENCY_COLUMN, add_saliency_masks

logger = logging.getLogger(__name__)

__all__ = ["train", "build_model", "model_inputs", "build_optimizer", "schedule_values", "view_seed",
           "TrainingError", "CollapseMonitor"]


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



# ------------------------------------------------------------------------------------ schedules, batches


def peak_learning_rate(recipe: PretrainingRecipe, global_batch_size: int) -> float:
    """The recipe's learning rate, scaled to the global batch when `lr_scaling_batch_size` is set."""
    if recipe.lr_scaling_batch_size:
        return recipe.learning_rate * global_batch_size / recipe.lr_scaling_batch_size
    return recipe.learning_rate


def schedule_values(recipe: PretrainingRecipe, progress: TrainingProgress, global_batch_size: int
                    ) -> dict[str, float]:
    """The loop's generic scheduled values at `progress` (pure): lr, weight decay, EMA momentum. A method's own
    values come from its `schedule_values`."""
    step, total = progress.step, progress.total_steps
    warmup = min(progress.steps(recipe.warmup_epochs), total)
    peak = peak_learning_rate(recipe, global_batch_size)
    return {
        "lr": warmup_cosine(step, total, warmup, peak, recipe.min_learning_rate),
        "weight_decay": cosine(step, total, recipe.weight_decay,
                               recipe.weight_decay if recipe.weight_decay_end is None else recipe.weight_decay_end),
        "ema_momentum": cosine(step, total, recipe.ema_momentum, recipe.ema_momentum_end),
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
            batch = {key: value.to(accelerator.device, non_blocking=True) if torch.is_tensor(value) else value
                     for key, value in batch.items()}
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



def hardware_description(accelerator: Accelerator) -> str:
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n} process(es) on CPU ({os.cpu_count()} cores)"





# --------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What `setup` builds once; fixed for the whole run."""

    recipe: PretrainingRecipe
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped on several processes)
    core: SSLPreTrainedModel  # the method model itself
    optimizer: torch.optim.Optimizer
    views: torch.nn.Module
    loader: torch.utils.data.DataLoader
    streaming: bool
    steps_per_epoch: int
    total_steps: int
    layout: BatchLayout  # how the global batch is made; a resume on another process count must keep it
    peak_lr: float  # the learning rate scaled to the global batch (constant-lr groups stay at it)
    output_dir: Path

    def progress(self, step: int) -> TrainingProgress:
        return TrainingProgress(step, self.total_steps, self.steps_per_epoch)

    @property
    def global_batch(self) -> int:  # images per optimizer step, over all processes
        return self.layout.global_batch


@dataclass
class LoopState:
    """What changes as training goes: the step, where the data is, the optimizer step being accumulated (its logged
    terms, a non-finite loss, the micro-batches with images, what undoes it) and the logging window."""

    step: int = 0
    micro: int = 0
    data_state: dict = field(default_factory=lambda: {"epoch": 0, "batches": 0})  # streaming: data epoch, batches
    last_checkpoint: Path | None = None
    step_terms: dict = field(default_factory=dict)
    nonfinite: float | None = None
    used: int = 0
    snapshot: dict | None = None
    skipped_in_a_row: int = 0
    running: dict = field(default_factory=dict)
    n_running: int = 0
    images_seen: int = 0
    skipped_in_window: int = 0
    window_start: float = field(default_factory=time.perf_counter)

    @property
    def step_is_good(self) -> bool:
        return self.nonfinite is None and self.used > 0


@dataclass
class Monitors:
    """Where the run reports: metrics.jsonl, the progress bar, bad images, collapse, online kNN."""

    metrics_path: Path
    progress_bar: tqdm
    bad_images: BadImageLog
    collapse: CollapseMonitor
    online_knn: object | None

    def write(self, run: Run, record: dict) -> None:
        if run.accelerator.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def setup(recipe: PretrainingRecipe) -> Run:
    """Accelerator, model, views, data, optimizer, all prepared; the run's length in steps."""
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        mixed_precision=recipe.mixed_precision,
        log_with=recipe.report_to if recipe.with_tracking else None,
        project_dir=str(recipe.output_dir),
        # split_batches: the loader yields the global micro-batch, each process takes its contiguous slice
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True),
    )
    if recipe.push_to_hub and accelerator.is_main_process:  # a push that cannot work is refused before training
        init_hub_repo(recipe)
    set_seed(recipe.seed)
    model = build_model(recipe)
    try:
        views = build_views(METHODS[recipe.method].views, recipe.image_mean, recipe.image_std, **recipe.augmentation)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"augmentation: {err}") from None
    views.to(accelerator.device)
    input_columns = training_input_columns(recipe, model, views)
    try:  # a view recipe that does not fit the model fails here, not at the first step
        check_views_match_forward(views, model.forward, model.schedule_values(TrainingProgress(0, 1, 1)))
        check_input_columns_cover_views(views, input_columns)
    except ValueError as err:
        raise RecipeError(f"method {recipe.method!r}: {err}") from None
    world, accum = accelerator.num_processes, recipe.gradient_accumulation_steps
    per_device = per_device_batch_size(recipe, world)
    loader, dataset, streaming = build_training_data(recipe, accelerator, per_device, input_columns)
    if recipe.sync_batchnorm and world > 1:
        model = convert_batchnorm(model, accelerator.device)
    optimizer = build_optimizer(model, recipe)
    if streaming:  # split between the processes by split_dataset_by_node; not handed to accelerate
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    layout = BatchLayout(world, per_device, accum, streaming)
    steps_per_epoch = count_steps_per_epoch(recipe, dataset, loader, streaming, layout.global_batch)
    total_steps = recipe.max_steps if recipe.max_steps > 0 else math.ceil(recipe.num_train_epochs * steps_per_epoch)
    return Run(recipe, accelerator, model, accelerator.unwrap_model(model), optimizer, views, loader, streaming,
               steps_per_epoch, total_steps, layout, peak_learning_rate(recipe, layout.global_batch),
               Path(recipe.output_dir))


def training_input_columns(recipe: PretrainingRecipe, model, views) -> dict[str, str]:
    """The batch keys the views read beside the image and their dataset columns: the model's `input_columns()`,
    plus the computed masks as `mask` when the recipe names a `saliency_model`."""
    columns = dict(model.input_columns())
    if recipe.saliency_model:
        if "mask" in columns:
            raise RecipeError(f"saliency_model and model.mask_column ({columns['mask']!r}) both give the foreground "
                              "mask: keep one")
        if "mask" not in views.input_names:
            raise RecipeError(f"saliency_model is set but the {recipe.method} views read no mask (saliency masking "
                              "is off: augmentation.mask_p is 0 or absent): drop saliency_model")
        columns["mask"] = SALIENCY_COLUMN
    return columns


def build_training_data(recipe: PretrainingRecipe, accelerator: Accelerator, per_device: int,
                        input_columns: dict[str, str]):
    """(loader, dataset, streaming): a streamed dataset is split between the processes here; a map-style one
    yields the global micro-batch, which accelerate (split_batches) slices per process. Batches hold the image and
    the `input_columns`, decoded alike (a `saliency_model`'s masks are computed, or read from their cache, here)."""
    dataset_columns = [c for c in input_columns.values() if not (recipe.saliency_model and c == SALIENCY_COLUMN)]
    dataset, image_column = load_image_dataset(recipe.dataset_name, recipe.train_split,
                                               dataset_config=recipe.dataset_config,
                                               image_column=recipe.image_column, streaming=recipe.streaming,
                                               extra_columns=dataset_columns)
    check_eval_data(recipe, dataset)
    if recipe.saliency_model:
        with accelerator.main_process_first():  # the main process computes the masks, the others read its cache
            try:
                dataset = add_saliency_masks(dataset, recipe.saliency_model, image_column)
            except ValueError as err:
                raise RecipeError(f"saliency_model {recipe.saliency_model!r}: {err}") from None
    decoder = ImageDecoder(image_column, size=recipe.image_size, on_bad_image=recipe.on_bad_image,
                           extra_columns=input_columns)
    world = accelerator.num_processes
    streaming = isinstance(dataset, datasets.IterableDataset)
    if streaming:
        loader = build_dataloader(dataset, decoder, per_device, shuffle=True, seed=recipe.seed,
                                  num_workers=recipe.dataloader_num_workers, process_index=accelerator.process_index,
                                  num_processes=world)
    else:
        loader = build_dataloader(dataset, decoder, per_device * world, shuffle=True, seed=recipe.seed,
                                  num_workers=recipe.dataloader_num_workers)
    return loader, dataset, streaming


def count_steps_per_epoch(recipe: PretrainingRecipe, dataset, loader, streaming: bool, global_batch: int) -> int:
    """Optimizer steps per epoch; for a stream, nominal epochs: its declared size over the global batch."""
    accum = recipe.gradient_accumulation_steps
    if not streaming:
        if len(loader) // accum == 0:
            raise RecipeError(f"one epoch has {len(loader)} batches, fewer than gradient_accumulation_steps={accum}")
        return len(loader) // accum
    size = num_examples(dataset)
    if size is None:
        raise RecipeError(f"streaming: dataset {recipe.dataset_name!r} does not declare the size of split "
                          f"{recipe.train_split!r}, so epoch-based settings (warmup_epochs, ...) cannot be "
                          "converted to steps; load it without streaming")
    if size // global_batch == 0:
        raise RecipeError(f"streaming: {size} images are fewer than one global batch of {global_batch}")
    return size // global_batch


def start_or_resume(run: Run) -> LoopState:
    """Step 0, or the state of `resume_from_checkpoint`; the run's history from that step on is superseded, the
    resolved recipe written, trackers started."""
    recipe, accelerator, state = run.recipe, run.accelerator, LoopState()
    if recipe.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(run.output_dir, recipe.resume_from_checkpoint)
        if run.streaming and not (checkpoint / DATA_STATE_FILE).is_file():
            raise TrainingError(f"cannot resume a streaming run from {checkpoint}: missing {DATA_STATE_FILE} "
                                "(the position in the data stream)")
        load_checkpoint(accelerator, checkpoint, run.layout)
        state.step = int(checkpoint.name[5:])
        if run.streaming:
            state.data_state = json.loads((checkpoint / DATA_STATE_FILE).read_text())
        accelerator.print(f"Resumed from {checkpoint} at step {state.step}")
        if state.step % recipe.logging_steps and state.step < run.total_steps:
            logger.warning("resumed at step %d, not a multiple of logging_steps=%d: the next record averages the "
                           "steps since the resume only", state.step, recipe.logging_steps)
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        supersede_after(run.output_dir, state.step)
        save_recipe(recipe, run.output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    state.last_checkpoint = next(reversed(checkpoint_dirs(run.output_dir)), None)
    if recipe.with_tracking:
        accelerator.init_trackers("hf-ssl", config={k: str(v) for k, v in recipe.to_dict().items()})
        if not accelerator.trackers:
            if recipe.report_to != "all":
                raise RecipeError(f"with_tracking: report_to={recipe.report_to!r}, but that tracker is not installed "
                                  f"(pip install {recipe.report_to})")
            logger.warning("with_tracking: no tracker (tensorboard, wandb, ...) is installed; "
                           "metrics go to metrics.jsonl only")
    return state


def start_monitors(run: Run, state: LoopState) -> Monitors:
    from .evaluation import OnlineKnn

    recipe, accelerator = run.recipe, run.accelerator
    online_knn = None
    if recipe.eval_steps and accelerator.is_main_process:
        online_knn = OnlineKnn(recipe.dataset_name, recipe.train_split, recipe.eval_split, recipe.image_size,
                               list(recipe.image_mean), list(recipe.image_std), dataset_config=recipe.dataset_config,
                               image_column=recipe.image_column, label_column=recipe.label_column,
                               subset_size=recipe.eval_subset_size, k=recipe.knn_k,
                               temperature=recipe.knn_temperature, batch_size=recipe.eval_batch_size,
                               num_workers=recipe.dataloader_num_workers, seed=recipe.seed)
    progress_bar = tqdm(total=run.total_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                        desc="pretraining")
    return Monitors(run.output_dir / "metrics.jsonl", progress_bar,
                    BadImageLog(run.output_dir / "bad_images.txt", accelerator.is_main_process, resumed=state.step > 0),
                    CollapseMonitor(recipe.collapse_std_fraction, run.core.embedding_std_dim()), online_knn)


def training_batches(run: Run, state: LoopState):
    """Yields `(batch, sizes)` from `state.step` on, data epoch after data epoch, until `total_steps`: a map-style
    epoch past the batches a resumed run already used; a stream past the micro-batches already consumed in its data
    epoch (read again and dropped: a stream cannot seek)."""
    accelerator, accum = run.accelerator, run.recipe.gradient_accumulation_steps
    while state.step < run.total_steps:
        if run.streaming:
            run.loader.dataset.set_epoch(state.data_state["epoch"])
            batches = synchronized_batches(accelerator, run.loader, move_to_device=True)
            for _ in range(state.data_state["batches"]):
                if next(batches, None) is None:
                    break
        else:
            epoch = state.step // run.steps_per_epoch
            run.loader.set_epoch(epoch)
            skip = (state.step - epoch * run.steps_per_epoch) * accum
            batches = synchronized_batches(accelerator, accelerator.skip_first_batches(run.loader, skip)
                                           if skip else run.loader, move_to_device=False)
            state.micro = 0
        for batch, sizes in batches:
            state.data_state["batches"] += 1
            if min(sizes) == 0 and accelerator.num_processes > 1:
                raise TrainingError(f"every image of a micro-batch of process {sizes.index(0)} at step {state.step} "
                                    f"was a bad image (see {run.output_dir / 'bad_images.txt'}); with several "
                                    "processes this cannot be skipped: raise the batch size or clean the data")
            yield batch, sizes
            if state.step >= run.total_steps:
                return
        if run.streaming:  # the data epoch is over
            if state.data_state["batches"] == 0:
                raise TrainingError("the streamed dataset gave no batch in a whole epoch")
            state.data_state = {"epoch": state.data_state["epoch"] + 1, "batches": 0}


def begin_step(run: Run, state: LoopState) -> None:
    """A new optimizer step: nothing accumulated yet; under nan_policy=skip, what would undo it."""
    state.step_terms, state.nonfinite, state.used = {}, None, 0
    state.snapshot = run.core.step_snapshot() if run.recipe.nan_policy == "skip" else None


def nan_guard(run: Run, state: LoopState, loss: torch.Tensor) -> None:
    """A non-finite loss on any process marks the step to be skipped, or stops training (nan_policy=stop, or too
    many skipped steps in a row) naming the step and the last good checkpoint."""
    if loss_is_finite(run.accelerator, loss):
        return
    state.nonfinite = loss.item()
    recipe = run.recipe
    if recipe.nan_policy == "stop" or state.skipped_in_a_row >= recipe.nan_max_consecutive_skips:
        where = (f"the last good checkpoint is {state.last_checkpoint}" if state.last_checkpoint
                 else "no checkpoint was saved")
        why = ("" if recipe.nan_policy == "stop" else
               f", after {state.skipped_in_a_row} skipped steps in a row (nan_max_consecutive_skips)")
        raise TrainingError(f"loss is {state.nonfinite} at step {state.step + 1} "
                            f"(epoch {run.progress(state.step).epoch}){why}; {where}")


def add_terms(run: Run, state: LoopState, outputs, images: int) -> None:
    """The output's scalar terms (loss and what the method logs), averaged over the accumulated micro-batches."""
    accum = run.recipe.gradient_accumulation_steps
    for key, value in outputs.items():
        if torch.is_tensor(value) and value.numel() == 1:
            state.step_terms[key] = state.step_terms.get(key, 0.0) + value.detach().float().item() / accum
    state.used += 1
    state.images_seen += images


def end_step(run: Run, state: LoopState, momentum: float) -> None:
    """After the optimizer step: the model's EMA / queue updates. After a skipped one: no trace of it at all."""
    if state.step_is_good:
        run.core.post_optimizer_step(momentum=momentum)
        for key, value in state.step_terms.items():
            state.running[key] = state.running.get(key, 0.0) + value
        state.n_running += 1
        state.skipped_in_a_row = 0
    else:
        if state.snapshot is not None:
            run.core.discard_step(state.snapshot)
        state.skipped_in_a_row += state.nonfinite is not None
        why = f"loss {state.nonfinite}" if state.nonfinite is not None else "no usable image"
        logger.warning("step %d skipped (%s); the optimizer did not step", state.step + 1, why)
        state.skipped_in_window += 1
    state.micro = 0
    state.step += 1


def log_window(run: Run, state: LoopState, monitors: Monitors, values: dict[str, float]) -> None:
    """One metrics.jsonl record: the terms averaged over the window's steps and processes, the scheduled values,
    throughput, skipped steps; then a fresh window."""
    accelerator = run.accelerator
    reduced = (accelerator.reduce(torch.tensor(list(state.running.values()), device=accelerator.device),
                                  reduction="mean").tolist() if state.running else [])
    elapsed = time.perf_counter() - state.window_start
    record = {"step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4),
              **{k: v / state.n_running for k, v in zip(state.running, reduced)}, **values,
              "images_per_second": state.images_seen * accelerator.num_processes / elapsed,
              "skipped_steps": state.skipped_in_window}
    monitors.write(run, record)
    if accelerator.is_main_process:
        monitors.collapse.check(record)
    if "loss" in record:
        monitors.progress_bar.set_postfix(loss=f"{record['loss']:.4f}")
    if run.recipe.with_tracking:
        accelerator.log(record, step=state.step)
    state.running, state.n_running, state.images_seen, state.skipped_in_window = {}, 0, 0, 0
    state.window_start = time.perf_counter()


def online_evaluation(run: Run, state: LoopState, monitors: Monitors) -> None:
    """kNN of the publishable encoder (in eval mode; train modes restored) on the main process."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        knn = monitors.online_knn(run.core.get_encoder(), accelerator.device, accelerator.autocast)
        monitors.write(run, {"step": state.step, "eval/knn_top1": knn["top1"], "eval/knn_bank_size": knn["bank_size"],
                             "eval/knn_query_size": knn["query_size"]})
        if run.recipe.with_tracking:
            accelerator.log({"eval/knn_top1": knn["top1"]}, step=state.step)
    accelerator.wait_for_everyone()
    state.window_start = time.perf_counter()  # throughput excludes the evaluation


def finish(run: Run, state: LoopState, monitors: Monitors, train_seconds: float) -> dict:
    """Save `pretraining/`, export `encoder/`, evaluate (full-split kNN into eval_results.json and the card), plot."""
    from .evaluation import knn_evaluate, record_eval_results
    from .hub import export_encoder, write_model_card
    from .plots import plot_run

    recipe, accelerator, output_dir = run.recipe, run.accelerator, run.output_dir
    results: dict = {"step": state.step}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        monitors.write(run, {"step": state.step, "train_runtime_seconds": round(train_seconds, 1),
                             "hardware": hardware_description(accelerator),
                             "global_batch_size": run.global_batch})
        if monitors.bad_images.count:
            logger.warning("skipped %d bad images, listed in %s", monitors.bad_images.count, monitors.bad_images.path)
        run.core.save_pretrained(output_dir / "pretraining", safe_serialization=True)
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
            monitors.write(run, {"step": state.step, **scores, "eval/knn_bank_size": params["num_train"],
                                 "eval/knn_query_size": params["num_test"]})
            if recipe.with_tracking:
                accelerator.log(scores, step=state.step)
            record_eval_results(output_dir / "encoder", report["records"])
            write_model_card(output_dir / "encoder")
        # curves; t-SNE map of the eval features cached by the kNN above (none without it: labels may be missing)
        plot_run(output_dir, extract=False, embedding_map=bool(recipe.do_eval and recipe.eval_split))
        if recipe.push_to_hub:
            results["hub_commit_url"] = push_trained_encoder(recipe).commit_url
    if recipe.with_tracking:
        accelerator.end_training()
    return results


def train(recipe: PretrainingRecipe) -> dict:
    """Pretrain, save `pretraining/`, export `encoder/`, evaluate; returns the final metrics."""
    run = setup(recipe)
    state = start_or_resume(run)
    monitors = start_monitors(run, state)
    accelerator, model, core, optimizer = run.accelerator, run.model, run.core, run.optimizer
    model.train()
    train_start = time.perf_counter()
    for batch, sizes in training_batches(run, state):
        monitors.bad_images.add(batch.get("bad_images", []))
        progress = run.progress(state.step)
        values = schedule_values(recipe, progress, run.global_batch)
        method_values = core.schedule_values(progress)
        apply_schedule(optimizer, values["lr"], run.peak_lr, values["weight_decay"])
        if state.micro == 0:
            begin_step(run, state)
        with accelerator.accumulate(model):
            if batch["pixel_values"].shape[0] > 0:
                # this process's rows of the views of the global micro-batch
                views = run.views(batch, view_seed(recipe.seed, state.step, state.micro),
                                  offset=sum(sizes[:accelerator.process_index]), total=sum(sizes))
                outputs = model(**model_inputs(views, recipe), **method_values)
                nan_guard(run, state, outputs.loss)
                accelerator.backward(outputs.loss)
                add_terms(run, state, outputs, images=batch["pixel_values"].shape[0])
            if accelerator.sync_gradients:
                if state.step_is_good:
                    core.before_optimizer_step(progress)
                    if recipe.max_grad_norm:
                        accelerator.unscale_gradients(optimizer)
                        clip_gradients(model.parameters(), recipe.max_grad_norm, recipe.clip_grad_per_parameter)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        state.micro += 1
        if not accelerator.sync_gradients:
            continue
        end_step(run, state, momentum=values["ema_momentum"])
        monitors.progress_bar.update(1)
        # --- logging, online kNN, checkpoints
        if state.step % recipe.logging_steps == 0 or state.step == run.total_steps:
            log_window(run, state, monitors, {**values, **method_values})
        if recipe.eval_steps and state.step % recipe.eval_steps == 0:
            online_evaluation(run, state, monitors)
        if recipe.checkpointing_steps and state.step % recipe.checkpointing_steps == 0:
            state.last_checkpoint = save_checkpoint(accelerator, run.output_dir, state.step, recipe.save_total_limit,
                                                    core.config, run.layout,
                                                    data_state=state.data_state if run.streaming else None)
            if recipe.push_to_hub and recipe.hub_strategy == "every_save" and accelerator.is_main_process:
                push_checkpoint(recipe, state.last_checkpoint)
    monitors.progress_bar.close()
    return finish(run, state, monitors, time.perf_counter() - train_start)
