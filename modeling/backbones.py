"""Build a transformers vision backbone and turn its outputs into the one pooled feature per image.

The pooled feature is the representation the methods train and the exported encoder gives:
  * CNNs (ResNet, ConvNeXt, EfficientNet, MobileNetV2, ...): `pooler_output`, flattened to `[B, C]`;
  * ViT-style models: the CLS token of the final `last_hidden_state` (after the final LayerNorm).
"""
import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

# Models whose pooled feature is the CLS token of `last_hidden_state` (their `pooler_output`, when present,
# is an extra randomly initialised dense layer that self-supervised training never touches).
CLS_TOKEN_MODEL_TYPES = ("vit", "deit", "dinov2", "vit_msn")


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
}


def backbone_config_from_preset(name: str, **overrides) -> PretrainedConfig:
    """The transformers config of a named preset, with `overrides` (e.g. `image_size` for a ViT) applied."""
    if name not in BACKBONE_PRESETS:
        raise ValueError(f"Unknown backbone {name!r}; valid presets: {', '.join(sorted(BACKBONE_PRESETS))}")
    kwargs = {**BACKBONE_PRESETS[name], **overrides}
    return AutoConfig.for_model(**kwargs)


def build_backbone(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised transformers vision model for `config` (no pooling layer on ViT-style models)."""
    if config.model_type in CLS_TOKEN_MODEL_TYPES:
        return AutoModel.from_config(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def pooled_features(backbone: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The `[B, D]` feature of `pixel_values` (see the module docstring); the exported encoder gives the same."""
    if backbone.config.model_type in CLS_TOKEN_MODEL_TYPES:
        outputs = backbone(pixel_values=pixel_values, interpolate_pos_encoding=True)
        return outputs.last_hidden_state[:, 0]
    outputs = backbone(pixel_values=pixel_values)
    if getattr(outputs, "pooler_output", None) is None:
        raise ValueError(f"Backbone {type(backbone).__name__} gives no pooler_output; hf-ssl cannot pool its features")
    return outputs.pooler_output.flatten(1)


def feature_dim(backbone: PreTrainedModel) -> int:
    """Size of the pooled feature of `backbone`, read off one forward pass of a small blank batch."""
    config = backbone.config
    if config.model_type in CLS_TOKEN_MODEL_TYPES:
        return config.hidden_size
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        size = max(32, 2 * getattr(config, "patch_size", 1))
        blank = torch.zeros(1, getattr(config, "num_channels", 3), size, size, dtype=backbone.dtype)
        dim = pooled_features(backbone, blank).shape[-1]
    backbone.train(was_training)
    return dim
