"""lightly's DINO, MoCo v2 and MoCo v3, rebuilt with the settings of one of hf-ssl's Fashion-MNIST recipes.

Runs in benchmarks/peers/.venv (lightly + torchvision + transformers; `bash benchmarks/peers/make_venv.sh`), never
imports hf_ssl or modeling (only modeling/schedules.py, by path: the same lr / EMA formulas). Its input is a settings file that `compare.py settings` writes from our recipe in our
venv: the resolved recipe (every key, defaults filled in), the method's resolved config (heads, temperatures), the
resolved view keys, the backbone's transformers config, the parameter count of each of our model's parts and our
image processor's config. Every value that decides training is read from there, so the rebuild follows the recipe;
a value this script cannot rebuild with lightly is refused with a message rather than ignored.

How to run (from the repository root):

    bash benchmarks/peers/make_venv.sh
    PYTHONPATH=. .venv/bin/python benchmarks/peers/compare.py settings recipes/dino/fashion-mnist-demo.yaml \
        --output /tmp/dino.json
    benchmarks/peers/.venv/bin/python benchmarks/peers/lightly_train.py --settings /tmp/dino.json \
        --output_dir /tmp/lightly-dino [--max_steps 3 --max_images 2048]
    PYTHONPATH=. .venv/bin/hf-ssl eval knn --model /tmp/lightly-dino/encoder --dataset fashion_mnist

(`compare.py` runs all of this, alternating with our own training.) Writes OUTPUT_DIR/encoder/ (the trained backbone:
DINO's teacher, MoCo's query encoder, as transformers' `save_pretrained` + our `preprocessor_config.json`) and
OUTPUT_DIR/lightly_metrics.json (steps, images, loop seconds, images/s, logged losses, versions).

What is lightly's: the augmentations (DINOTransform, MoCoV2Transform, BYOLView1/2Transform), the heads
(DINOProjectionHead; lightly's ProjectionHead blocks laid out as our projector / predictor), the losses (DINOLoss,
KoLeoLoss, NTXentLoss with its memory bank), update_momentum, deactivate_requires_grad and the DINO head's
cancel_last_layer_gradients. lightly has no MoCo v3 loss: it is written here (cross-entropy of q·k/T against the
positive's index, symmetrised and scaled by 2T, as in the MoCo v3 paper). What is plain PyTorch (as in lightly's
examples): the DataLoader, the optimizer, the loop; the schedules are the same pure functions of the step as
hf-ssl's (lightly's cosine_warmup_schedule starts its warmup one step later and ends its cosine one step earlier).
The settings that differ and cannot be made equal are listed in `KNOWN_DIFFERENCES`.
"""
import argparse
import copy
import gzip
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import lightly
from lightly.loss import DINOLoss, KoLeoLoss, NTXentLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform, MoCoV2Transform
from transformers import AutoConfig, AutoModel

# What stays different from our recipes whatever the settings; compare.py copies it into results.md.
KNOWN_DIFFERENCES = [
    "Augmentation runs per image on PIL images in the DataLoader workers (torchvision + lightly's PIL blur and "
    "solarize); ours runs batched on tensors (kornia) in the training process.",
    "Gaussian blur: lightly's GaussianBlur is PIL's ImageFilter.GaussianBlur(radius=sigma), sigma in (0.1, 2) as "
    "ours, with an unbounded kernel; ours is a 3 px kernel at 32 and 16 px crops (about 10 % of the crop, as "
    "BYOL/DINO's 23 px at 224), which caps the blur: lightly's sigma-2 blur at 32 px is much stronger.",
    "Random resized crop: DINOTransform resamples with bicubic, the MoCo transforms with bilinear, both on PIL "
    "(antialiased when shrinking); ours is kornia's bilinear without antialiasing. torchvision falls back to a centre "
    "crop after 10 rejected draws; kornia draws otherwise. Same scale and ratio ranges.",
    "Solarize: PIL inverts pixels >= 128 of 255; ours (kornia) inverts values >= 0.5 after the [0, 1] scaling.",
    "DINO head: the prototype layer's direction starts from torch's default Linear init (lightly) instead of a "
    "truncated normal (std 0.02, ours); both are weight-normalised with norms fixed at 1.",
    "KoLeo: lightly's KoLeoLoss adds eps inside the distance (PairwiseDistance(eps=1e-8)), ours outside; same "
    "nearest-neighbour search, weight and features (the student's pooled features of each global crop).",
    "MoCo v3 loss: lightly has none (its NTXentLoss without a memory bank is SimCLR's 2N-2 negatives); it is written "
    "here as in the paper and in ours.",
    "Random number streams differ (initial weights, data order, augmentation draws): same distributions, not the same "
    "draws.",
]


