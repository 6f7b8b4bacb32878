from math import comb

from ..moco.configuration_moco import MocoConfig, _head_config

# The official code's heads (orashi/Fast-MoCo), not MoCo v3's: projector 3 x Linear(2048), each followed by BatchNorm
# (the last one WITH affine), ReLU between; predictor 2048 -> 512 (BN, ReLU) -> 2048.
PROJECTOR_DEFAULTS = {"hidden_dim": 2048, "out_dim": 2048, "num_layers": 3, "norm": "batchnorm", "last_norm": True,
                      "last_norm_affine": True}
PREDICTOR_DEFAULTS = {"hidden_dim": 512, "num_layers": 2, "norm": "batchnorm", "last_norm": False}
TARGET_VIEWS = ("other", "same")


class FastMocoConfig(MocoConfig):
    r"""Configuration of [`FastMocoForPreTraining`]: Fast-MoCo (Ci et al., ECCV 2022, "Fast-MoCo: Boost
    Momentum-based Contrastive Learning with Combinatorial Patches"), a MoCo v3 (negatives from the global batch,
    no queue) whose queries are combinations of the pooled features of the crops of a grid cut from each view.

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*): as [`MocoConfig`].
        projector_config (`dict` or `ProjectionHeadConfig`, *optional*): missing keys from the official code's
            projector: 3 layers, 2048 hidden, 2048 out, BatchNorm after every layer, the last one affine.
        predictor_config (`dict` or `ProjectionHeadConfig`, *optional*): 2 layers, 512 hidden, BatchNorm; `in_dim`
            and `out_dim` are the projector's `out_dim`.
        grid_size (`int`, defaults to 2): m, each view is cut into an m x m grid of crops (the view recipe's `grid`
            augmentation key must be the same).
        num_combined (`int`, defaults to 2): n, the number of crop features averaged per combined sample,
            1 <= n <= m²; C(m², n) combined samples per view.
        target_view (`str`, defaults to `"other"`): the momentum encoder's view each combined sample is matched to:
            `"other"` (the paper) or `"same"` (the ablation, which the paper shows to hurt).
        contrastive_temperature (`float`, defaults to 1.0): InfoNCE temperature (no 2T factor, unlike MoCo v3).
    """

    model_type = "hf_ssl_fast_moco"

    def __init__(self, backbone_config=None, projector_config=None, predictor_config=None, grid_size: int = 2,
                 num_combined: int = 2, target_view: str = "other", contrastive_temperature: float = 1.0, **kwargs):
        # A saved config also holds MoCo's `version` / `queue_size`: Fast-MoCo is always a queue-free v3.
        version, queue_size = kwargs.pop("version", 3), kwargs.pop("queue_size", 0)
        if (version, queue_size) != (3, 0):
            raise ValueError(f"Fast-MoCo is a MoCo v3 without a queue: version must be 3 and queue_size 0, got "
                             f"{version} and {queue_size}")
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"grid_size must be a positive int, got {grid_size!r}")
        num_crops = grid_size * grid_size
        if isinstance(num_combined, bool) or not isinstance(num_combined, int) or not 1 <= num_combined <= num_crops:
            raise ValueError(f"num_combined must be an int in 1..grid_size² = 1..{num_crops} (the crops averaged per "
                             f"combined sample), got {num_combined!r}")
        if target_view not in TARGET_VIEWS:
            raise ValueError(f"target_view must be one of {list(TARGET_VIEWS)}, got {target_view!r}")
        projector_config = _head_config(projector_config, PROJECTOR_DEFAULTS)
        predictor_config = _head_config(predictor_config, PREDICTOR_DEFAULTS, in_dim=projector_config.out_dim,
                                        out_dim=projector_config.out_dim)
        self.grid_size = grid_size
        self.num_combined = num_combined
        self.target_view = target_view
        super().__init__(backbone_config=backbone_config, projector_config=projector_config,
                         predictor_config=predictor_config, version=3, contrastive_temperature=contrastive_temperature,
                         queue_size=0, **kwargs)

    @property
    def num_combinations(self) -> int:
        """C(m², n): combined samples per view."""
        return comb(self.grid_size * self.grid_size, self.num_combined)

    @property
    def view_loss_weight(self) -> float:
        """The loss is the mean of `loss_view_1` and `loss_view_2` (each a mean over its view's combinations), i.e. the
        mean over the 2·C(m², n) terms: each view's term weighs 1/2."""
        return 0.5
