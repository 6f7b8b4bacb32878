from ..moco.configuration_moco import PROJECTOR_DEFAULTS, MocoConfig


class DiscoConfig(MocoConfig):
    r"""Configuration of [`DiscoForPreTraining`] (Gao et al., ECCV 2022, "DisCo: Remedy Self-supervised Learning on
    Lightweight Models with Distilled Contrastive Learning"): a MoCo v2 student (its own momentum encoder and
    queue; see [`MocoConfig`]) distilled from a frozen, already self-supervised teacher loaded by name.

    Args:
        backbone_config, projector_config, contrastive_temperature, queue_size: the student, as in [`MocoConfig`] (version 2).
            The projector's hidden width defaults to 2048 (the paper's "bottleneck" finding).
        teacher_name_or_path (`str`): a Hub repo id or local directory holding an hf-ssl pretraining model with a
            projection embedding (`OUTPUT_DIR/pretraining` of a moco or disco run, or a repo pushed with
            `--include_pretraining`, whose `pretraining/` folder is found automatically). Loaded read-only; never
            saved with the student, reloaded by name.
        teacher_revision (`str`, *optional*): Hub revision; after loading, the resolved commit sha.
        teacher_subfolder (`str`, defaults to ""): folder of the repo/directory holding the teacher.
        teacher_sha256 (`str`, *optional*): sha256 of the teacher's `model.safetensors`, recorded at the first load
            and checked at every later one.
        contrastive_weight, query_distillation_weight, key_distillation_weight (`float`, default 1.0): weights of
            InfoNCE, MSE(norm(teacher(x_q)), norm(student_q(x_q))) and MSE(norm(teacher(x_k)), norm(student_q(x_k))).
    """

    model_type = "hf_ssl_disco"

    def __init__(self, backbone_config=None, projector_config=None, contrastive_temperature: float | None = None,
                 queue_size: int | None = None, teacher_name_or_path: str | None = None,
                 teacher_revision: str | None = None, teacher_subfolder: str = "", teacher_sha256: str | None = None,
                 contrastive_weight: float = 1.0, query_distillation_weight: float = 1.0,
                 key_distillation_weight: float = 1.0, **kwargs):
        version = kwargs.pop("version", 2)
        if version != 2:
            raise ValueError(f"the DisCo student is MoCo v2: version must be 2, got {version!r}")
        if kwargs.pop("predictor_config", None) is not None:  # None in a saved config.json
            raise ValueError("the DisCo student is MoCo v2, which has no predictor: remove predictor_config")
        self.teacher_name_or_path = teacher_name_or_path
        self.teacher_revision = teacher_revision
        self.teacher_subfolder = teacher_subfolder
        self.teacher_sha256 = teacher_sha256
        self.contrastive_weight = contrastive_weight
        self.query_distillation_weight = query_distillation_weight
        self.key_distillation_weight = key_distillation_weight
        super().__init__(backbone_config=backbone_config, projector_config=projector_config, version=2,
                         contrastive_temperature=contrastive_temperature, queue_size=queue_size, **kwargs)

    @staticmethod
    def _projector_defaults(version: int) -> dict:
        return {**PROJECTOR_DEFAULTS[2], "hidden_dim": 2048}