# ------------------------------------------------------------------------------------------------ schedules
# hf-ssl's own pure functions of the optimizer step, loaded from modeling/schedules.py by path: that module needs only
# the standard library, and importing the `modeling` package would pull in the rest of hf-ssl.
_spec = importlib.util.spec_from_file_location("hf_ssl_schedules", Path(__file__).resolve().parents[2] / "modeling"
                                               / "schedules.py")
_schedules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_schedules)
cosine, warmup_cosine = _schedules.cosine, _schedules.warmup_cosine
linear_warmup_then_constant = _schedules.linear_warmup_then_constant


# ------------------------------------------------------------------------------------------------ data


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise SystemExit(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir() -> Path:
    """Where hf-ssl's data.fashion_mnist finds the idx files (Debian's dataset-fashion-mnist)."""
    for candidate in (os.environ.get("HF_SSL_FASHION_MNIST_DIR"), "/usr/share/datasets/fashion-mnist"):
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
        if candidate and (Path(candidate) / "train-images-idx3-ubyte").is_file():
            return Path(candidate)
    raise SystemExit("Fashion-MNIST idx files not found: apt-get install dataset-fashion-mnist, or set "
                     "HF_SSL_FASHION_MNIST_DIR")


class FashionMNIST(torch.utils.data.Dataset):
    """The train split, each image decoded as hf-ssl's ImageDecoder does (grey -> RGB, bilinear resize of the
    central square to `size`), then given to a lightly transform."""

    def __init__(self, size: int, transform, max_images: int | None = None):
        root = fashion_mnist_dir()
        name = "train-images-idx3-ubyte"
        path = root / f"{name}.gz" if (root / f"{name}.gz").is_file() else root / name
        self.images = read_idx(path)[:max_images]
        self.size, self.transform = size, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return self.transform(image)


# ------------------------------------------------------------------------------------------------ model parts


CLS_TOKEN_MODELS = ("vit", "deit", "dinov2", "vit_msn")


class Backbone(nn.Module):
    """A transformers vision model giving hf-ssl's pooled feature (CNN: pooler_output flattened; ViT: CLS token)."""

    def __init__(self, config: dict):
        super().__init__()
        config = AutoConfig.for_model(**config)
        kwargs = {"add_pooling_layer": False} if config.model_type in ("vit", "deit") else {}
        self.model = AutoModel.from_config(config, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=x)
        if self.model.config.model_type in CLS_TOKEN_MODELS:
            return outputs.last_hidden_state[:, 0]
        return outputs.pooler_output.flatten(1)


def feature_dim(backbone: Backbone, size: int) -> int:
    backbone.eval()
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, size, size)).shape[-1]
    backbone.train()
    return dim


def mlp_head(config: dict) -> ProjectionHead:
    """Our ProjectionHead (modeling/heads.py) laid out with lightly's ProjectionHead blocks: every Linear with a bias,
    a BatchNorm (or none) and ReLU after each hidden layer, optionally an affine-free BatchNorm after the last one.
    lightly's MoCoProjectionHead / BYOLPredictionHead drop the biases before BatchNorms and make the last one affine."""
    if config["activation"] != "relu" or config["norm"] not in (None, "batchnorm"):
        raise SystemExit(f"head {config}: only relu and batchnorm/no norm are rebuilt")
    hidden = config["hidden_dim"] or config["in_dim"]
    dims = [config["in_dim"]] + [hidden] * (config["num_layers"] - 1) + [config["out_dim"]]
    blocks = []
    for i in range(config["num_layers"]):
        last = i == config["num_layers"] - 1
        if last:
            norm = (nn.BatchNorm1d(dims[-1], affine=config.get("last_norm_affine", False))
                    if config["last_norm"] else None)
            blocks.append((dims[i], dims[i + 1], norm, None, True))
        else:
            norm = nn.BatchNorm1d(dims[i + 1]) if config["norm"] == "batchnorm" else None
            blocks.append((dims[i], dims[i + 1], norm, nn.ReLU(), True))
    return ProjectionHead(blocks)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ methods


