"""The one training loop, for every method (accelerate's example-script style).

    hf-ssl train recipes/dino/fashion-mnist-resnet-tiny.yaml --output_dir runs/dino

Per optimizer step: schedules are evaluated from the step, views are drawn on the device from a seed fixed by
(seed, step, micro-batch, process), the method model returns `loss`, gradients are clipped, the optimizer steps,
and only then does the model update its EMA state. Everything a resume needs is either in the accelerate
checkpoint (weights incl. buffers such as DINO's center, optimizer, RNG) or a pure function of the step.
"""
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel

from modeling import METHODS
from modeling.backbones import backbone_config_from_preset, build_backbone, feature_dim

from . import schedules
from .augment import build_views
from .data import ImageDecoder, build_dataloader, load_image_dataset
from .recipe import PretrainingRecipe, RecipeError, check_keys, init_keys, save_recipe

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where the last good checkpoint is."""


# ----------------------------------------------------------------------------------------------- model


def backbone_config_of(recipe: PretrainingRecipe):
    if recipe.backbone_name_or_path is not None:
        return AutoConfig.from_pretrained(recipe.backbone_name_or_path)
    if recipe.backbone_config is not None:
        if "model_type" not in recipe.backbone_config:
            raise RecipeError("backbone_config needs a model_type (e.g. resnet, vit, convnext)")
        return AutoConfig.for_model(**recipe.backbone_config)
    if recipe.backbone is None:
        raise RecipeError("set one of backbone, backbone_config or backbone_name_or_path")
    try:
        return backbone_config_from_preset(recipe.backbone)
    except ValueError as err:
        raise RecipeError(str(err)) from None


def build_model(recipe: PretrainingRecipe):
    """The method's `XForPreTraining`, with head input sizes matched to the backbone's pooled feature."""
    if recipe.method not in METHODS:
        raise RecipeError(f"unknown method {recipe.method!r}; valid methods: {', '.join(METHODS)}")
    method = METHODS[recipe.method]
    config_cls = method.config_class
    model_kwargs = dict(recipe.model)
    check_keys(model_kwargs, [k for k in init_keys(config_cls) if k not in ("backbone_config", "kwargs")],
               f"model: (keys of {config_cls.__name__})")
    backbone_config = backbone_config_of(recipe)
    probe = (AutoModel.from_pretrained(recipe.backbone_name_or_path) if recipe.backbone_name_or_path
             else build_backbone(backbone_config))
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
    return model


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


def view_seed(seed: int, step: int, micro_step: int, process_index: int) -> int:
    """The seed of one micro-batch's augmentations: a pure function, so a resumed run draws the same views."""
    return (((seed * 1_000_003 + step) * 1_009 + micro_step) * 9_176 + process_index) % (2**63 - 1)


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
                    model_config) -> Path:
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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if save_total_limit:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


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
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(recipe.seed)
    method = METHODS.get(recipe.method)
    model = build_model(recipe)
    views = build_views(method.views, recipe.image_mean, recipe.image_std, **recipe.augmentation)
    views.to(accelerator.device)

    dataset, image_column = load_image_dataset(recipe.dataset_name, recipe.train_split,
                                               dataset_config=recipe.dataset_config,
                                               image_column=recipe.image_column, streaming=recipe.streaming)
    decoder = ImageDecoder(image_column, size=recipe.image_size, on_bad_image=recipe.on_bad_image)
    loader = build_dataloader(dataset, decoder, recipe.per_device_train_batch_size, shuffle=True,
                              seed=recipe.seed, num_workers=recipe.dataloader_num_workers)
    optimizer = build_optimizer(model, recipe)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    core = accelerator.unwrap_model(model)

    accum = recipe.gradient_accumulation_steps
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise RecipeError(f"one epoch has {len(loader)} batches, fewer than gradient_accumulation_steps={accum}")
    total_steps = recipe.max_steps if recipe.max_steps > 0 else math.ceil(recipe.num_train_epochs * steps_per_epoch)
    global_batch = recipe.per_device_train_batch_size * accelerator.num_processes * accum

    step = 0
    if recipe.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(output_dir, recipe.resume_from_checkpoint)
        accelerator.load_state(str(checkpoint))
        step = int(checkpoint.name[5:])
        accelerator.print(f"Resumed from {checkpoint} at step {step}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, output_dir / "config.yaml")
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
    bad_images: list[str] = []
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="pretraining")
    running: dict[str, float] = {}
    n_running, images_seen, t_start = 0, 0, time.perf_counter()
    model.train()
    train_start = time.perf_counter()

    while step < total_steps:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch)
        skip = (step - epoch * steps_per_epoch) * accum
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        micro = 0
        for batch in epoch_loader:
            bad_images.extend(batch.get("bad_images", []))
            values = schedule_values(recipe, step, total_steps, steps_per_epoch, global_batch)
            for group in optimizer.param_groups:
                group["lr"] = values["lr"]
                group["weight_decay"] = values["weight_decay"] if group["apply_weight_decay"] else 0.0
            with accelerator.accumulate(model):
                inputs = views(batch["pixel_values"], view_seed(recipe.seed, step, micro, accelerator.process_index))
                outputs = model(**inputs, **{k: values[k] for k in core.schedule_inputs})
                loss = outputs.loss
                if not torch.isfinite(loss):
                    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint"
                    raise TrainingError(f"loss is {loss.item()} at step {step} (epoch {epoch}); {where}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    core.before_optimizer_step(epoch)
                    if recipe.max_grad_norm:
                        accelerator.unscale_gradients(optimizer)
                        clip_gradients(model.parameters(), recipe.max_grad_norm, recipe.clip_grad_per_parameter)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            micro += 1
            images_seen += batch["pixel_values"].shape[0]
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    running[key] = running.get(key, 0.0) + value.detach().float().item() / accum
            if not accelerator.sync_gradients:
                continue
            core.post_optimizer_step(momentum=values["ema_momentum"])
            micro = 0
            step += 1
            n_running += 1
            progress.update(1)
            if step % recipe.logging_steps == 0 or step == total_steps:
                reduced = accelerator.reduce(torch.tensor(list(running.values()), device=accelerator.device),
                                             reduction="mean")
                elapsed = time.perf_counter() - t_start
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                          **{k: v / n_running for k, v in zip(running, reduced.tolist())},
                          **values, "images_per_second": images_seen * accelerator.num_processes / elapsed}
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                if recipe.with_tracking:
                    accelerator.log(record, step=step)
                running, n_running, images_seen, t_start = {}, 0, 0, time.perf_counter()
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
                last_checkpoint = save_checkpoint(accelerator, output_dir, step, recipe.save_total_limit, core.config)
            if step >= total_steps:
                break
    progress.close()

    results: dict = {"step": step}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, "train_runtime_seconds": round(time.perf_counter() - train_start, 1),
                                "hardware": hardware_description(accelerator)}) + "\n")
        if bad_images:
            (output_dir / "bad_images.txt").write_text("\n".join(bad_images) + "\n")
            logger.warning("skipped %d bad images, listed in %s", len(bad_images), output_dir / "bad_images.txt")
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
        plot_run(output_dir, extract=False)  # curves; t-SNE map of the eval features cached by the kNN above
    if recipe.with_tracking:
        accelerator.end_training()
    return results
