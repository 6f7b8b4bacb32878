"""Build a transformers vision backbone (from a config or a pretrained checkpoint) and turn its outputs into the one
pooled feature per image.

The pooled feature is the representation the methods train and the exported encoder gives:
  * CNNs (ResNet, ConvNeXt, ConvNeXtV2, RegNet, EfficientNet, MobileNetV2): `pooler_output`, flattened to `[B, C]`;
  * BEiT and Swin: `pooler_output` (BEiT: LayerNorm of the mean patch token, or with `use_mean_pooling=False` the
    final CLS token; Swin: mean of the last stage's tokens);
  * ViT, DeiT, DINOv2, ViT-MSN: the CLS token of the final `last_hidden_state` (after the final LayerNorm). ViT and
    DeiT are built without their `pooler` (an extra dense layer that self-supervised training never touches).
Every other model type is refused by `backbone_family` with one line listing these families (`BACKBONE_FAMILIES`).
"""
import copy
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class BackboneFamily:
    """How hf-ssl builds a transformers vision model and reads its pooled feature."""

    name: str
    # The pooled feature is the CLS token of `last_hidden_state` (else `pooler_output`).
    cls_token: bool
    # Extra arguments of the model's `__init__` (ViT/DeiT: no pooler).
    init_kwargs: dict = field(default_factory=dict)
    # `forward` takes `interpolate_pos_encoding` (needed for inputs other than `config.image_size`); DINOv2 always
    # interpolates and CNNs have no position embeddings.
    interpolates_positions: bool = False
    # Parameters the pooled feature never uses, kept frozen: under DDP a trainable parameter without a gradient
    # stalls the gradient reduction.
    unused_parameters: tuple[str, ...] = ()
    # A plain forward refuses inputs of another size than `config.image_size` (see `at_input_size`).
    fixed_input_size: bool = False

    @property
    def feature(self) -> str:
        """The pooled feature, as a model card names it."""
        return "CLS token of last_hidden_state" if self.cls_token else "pooler_output"


BACKBONE_FAMILIES: dict[str, BackboneFamily] = {
    "resnet": BackboneFamily("ResNet", cls_token=False),
    "convnext": BackboneFamily("ConvNeXt", cls_token=False),
    "convnextv2": BackboneFamily("ConvNeXtV2", cls_token=False),
    "regnet": BackboneFamily("RegNet", cls_token=False),
    "efficientnet": BackboneFamily("EfficientNet", cls_token=False),
    "mobilenet_v2": BackboneFamily("MobileNetV2", cls_token=False),
    "beit": BackboneFamily("BEiT", cls_token=False, interpolates_positions=True),
    "swin": BackboneFamily("Swin", cls_token=False, interpolates_positions=True),
    "vit": BackboneFamily("ViT", cls_token=True, init_kwargs={"add_pooling_layer": False},
                          interpolates_positions=True, fixed_input_size=True),
    "deit": BackboneFamily("DeiT", cls_token=True, init_kwargs={"add_pooling_layer": False},
                           interpolates_positions=True, fixed_input_size=True),
    "dinov2": BackboneFamily("DINOv2", cls_token=True, unused_parameters=("embeddings.mask_token",)),
    "vit_msn": BackboneFamily("ViT-MSN", cls_token=True, interpolates_positions=True, fixed_input_size=True),
}


def backbone_family(model_type: str) -> BackboneFamily:
    """The family of a backbone `model_type`; a ValueError in one line for a model hf-ssl cannot pool."""
    if model_type not in BACKBONE_FAMILIES:
        supported = ", ".join(f"{family.name} ({t})" for t, family in BACKBONE_FAMILIES.items())
        raise ValueError(f"hf-ssl cannot use a {model_type!r} model as backbone (it needs a vision model with a pooled "
                         f"feature or a CLS token); supported families: {supported}")
    return BACKBONE_FAMILIES[model_type]