class LightlyDINO(nn.Module):
    """Student and EMA teacher (backbone + DINOProjectionHead), DINOLoss, optional KoLeoLoss on the student's pooled
    features of each global crop. Crops go through the backbones as hf-ssl's model does: both global crops in one
    batch, all local crops in another (so BatchNorm sees the same batches)."""

    def __init__(self, settings: dict, backbone: Backbone, dim: int):
        super().__init__()
        model = settings["model_config"]
        head = model["head_config"]
        if head["num_layers"] != 3 or head["use_bn"]:
            raise SystemExit(f"DINO head {head}: lightly's DINOProjectionHead has 3 layers without BatchNorm")
        if model["num_global_crops"] != 2:
            raise SystemExit("lightly's DINOTransform makes exactly 2 global crops")
        self.student_backbone = backbone
        head_kwargs = dict(input_dim=dim, hidden_dim=head["hidden_dim"], bottleneck_dim=head["bottleneck_dim"],
                           output_dim=head["out_dim"], batch_norm=False,
                           freeze_last_layer=model["freeze_last_layer_epochs"], norm_last_layer=head["norm_last_layer"])
        self.student_head = DINOProjectionHead(**head_kwargs)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        # the teacher starts as a copy of the student, as in ours and in DINO (a weight-normed head cannot be
        # deep-copied: a second head takes the student's weights)
        self.teacher_head = DINOProjectionHead(**head_kwargs)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=head["out_dim"], warmup_teacher_temp=model["warmup_teacher_temperature"],
                                  teacher_temp=model["teacher_temperature"], student_temp=model["student_temperature"],
                                  center_momentum=model["center_momentum"])
        self.koleo_weight = model["koleo_weight"]
        self.koleo = KoLeoLoss()
        self.config = model

    def schedule_values(self, step: int, steps_per_epoch: int) -> dict:
        warmup = int(self.config["warmup_teacher_temperature_epochs"] * steps_per_epoch)
        return {"teacher_temp": linear_warmup_then_constant(step, warmup, self.config["warmup_teacher_temperature"],
                                                            self.config["teacher_temperature"])}

    def forward(self, views: list[torch.Tensor], teacher_temp: float) -> dict:
        batch = views[0].shape[0]
        global_crops, local_crops = torch.cat(views[:2]), views[2:]
        student_global = self.student_backbone(global_crops)
        features = [student_global]
        if local_crops:
            features.append(self.student_backbone(torch.cat(local_crops)))
        student_out = list(self.student_head(torch.cat(features)).split(batch))
        with torch.no_grad():
            teacher_out = list(self.teacher_head(self.teacher_backbone(global_crops)).split(batch))
        dino = self.criterion(teacher_out, student_out, teacher_temp=teacher_temp)
        loss = dino
        terms = {"dino_loss": dino.detach()}
        if self.koleo_weight:
            koleo = sum(self.koleo(crop) for crop in student_global.split(batch)) / 2
            loss = dino + self.koleo_weight * koleo
            terms["koleo"] = koleo.detach()
        return {"loss": loss, **terms}

    def before_optimizer_step(self, epoch: int) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=epoch)

    @torch.no_grad()
    def post_optimizer_step(self, momentum: float) -> None:
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)

    def encoder(self) -> Backbone:
        return self.teacher_backbone


