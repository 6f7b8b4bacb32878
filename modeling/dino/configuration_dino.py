from transformers import AutoConfig, PretrainedConfig

from ..backbones import backbone_config_from_preset
from ..heads import DinoHeadConfig


class DinoConfig(PretrainedConfig):
    r"""Configuration of [`DinoForPreTraining`] (Caron et al., 2021, "Emerging Properties in Self-Supervised
    Vision Transformers").

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*):
            Any transformers vision backbone config; defaults to the tiny ResNet of the small reference setting.
        head_config (`dict` or `DinoHeadConfig`, *optional*):
            The projection head (`in_dim` must equal the backbone's pooled feature size).
        student_temperature (`float`, defaults to 0.1): τs of the student softmax.
        center_momentum (`float`, defaults to 0.9): EMA rate of the teacher-logit center.
        num_global_crops (`int`, defaults to 2): the first crops, seen by the teacher.
        freeze_last_layer_epochs (`int`, defaults to 1): epochs during which the prototype layer gets no update.
        koleo_weight (`float`, defaults to 0.0): weight of the KoLeo regulariser on the student's pooled features
            of each global crop (DINOv2 uses 0.1); 0 is the original DINO.
        warmup_teacher_temperature (`float`, defaults to 0.04), teacher_temperature (`float`, defaults to 0.04),
        warmup_teacher_temperature_epochs (`float`, defaults to 30): τt goes linearly from the first to the second
            over that many epochs, then stays (the paper's ViT-S/16: 0.04 -> 0.07 over 30 epochs).
    """

    model_type = "hf_ssl_dino"
    sub_configs = {"backbone_config": AutoConfig, "head_config": DinoHeadConfig}
    # Sub-configs whose `in_dim` is the backbone's pooled feature size (the training loop fills it in).
    backbone_feature_configs = ("head_config",)

    def __init__(self, backbone_config=None, head_config=None, student_temperature: float = 0.1,
                 center_momentum: float = 0.9, num_global_crops: int = 2, freeze_last_layer_epochs: int = 1,
                 koleo_weight: float = 0.0, warmup_teacher_temperature: float = 0.04,
                 teacher_temperature: float = 0.04, warmup_teacher_temperature_epochs: float = 30.0, **kwargs):
        if backbone_config is None:
            backbone_config = backbone_config_from_preset("resnet-tiny")
        elif isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        if head_config is None:
            head_config = DinoHeadConfig()
        elif isinstance(head_config, dict):
            head_config = DinoHeadConfig(**head_config)
        self.backbone_config = backbone_config
        self.head_config = head_config
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.num_global_crops = num_global_crops
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight}")
        self.koleo_weight = koleo_weight
        for name, value in (("warmup_teacher_temperature", warmup_teacher_temperature),
                            ("teacher_temperature", teacher_temperature)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if warmup_teacher_temperature_epochs < 0:
            raise ValueError(f"warmup_teacher_temperature_epochs must be >= 0, got {warmup_teacher_temperature_epochs}")
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature_epochs = warmup_teacher_temperature_epochs
        super().__init__(**kwargs)
