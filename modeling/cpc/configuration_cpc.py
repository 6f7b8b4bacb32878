from transformers import AutoConfig, PretrainedConfig

from ..backbones import backbone_config_from_preset
from ..heads import ContextNetworkConfig

# Prediction directions, each a rotation of the grid (quarter turns counter-clockwise, torch.rot90) after which the
# direction points down the rows: "down" is CPC v1's (context from the rows above predicts the rows below).
DIRECTION_ROTATIONS = {"down": 0, "left": 1, "up": 2, "right": 3}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CpcConfig(PretrainedConfig):
    r"""Configuration of [`CpcForPreTraining`]: CPC v2 (Hénaff et al., ICML 2020, "Data-Efficient Image Recognition
    with Contrastive Predictive Coding"). Each image is a `grid_size x grid_size` grid of overlapping
    `patch_size` px patches `patch_stride` px apart (the view recipe `patch_grid` cuts and augments them); the patch
    encoder turns each into one vector z_ij, a masked context network reads the grid, and c_ij predicts the rows
    k = `prediction_offsets` ahead (ẑ_{i+k,j} = W_k c_ij) against every patch position of every image of the global
    batch (InfoNCE), from each of the `directions`.

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*): the patch encoder, a transformers vision backbone
            without BatchNorm (BatchNorm statistics leak information between the patches of an image, which the model
            refuses when built); defaults to the `convnext-patch-8` preset (a tiny ConvNeXt for 8 px patches).
        context_config (`dict` or `ContextNetworkConfig`, *optional*): the context network; `in_dim` is the patch
            encoder's feature size (the training loop fills it in); defaults: 256 channels, 5 blocks (the paper's).
        patch_size (`int`, defaults to 8), patch_stride (`int`, defaults to 4), grid_size (`int`, defaults to 7): the
            grid geometry (8 px patches, stride 4, on 32 px images: 7 x 7; the paper's v1 geometry is 64, 32 on 256 px).
            The view recipe's `patch_size` / `patch_stride` and the image size must give this grid.
        prediction_offsets (`list[int]`, defaults to `[2, 3, 4]`): the rows k ahead that c_ij predicts; k = 1 is
            allowed but is a patch that overlaps row i when `patch_stride < patch_size`; each k < grid_size.
        directions (`list[str]`, defaults to all four): any of "down" (CPC v1), "up", "left", "right": one context
            network for all, one set of W_k per direction.
        target_dim (`int`, defaults to 64): size of the target vectors (a 1x1 conv of z, shared by the directions)
            and of the predictions.
        prediction_scale (`float`, defaults to 0.1): logits = scale · ẑ·t (the paper's `emb_scale`).

    The published encoder is the patch encoder; its whole-image feature (what `AutoModel` / `pipeline` give, and what
    `hf-ssl eval` measures) is the encoder run on the whole image. The mean of the patch vectors over the grid is
    `modeling.cpc.patch_mean_features` (compared in benchmarks/cpc_image_features.py).
    """

    model_type = "hf_ssl_cpc"
    sub_configs = {"backbone_config": AutoConfig, "context_config": ContextNetworkConfig}
    # Sub-configs whose `in_dim` is the backbone's pooled feature size (the training loop fills it in).
    backbone_feature_configs = ("context_config",)

    def __init__(self, backbone_config=None, context_config=None, patch_size: int = 8, patch_stride: int = 4,
                 grid_size: int = 7, prediction_offsets=(2, 3, 4), directions=tuple(DIRECTION_ROTATIONS),
                 target_dim: int = 64, prediction_scale: float = 0.1, **kwargs):
        if backbone_config is None:
            backbone_config = backbone_config_from_preset("convnext-patch-8")
        elif isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        if not isinstance(context_config, ContextNetworkConfig):
            context_config = ContextNetworkConfig(**(context_config or {}))
        for name, value in (("patch_size", patch_size), ("patch_stride", patch_stride), ("grid_size", grid_size),
                            ("target_dim", target_dim)):
            _positive_int(name, value)
        offsets = list(prediction_offsets)
        if not offsets or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < grid_size for k in offsets):
            raise ValueError(f"prediction_offsets must be rows ahead k with 1 <= k < grid_size={grid_size}, got "
                             f"{offsets}")
        if len(set(offsets)) != len(offsets):
            raise ValueError(f"prediction_offsets has repeated offsets: {offsets}")
        directions = list(directions)
        unknown = [d for d in directions if d not in DIRECTION_ROTATIONS]
        if not directions or unknown or len(set(directions)) != len(directions):
            raise ValueError(f"directions must be distinct values of {list(DIRECTION_ROTATIONS)}, at least one, got "
                             f"{directions}")
        if isinstance(prediction_scale, bool) or not isinstance(prediction_scale, (int, float)) or prediction_scale <= 0:
            raise ValueError(f"prediction_scale must be > 0, got {prediction_scale!r}")
        self.backbone_config = backbone_config
        self.context_config = context_config
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.grid_size = grid_size
        self.prediction_offsets = offsets
        self.directions = directions
        self.target_dim = target_dim
        self.prediction_scale = float(prediction_scale)
        super().__init__(**kwargs)

    @property
    def direction_loss_weight(self) -> float:
        """The loss is the mean of the per-direction losses (each a mean over the offsets)."""
        return 1.0 / len(self.directions)