def moco_v3_loss(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of each query against the batch's keys, its positive at its own index (MoCo v3's `ctr`)."""
    query, keys = F.normalize(query, dim=1), F.normalize(keys, dim=1)
    logits = query @ keys.T / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


class LightlyMoCo(nn.Module):
    """MoCo v2 (queue of negatives: lightly's NTXentLoss with its memory bank; query = view 1, key = view 2) or
    MoCo v3 (predictor, negatives from the batch, symmetric loss scaled by 2T). Query encoder = backbone +
    projector (+ predictor), key encoder = EMA copy of backbone + projector."""

    def __init__(self, settings: dict, backbone: Backbone, dim: int):
        super().__init__()
        model = settings["model_config"]
        self.version, self.temperature = model["version"], model["contrastive_temperature"]
        projector = dict(model["projector_config"], in_dim=dim)
        self.query_backbone = backbone
        self.query_projector = mlp_head(projector)
        self.predictor = mlp_head(model["predictor_config"]) if model.get("predictor_config") else None
        self.key_backbone = copy.deepcopy(self.query_backbone)
        self.key_projector = copy.deepcopy(self.query_projector)
        deactivate_requires_grad(self.key_backbone)
        deactivate_requires_grad(self.key_projector)
        if self.version == 2:
            self.criterion = NTXentLoss(temperature=self.temperature,
                                        memory_bank_size=(model["queue_size"], projector["out_dim"]))
        elif model.get("queue_size"):
            raise SystemExit("MoCo v3 with a queue is not rebuilt")

    def schedule_values(self, step: int, steps_per_epoch: int) -> dict:
        return {}

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.key_projector(self.key_backbone(x))

    def forward(self, views: list[torch.Tensor]) -> dict:
        view_1, view_2 = views
        if self.version == 2:
            query = self.query_projector(self.query_backbone(view_1))
            return {"loss": self.criterion(query, self.keys(view_2))}
        z_1 = self.query_projector(self.query_backbone(view_1))
        z_2 = self.query_projector(self.query_backbone(view_2))
        k_1, k_2 = self.keys(view_1), self.keys(view_2)
        t = self.temperature
        loss = 2 * t * (moco_v3_loss(self.predictor(z_1), k_2, t) + moco_v3_loss(self.predictor(z_2), k_1, t))
        return {"loss": loss}

    def before_optimizer_step(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def post_optimizer_step(self, momentum: float) -> None:
        update_momentum(self.query_backbone, self.key_backbone, m=momentum)
        update_momentum(self.query_projector, self.key_projector, m=momentum)

    def encoder(self) -> Backbone:
        return self.query_backbone


# ------------------------------------------------------------------------------------------------ views


def check_jitter(transform, expected: tuple[float, float, float, float]) -> None:
    """Every ColorJitter inside `transform` has brightness/contrast/saturation/hue `expected` (lightly's
    DINOTransform does not pass cj_strength to its second global view: the values are chosen so that this holds)."""
    found = []

    def walk(obj, depth=0):
        if depth > 6:
            return
        if type(obj).__name__ == "ColorJitter":
            found.append(obj)
            return
        for child in (list(getattr(obj, "transforms", []) or []) + [getattr(obj, "transform", None)]):
            if child is not None:
                walk(child, depth + 1)

    walk(transform)
    if not found:
        raise SystemExit("no ColorJitter found in the lightly transform")

    def strength(value, centre):
        if value is None:
            return 0.0
        low, high = (value[0], value[1]) if isinstance(value, (tuple, list)) else (centre - value, centre + value)
        return round(float(high) - centre, 6)

    for jitter in found:
        got = (strength(jitter.brightness, 1.0), strength(jitter.contrast, 1.0), strength(jitter.saturation, 1.0),
               strength(jitter.hue, 0.0))
        if got != tuple(round(v, 6) for v in expected):
            raise SystemExit(f"a lightly ColorJitter has strengths {got}, expected {expected}")


def build_transform(settings: dict):
    """lightly's transform for the method, with the recipe's resolved view keys."""
    aug, recipe = settings["augmentation"], settings["recipe"]
    normalize = {"mean": list(recipe["image_mean"]), "std": list(recipe["image_std"])}
    b, c, s, h = aug["color_jitter_strength"]
    common = dict(cj_prob=aug["color_jitter_p"], random_gray_scale=aug["grayscale_p"], hf_prob=aug["flip_p"],
                  sigmas=(0.1, 2.0), normalize=normalize)
    if settings["view_recipe"] == "multicrop":
        if aug["global_solarize_p"][0] != 0 or len(aug["global_blur_p"]) != 2:
            raise SystemExit("lightly's DINOTransform: 2 global crops, solarize on the second only")
        # cj_strength 0.5 x doubled strengths: DINOTransform's second global view ignores cj_strength (uses 0.5)
        transform = DINOTransform(
            global_crop_size=aug["global_crop_size"], global_crop_scale=tuple(aug["global_crop_scale"]),
            local_crop_size=aug["local_crop_size"], local_crop_scale=tuple(aug["local_crop_scale"]),
            n_local_views=aug["num_local_crops"], cj_strength=0.5, cj_bright=2 * b, cj_contrast=2 * c,
            cj_sat=2 * s, cj_hue=2 * h,
            gaussian_blur=(aug["global_blur_p"][0], aug["global_blur_p"][1], aug["local_blur_p"]),
            solarization_prob=aug["global_solarize_p"][1], **common)
    elif settings["view_recipe"] == "two_views":
        view = dict(input_size=aug["crop_size"], cj_strength=1.0, cj_bright=b, cj_contrast=c, cj_sat=s, cj_hue=h,
                    min_scale=aug["crop_scale"][0], **common)
        if aug["crop_scale"][1] != 1.0:
            raise SystemExit("lightly's transforms crop up to scale 1.0 only")
        if settings["model_config"]["version"] == 2 and aug["solarize_p"] == [0.0, 0.0] \
                and aug["blur_p"][0] == aug["blur_p"][1]:
            transform = MoCoV2Transform(gaussian_blur=aug["blur_p"][0], **view)
        else:  # BYOL's asymmetric pair (MoCo v3's augmentation)
            transform = BYOLTransform(
                view_1_transform=BYOLView1Transform(gaussian_blur=aug["blur_p"][0],
                                                    solarization_prob=aug["solarize_p"][0], **view),
                view_2_transform=BYOLView2Transform(gaussian_blur=aug["blur_p"][1],
                                                    solarization_prob=aug["solarize_p"][1], **view))
    else:
        raise SystemExit(f"view recipe {settings['view_recipe']!r} is not rebuilt with lightly")
    check_jitter(transform, (b, c, s, h))
    return transform


# ------------------------------------------------------------------------------------------------ training


def parameter_groups(model: nn.Module) -> list[dict]:
    """hf-ssl's groups: weights (>= 2-d) decay, biases and norms (1-d) do not; frozen parameters are left out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim > 1], "apply_weight_decay": True},
            {"params": [p for p in trainable if p.ndim <= 1], "apply_weight_decay": False}]


