from transformers import AutoConfig, PretrainedConfig

from ..backbones import backbone_config_from_preset
from ..heads import ProjectionHeadConfig

# The papers' heads (official code): v2 `Linear(d, d) -> ReLU -> Linear(d, 128)` on the d-dim pooled feature;
# v3 projector 3 layers, 4096 hidden -> 256, BatchNorm, affine-free last BN; v3 predictor 2 layers 4096 -> 256.
PROJECTOR_DEFAULTS = {
    2: {"hidden_dim": None, "out_dim": 128, "num_layers": 2, "norm": None, "last_norm": False},
    3: {"hidden_dim": 4096, "out_dim": 256, "num_layers": 3, "norm": "batchnorm", "last_norm": True},
}
PREDICTOR_DEFAULTS = {"hidden_dim": 4096, "out_dim": 256, "num_layers": 2, "norm": "batchnorm", "last_norm": False}
TEMPERATURE_DEFAULTS = {2: 0.2, 3: 1.0}
QUEUE_SIZE_DEFAULTS = {2: 65536, 3: 0}


def _head_config(given, defaults: dict, **fixed) -> ProjectionHeadConfig:
    """A head config from a dict (missing keys from `defaults`) or a ready config; `fixed` keys are set when absent."""
    if isinstance(given, ProjectionHeadConfig):
        return given
    kwargs = {**defaults, **fixed, **(given or {})}
    return ProjectionHeadConfig(**kwargs)


class MocoConfig(PretrainedConfig):
    r"""Configuration of [`MocoForPreTraining`]: MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum
    Contrastive Learning") or MoCo v3 (Chen, Xie & He, ICCV 2021, "An Empirical Study of Training Self-Supervised
    Vision Transformers").

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*):
            Any transformers vision backbone config; defaults to the tiny ResNet of the small reference setting.
        projector_config (`dict` or `ProjectionHeadConfig`, *optional*):
            The projection head (`in_dim` must equal the backbone's pooled feature size); missing keys take the
            version's defaults (v2: 2 layers, hidden = in_dim, 128 out; v3: 3 layers, 4096 hidden, 256 out, BN).
        predictor_config (`dict` or `ProjectionHeadConfig`, *optional*):
            MoCo v3's predictor (2 layers, 4096 hidden, BN); its `in_dim` and `out_dim` are the projector's `out_dim`.
            v2 has none.
        version (`int`, defaults to 2): 2 (momentum queue of negatives) or 3 (negatives from the batch, symmetric).
        contrastive_temperature (`float`, *optional*): InfoNCE temperature T (not `temperature`, which transformers
            reserves for generation); v2 0.2, v3 1.0 (0.2 for ViTs in the paper).
        queue_size (`int`, *optional*): v2's number of queued negative keys (65536); must be 0 for v3.
    """

    model_type = "hf_ssl_moco"
    sub_configs = {"backbone_config": AutoConfig, "projector_config": ProjectionHeadConfig,
                   "predictor_config": ProjectionHeadConfig}
    # Sub-configs whose `in_dim` is the backbone's pooled feature size (the training loop fills it in).
    backbone_feature_configs = ("projector_config",)

    def __init__(self, backbone_config=None, projector_config=None, predictor_config=None, version: int = 2,
                 contrastive_temperature: float | None = None, queue_size: int | None = None, **kwargs):
        if version not in (2, 3):
            raise ValueError(f"MoCo version must be 2 or 3, got {version!r}")
        if backbone_config is None:
            backbone_config = backbone_config_from_preset("resnet-tiny")
        elif isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        projector_config = _head_config(projector_config, self._projector_defaults(version))
        if version == 2 and predictor_config is not None:
            raise ValueError("predictor_config is MoCo v3's; MoCo v2 (version=2) has no predictor")
        if version == 3:
            predictor_config = _head_config(predictor_config, PREDICTOR_DEFAULTS, in_dim=projector_config.out_dim,
                                            out_dim=projector_config.out_dim)
            if predictor_config.in_dim != projector_config.out_dim:
                raise ValueError(f"the predictor takes the projector's output: predictor_config.in_dim="
                                 f"{predictor_config.in_dim} != projector_config.out_dim={projector_config.out_dim}")
            if predictor_config.out_dim != projector_config.out_dim:
                raise ValueError(f"predictor_config.out_dim={predictor_config.out_dim} must equal the key "
                                 f"embedding size projector_config.out_dim={projector_config.out_dim}")
        queue_size = QUEUE_SIZE_DEFAULTS[version] if queue_size is None else queue_size
        if version == 3 and queue_size:
            raise ValueError(f"MoCo v3 takes its negatives from the batch: queue_size must be 0, got {queue_size}")
        if version == 2 and queue_size < 1:
            raise ValueError(f"MoCo v2 needs a queue of negatives: queue_size must be >= 1, got {queue_size}")
        contrastive_temperature = (TEMPERATURE_DEFAULTS[version] if contrastive_temperature is None
                                   else contrastive_temperature)
        if contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {contrastive_temperature}")
        self.backbone_config = backbone_config
        self.projector_config = projector_config
        self.predictor_config = predictor_config
        self.version = version
        self.contrastive_temperature = contrastive_temperature
        self.queue_size = queue_size
        super().__init__(**kwargs)

    @staticmethod
    def _projector_defaults(version: int) -> dict:
        return PROJECTOR_DEFAULTS[version]