def _resnet(depths, hidden_sizes, layer_type, embedding_size=64):
    return {"model_type": "resnet", "embedding_size": embedding_size, "hidden_sizes": hidden_sizes,
            "depths": depths, "layer_type": layer_type}


def _vit(hidden_size, layers, heads, patch_size, image_size=224):
    return {"model_type": "vit", "hidden_size": hidden_size, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": 4 * hidden_size, "patch_size": patch_size,
            "image_size": image_size, "qkv_bias": True}


# Named backbone presets a recipe can use with `backbone: NAME` (any other transformers vision config can be
# given in full with `backbone_config:`, or a checkpoint with `backbone_name_or_path:`).
BACKBONE_PRESETS: dict[str, dict] = {
    # The small reference setting of DESIGN.md (Fashion-MNIST, 32 px).
    "resnet-tiny": _resnet([1, 1, 1, 1], [32, 64, 128, 256], "basic", embedding_size=32),
    "resnet-18": _resnet([2, 2, 2, 2], [64, 128, 256, 512], "basic"),
    "resnet-34": _resnet([3, 4, 6, 3], [64, 128, 256, 512], "basic"),
    "resnet-50": _resnet([3, 4, 6, 3], [256, 512, 1024, 2048], "bottleneck"),
    "resnet-101": _resnet([3, 4, 23, 3], [256, 512, 1024, 2048], "bottleneck"),
    "resnet-152": _resnet([3, 8, 36, 3], [256, 512, 1024, 2048], "bottleneck"),
    "vit-tiny-16": _vit(192, 12, 3, 16),
    "vit-small-16": _vit(384, 12, 6, 16),
    "vit-small-8": _vit(384, 12, 6, 8),
    "vit-base-16": _vit(768, 12, 12, 16),
    "vit-base-8": _vit(768, 12, 12, 8),
    # transformers' EfficientNetConfig defaults to B7 (width 2.0, depth 3.1, 2560-d): B0 is width = depth = 1.0.
    "efficientnet-b0": {"model_type": "efficientnet", "width_coefficient": 1.0, "depth_coefficient": 1.0,
                        "hidden_dim": 1280, "image_size": 224, "dropout_rate": 0.2},
    "mobilenet-v2": {"model_type": "mobilenet_v2"},
    "convnext-tiny": {"model_type": "convnext", "depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]},
    # CPC's patch encoder for 8 px patches (LayerNorm, no BatchNorm): a 2 px stem, then 4x4 -> 2x2 -> 1x1, 128-d.
    "convnext-patch-8": {"model_type": "convnext", "patch_size": 2, "num_stages": 3, "depths": [1, 1, 1],
                         "hidden_sizes": [32, 64, 128]},
}


def backbone_config_from_preset(name: str, **overrides) -> PretrainedConfig:
    """The transformers config of a named preset, with `overrides` (e.g. `image_size` for a ViT) applied."""
    if name not in BACKBONE_PRESETS:
        raise ValueError(f"Unknown backbone {name!r}; valid presets: {', '.join(sorted(BACKBONE_PRESETS))}")
    kwargs = {**BACKBONE_PRESETS[name], **overrides}
    return AutoConfig.for_model(**kwargs)


def freeze_unused_parameters(backbone: PreTrainedModel) -> None:
    """Freeze the parameters of `backbone` that its pooled feature never uses (see `BackboneFamily`)."""
    for name in backbone_family(backbone.config.model_type).unused_parameters:
        backbone.get_parameter(name).requires_grad_(False)


def at_input_size(backbone: PreTrainedModel, size: int) -> PreTrainedModel:
    """`backbone` for `size` px inputs, giving its pooled feature without `interpolate_pos_encoding`: for the families
    whose plain forward refuses other sizes than `config.image_size` (ViT, DeiT, ViT-MSN started from a checkpoint of
    another resolution), a copy whose config says `size` and whose position embeddings are the ones `pooled_features`
    interpolates to at that size; so the exported encoder works with a plain `model(**processor(image))` and the
    image-feature-extraction pipeline. Other backbones are returned as they are."""
    if not backbone_family(backbone.config.model_type).fixed_input_size or backbone.config.image_size == size:
        return backbone
    config = copy.deepcopy(backbone.config)
    config.image_size = size
    resized = build_backbone(config).to(backbone.dtype)
    positions = backbone.embeddings.position_embeddings
    special_tokens = positions.shape[1] - backbone.embeddings.patch_embeddings.num_patches  # CLS (+ DeiT's distillation)
    tokens = positions.new_zeros(1, special_tokens + (size // config.patch_size) ** 2, positions.shape[-1])
    state = backbone.state_dict()
    with torch.no_grad():
        state["embeddings.position_embeddings"] = backbone.embeddings.interpolate_pos_encoding(tokens, size, size)
    resized.load_state_dict(state)
    return resized.train(backbone.training)


def build_backbone(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised transformers vision model for `config` (ViT and DeiT without their pooling layer)."""
    backbone = AutoModel.from_config(config, **backbone_family(config.model_type).init_kwargs)
    freeze_unused_parameters(backbone)
    return backbone


def load_backbone(name_or_path: str) -> PreTrainedModel:
    """The backbone of a Hub or local transformers checkpoint (`backbone_name_or_path`) in float32, built as
    `build_backbone` builds it, so that its `state_dict` loads strictly into a method's backbones.

    A task model's checkpoint (e.g. `ViTForImageClassification`) gives its base model; weights beyond the backbone (a
    ViT pooler, a classifier) are dropped. A backbone weight the checkpoint lacks is an error (transformers would
    initialise it at random: a composite model's folder would load as a random ViT), except a pooler's: BEiT's pooler
    LayerNorm is not in masked-image-modeling checkpoints and starts at its default (weight 1, bias 0), with a warning.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    family = backbone_family(config.model_type)
    backbone, loading_info = AutoModel.from_pretrained(name_or_path, config=config, dtype=torch.float32,
                                                       output_loading_info=True, **family.init_kwargs)
    missing = sorted(loading_info["missing_keys"])
    not_pooler = [key for key in missing if not key.startswith("pooler.")]
    if not_pooler:
        raise ValueError(f"{name_or_path} is not a {family.name} backbone checkpoint: it has no weights for "
                         f"{len(not_pooler)} of the backbone's tensors (e.g. {', '.join(not_pooler[:3])})")
    if missing:
        logger.warning(f"{name_or_path} has no pooler weights; {', '.join(missing)} start at their default")
    freeze_unused_parameters(backbone)
    return backbone


def pooled_features(backbone: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The `[B, D]` feature of `pixel_values` (see the module docstring); the exported encoder gives the same.
    Inputs of another size than `config.image_size` interpolate the position embeddings."""
    family = backbone_family(backbone.config.model_type)
    kwargs = {"interpolate_pos_encoding": True} if family.interpolates_positions else {}
    outputs = backbone(pixel_values=pixel_values, **kwargs)
    if family.cls_token:
        return outputs.last_hidden_state[:, 0]
    if outputs.pooler_output is None:
        raise ValueError(f"this {type(backbone).__name__} was built without its pooling layer "
                         "(add_pooling_layer=False), which gives its pooled feature")
    return outputs.pooler_output.flatten(1)


def feature_dim(backbone: PreTrainedModel) -> int:
    """Size of the pooled feature of `backbone`: the hidden size of a CLS-token model, else read off one forward pass
    of a small blank batch."""
    config = backbone.config
    if backbone_family(config.model_type).cls_token:
        return config.hidden_size
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        size = max(32, 2 * getattr(config, "patch_size", 1))
        blank = torch.zeros(1, getattr(config, "num_channels", 3), size, size, dtype=backbone.dtype)
        dim = pooled_features(backbone, blank).shape[-1]
    backbone.train(was_training)
    return dim