def build_optimizer(model: nn.Module, recipe: dict) -> torch.optim.Optimizer:
    groups = parameter_groups(model)
    if recipe["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=recipe["learning_rate"], betas=(recipe["adam_beta1"], recipe["adam_beta2"]))
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=recipe["learning_rate"], momentum=recipe["sgd_momentum"])
    raise SystemExit(f"optimizer {recipe['optimizer']!r} is not rebuilt (lightly has LARS, but not ours)")


def clip_gradients(parameters, max_norm: float, per_parameter: bool) -> None:
    params = [p for p in parameters if p.grad is not None]
    if per_parameter:  # DINO's clip_gradients
        for p in params:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def check_recipe(recipe: dict) -> None:
    """Recipe keys that change training and that this script does not rebuild: refused, not ignored."""
    unsupported = {"gradient_accumulation_steps": 1, "mixed_precision": "no", "dtype": "float32",
                   "total_train_batch_size": None, "backbone_name_or_path": None, "saliency_model": None}
    for key, value in unsupported.items():
        if recipe.get(key) != value:
            raise SystemExit(f"recipe key {key}={recipe.get(key)!r} is not rebuilt (only {value!r})")
    if recipe["dataset_name"] != "fashion_mnist":
        raise SystemExit(f"dataset {recipe['dataset_name']!r}: only fashion_mnist (idx files) is read here")


def check_parameter_counts(model: nn.Module, expected: dict[str, int]) -> dict[str, int]:
    """Each part (student_backbone, student_head, ..., as named in our model) has our part's parameter count."""
    counts = {name: count(module) for name, module in model.named_children() if count(module)}
    if counts != expected:
        raise SystemExit(f"parameter counts differ from ours: lightly {counts}, hf-ssl {expected}")
    return counts


