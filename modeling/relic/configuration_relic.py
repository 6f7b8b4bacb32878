from ..moco.configuration_moco import MocoConfig

# BYOL's projector (RELICv2 builds on the BYOL code): Linear(d, 4096) -> BN -> ReLU -> Linear(4096, 256), no last BN.
PROJECTOR_DEFAULTS = {"hidden_dim": 4096, "out_dim": 256, "num_layers": 2, "norm": "batchnorm", "last_norm": False}


class RelicConfig(MocoConfig):
    r"""Configuration of [`RelicForPreTraining`]: RELICv2 (Tomasev et al. 2022, "Pushing the limits of
    self-supervised ResNets: Can we outperform supervised learning without labels on ImageNet?", arXiv 2201.05119).
    Built on MoCo v3's pieces (online encoder + projector [+ predictor], EMA target encoder, negatives from the
    gathered batch, no queue).

    The loss of one (anchor view, positive view) pair, for anchor image i with candidates K_i = {i} ∪ n_e negatives
    drawn at random from the other images of the global batch (`sample_candidates`):
        p_i(k) = softmax_{k ∈ K_i}( <f(x_i^a), g(x_k^b)> / τ )   the online anchor against the target candidates,
        q_i(k) = softmax_{k ∈ K_i}( <g(x_i^b), g(x_k^b)> / τ )   the target's own embedding of the positive against
                                                                 the same candidates (stop-gradient),
        loss_i = α · (-log p_i(i)) + β · KL(q_i ‖ p_i),
    embeddings L2-normalised, f = online backbone + projector (+ predictor), g = target (EMA) backbone + projector,
    a = the anchor's view (large or small), b = a large view. Our reading of the paper's `sg[p(x_i^b; g, g)]`: the
    target side needs only the target embeddings of view b, as the paper's pseudocode `loss_relicv2(o_i, t_j, n_e)`
    requires (small crops never go through the target network); it equals "the target's embedding of the anchor view"
    when a = b. q is peaked on i (self-similarity 1) and spreads over the negatives the target finds similar to i, so
    the KL asks the online network to keep the target's similarity structure across views.

    Multi-crop (the `relic_views` view recipe): the pairs are (large a, large b) for every a and b, a = b included,
    and (small a, large b); the sum over pairs is divided by (L + S) · L.

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*): as [`MocoConfig`].
        projector_config (`dict` or `ProjectionHeadConfig`, *optional*): missing keys from BYOL's projector,
            Linear -> BatchNorm -> ReLU -> Linear (4096 hidden, 256 out).
        predictor_config (`dict` or `ProjectionHeadConfig`, *optional*): an online predictor after the projector
            (missing keys: MoCo v3's / BYOL's 2 layers, 4096 hidden, BN; `in_dim` = `out_dim` = the projector's
            `out_dim`). None (default): no predictor.
        contrastive_temperature (`float`, defaults to 0.2): τ, of both distributions (ours: not given by the paper).
        contrastive_weight (`float`, defaults to 1.0): α, the weight of the contrastive term.
        invariance_weight (`float`, defaults to 1.0): β, the weight of the KL term (0: the contrastive term only).
        num_negatives (`int`, defaults to 64): n_e, negatives per anchor, drawn without replacement from the other
            images of the global batch (ours); when the global batch has no more than n_e other images, all are used.
        mask_column (`str`, *optional*): the dataset column holding each image's foreground mask (an image, white =
            foreground), read when the view recipe's `mask_p` > 0 (saliency masking).
    """

    model_type = "hf_ssl_relic"

    def __init__(self, backbone_config=None, projector_config=None, predictor_config=None,
                 contrastive_temperature: float = 0.2, contrastive_weight: float = 1.0, invariance_weight: float = 1.0,
                 num_negatives: int = 64, mask_column: str | None = None, **kwargs):
        # A saved config also holds MoCo's `version` / `queue_size`: RELICv2 is always a queue-free v3.
        version, queue_size = kwargs.pop("version", 3), kwargs.pop("queue_size", 0)
        if (version, queue_size) != (3, 0):
            raise ValueError(f"RELICv2 takes its negatives from the batch: version must be 3 and queue_size 0, got "
                             f"{version} and {queue_size}")
        for name, value in (("contrastive_weight", contrastive_weight), ("invariance_weight", invariance_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be a positive int, got {num_negatives!r}")
        if mask_column is not None and (not isinstance(mask_column, str) or not mask_column):
            raise ValueError(f"mask_column must be a dataset column name, got {mask_column!r}")
        self.contrastive_weight = contrastive_weight
        self.invariance_weight = invariance_weight
        self.num_negatives = num_negatives
        self.mask_column = mask_column
        super().__init__(backbone_config=backbone_config, projector_config=projector_config,
                         predictor_config={} if predictor_config is None else predictor_config, version=3,
                         contrastive_temperature=contrastive_temperature, queue_size=0, **kwargs)
        if predictor_config is None:  # MoCo v3 always has a predictor; RELICv2's is optional
            self.predictor_config = None

    @staticmethod
    def _projector_defaults(version: int) -> dict:
        return PROJECTOR_DEFAULTS