def save_encoder(backbone: Backbone, settings: dict, directory: Path) -> None:
    """The trained backbone as a plain transformers model + our image processor config (size, mean, std), checked
    by reloading it with transformers: the same pooled feature as the trained backbone."""
    directory.mkdir(parents=True, exist_ok=True)
    backbone = backbone.to("cpu", memory_format=torch.contiguous_format).eval()
    for p in backbone.parameters():
        p.data = p.data.contiguous()
    backbone.model.save_pretrained(directory, safe_serialization=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(settings["preprocessor_config"], indent=2) + "\n")
    reloaded = Backbone.__new__(Backbone)
    nn.Module.__init__(reloaded)
    reloaded.model = AutoModel.from_pretrained(directory).eval()
    size = settings["recipe"]["image_size"]
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(backbone(probe), reloaded(probe), atol=1e-5):
            raise SystemExit(f"the encoder reloaded from {directory} gives other features than the trained one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="JSON written by compare.py settings (our venv)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=None, help="override the recipe's max_steps")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--max_images", type=int, default=None, help="train on the first N images only (smoke runs)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="DataLoader workers (default: the recipe's dataloader_num_workers)")
    parser.add_argument("--channels_last", choices=["recipe", "on", "off"], default="recipe",
                        help="channels-last backbones and views (default: as the recipe's channels_last)")
    args = parser.parse_args()
    process_start = time.perf_counter()

    settings = json.loads(Path(args.settings).read_text())
    recipe = settings["recipe"]
    check_recipe(recipe)
    seed = recipe["seed"] if args.seed is None else args.seed
    max_steps = recipe["max_steps"] if args.max_steps is None else args.max_steps
    workers = recipe["dataloader_num_workers"] if args.num_workers is None else args.num_workers
    channels_last = recipe["channels_last"] if args.channels_last == "recipe" else args.channels_last == "on"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    backbone = Backbone(settings["backbone_config"])
    dim = feature_dim(backbone, recipe["image_size"])
    method = settings["method"]
    model = (LightlyDINO if method == "dino" else LightlyMoCo)(settings, backbone, dim)
    counts = check_parameter_counts(model, settings["parameter_counts"])
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)

    transform = build_transform(settings)
    dataset = FashionMNIST(recipe["image_size"], transform, args.max_images)
    batch_size = recipe["per_device_train_batch_size"]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one batch of {batch_size}")
    total_steps = max_steps if max_steps > 0 else math.ceil(recipe["num_train_epochs"] * steps_per_epoch)
    warmup = min(int(recipe["warmup_epochs"] * steps_per_epoch), total_steps)
    peak_lr = recipe["learning_rate"] * (batch_size / recipe["lr_scaling_batch_size"]
                                         if recipe["lr_scaling_batch_size"] else 1.0)
    wd_end = recipe["weight_decay"] if recipe["weight_decay_end"] is None else recipe["weight_decay_end"]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    print(f"lightly {lightly.__version__} {method}: {total_steps} steps of {batch_size} images "
          f"({steps_per_epoch} per epoch), {sum(counts.values())} parameters {counts}, device {device}", flush=True)

    log, step, running, n_running = [], 0, {}, 0
    loop_start = time.perf_counter()
    while step < total_steps:
        for views in loader:
            epoch = step // steps_per_epoch
            lr = warmup_cosine(step, total_steps, warmup, peak_lr, recipe["min_learning_rate"])
            wd = cosine(step, total_steps, recipe["weight_decay"], wd_end)
            momentum = cosine(step, total_steps, recipe["ema_momentum"], recipe["ema_momentum_end"])
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = lr, wd if group["apply_weight_decay"] else 0.0
            views = [v.to(device, non_blocking=True, memory_format=layout) for v in views]
            out = model(views, **model.schedule_values(step, steps_per_epoch))
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise SystemExit(f"loss is {loss.item()} at step {step + 1}")
            loss.backward()
            model.before_optimizer_step(epoch)
            if recipe["max_grad_norm"]:
                clip_gradients(model.parameters(), recipe["max_grad_norm"], recipe["clip_grad_per_parameter"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.post_optimizer_step(momentum)
            step += 1
            for key, value in out.items():
                running[key] = running.get(key, 0.0) + float(value.detach())
            n_running += 1
            if step % recipe["logging_steps"] == 0 or step == total_steps:
                record = {"step": step, **{k: v / n_running for k, v in running.items()}, "lr": lr,
                          "weight_decay": wd, "ema_momentum": momentum,
                          "seconds": round(time.perf_counter() - loop_start, 2)}
                log.append(record)
                print(json.dumps(record), flush=True)
                running, n_running = {}, 0
            if step >= total_steps:
                break
    loop_seconds = time.perf_counter() - loop_start

    save_encoder(model.encoder(), settings, output_dir / "encoder")
    metrics = {"library": "lightly", "lightly_version": lightly.__version__, "torch_version": torch.__version__,
               "method": settings["name"], "recipe_path": settings["recipe_path"], "seed": seed,
               "steps": step, "batch_size": batch_size, "images": step * batch_size,
               "loop_seconds": round(loop_seconds, 3),
               "loop_images_per_second": round(step * batch_size / loop_seconds, 2),
               "process_seconds_before_save": round(time.perf_counter() - process_start, 3),
               "threads": torch.get_num_threads(), "num_workers": workers, "channels_last": channels_last,
               "max_images": args.max_images, "parameter_counts": counts, "device": str(device), "log": log,
               "argv": sys.argv}
    (output_dir / "lightly_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("log", "argv")}), flush=True)


if __name__ == "__main__":
    main()
