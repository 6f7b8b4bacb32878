from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..backbones import build_backbone, pooled_features
from ..distributed import all_gather_with_grad, all_reduce_mean
from ..heads import DinoHead
from ..losses import dino_loss, ema_update, koleo_loss
from ..pretraining import SSLPreTrainedModel, TrainingProgress
from ..schedules import linear_warmup_then_constant
from .configuration_dino import DinoConfig


@dataclass
class DinoPreTrainingOutput(ModelOutput):
    """
    loss: the DINO cross-entropy (+ koleo_weight × koleo).
    dino_loss: the DINO cross-entropy alone.
    koleo: the KoLeo term on the student's pooled features of the global crops, nearest neighbours searched in the
        global batch of every process (0 when koleo_weight is 0).
    teacher_entropy: mean entropy of the teacher's centred, sharpened distribution (collapse: → 0 or → ln K).
    teacher_center_kl: mean KL(teacher ‖ softmax(center / τt)); near 0 means the teacher only outputs the center.
    embedding_std: std over the batch of the L2-normalised teacher features, averaged over dimensions
        (1/sqrt(D) for well-spread features, 0 when collapsed).
    """

    loss: torch.FloatTensor | None = None
    dino_loss: torch.FloatTensor | None = None
    koleo: torch.FloatTensor | None = None
    teacher_entropy: torch.FloatTensor | None = None
    teacher_center_kl: torch.FloatTensor | None = None
    embedding_std: torch.FloatTensor | None = None


class DinoForPreTraining(SSLPreTrainedModel):
    """DINO: a student (backbone + head) matches an EMA teacher's centred, sharpened outputs across crops.

    `forward(global_crops, local_crops, teacher_temperature)` takes crops stacked crop-major: `global_crops` is
    `[num_global_crops * B, C, H, W]` (crop 0 of every image, then crop 1, ...), `local_crops` likewise.
    The published encoder is the teacher backbone.
    """

    config_class = DinoConfig
    base_model_prefix = "dino"
    backbone_attributes = ("student_backbone", "teacher_backbone")

    def __init__(self, config: DinoConfig):
        super().__init__(config)
        self.student_backbone = build_backbone(config.backbone_config)
        self.student_head = DinoHead(config.head_config)
        self.teacher_backbone = build_backbone(config.backbone_config)
        self.teacher_head = DinoHead(config.head_config)
        self.register_buffer("center", torch.zeros(1, config.head_config.out_dim))
        self.post_init()
        # The teacher starts as a copy of the student and is only ever updated by EMA.
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.set_requires_grad()

    def set_requires_grad(self) -> None:
        self.student_head.set_requires_grad()
        self.teacher_backbone.requires_grad_(False)
        self.teacher_head.requires_grad_(False)

    def _init_weights(self, module):
        if module is self:
            torch.nn.init.zeros_(self.center)

    def get_encoder(self):
        return self.teacher_backbone

    def _student_features(self, global_crops, local_crops):
        """The student's pooled features of the global crops and of all crops (global first)."""
        global_features = pooled_features(self.student_backbone, global_crops)
        if local_crops is None or local_crops.numel() == 0:
            return global_features, global_features
        return global_features, torch.cat([global_features, pooled_features(self.student_backbone, local_crops)])

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                teacher_temperature: float | None = None, return_dict: bool = True) -> DinoPreTrainingOutput:
        if teacher_temperature is None:  # called without the schedule (e.g. by transformers' Trainer): τt's end value
            teacher_temperature = self.config.teacher_temperature
        n_global = self.config.num_global_crops
        if global_crops.shape[0] % n_global:
            raise ValueError(f"global_crops has {global_crops.shape[0]} rows, not a multiple of "
                             f"num_global_crops={n_global}")
        batch_size = global_crops.shape[0] // n_global
        student_global, student_all = self._student_features(global_crops, local_crops)
        student_logits = self.student_head(student_all).split(batch_size)
        with torch.no_grad():
            teacher_features = pooled_features(self.teacher_backbone, global_crops)
            teacher_logits = self.teacher_head(teacher_features)
        distillation = dino_loss(list(student_logits), list(teacher_logits.split(batch_size)), self.center,
                                 self.config.student_temperature, teacher_temperature)
        loss = distillation
        koleo = torch.zeros((), device=distillation.device)
        if self.config.koleo_weight:
            # On the global batch: this process's images against every process's (gathered with gradient).
            koleo = sum(koleo_loss(crop, candidates=gathered, offset=offset)
                        for crop in student_global.split(batch_size)
                        for gathered, offset in [all_gather_with_grad(crop)]) / n_global
            loss = distillation + self.config.koleo_weight * koleo

        with torch.no_grad():
            log_q = F.log_softmax((teacher_logits - self.center) / teacher_temperature, dim=-1)
            q = log_q.exp()
            entropy = -(q * log_q).sum(-1).mean()
            log_c = F.log_softmax(self.center / teacher_temperature, dim=-1)
            center_kl = (q * (log_q - log_c)).sum(-1).mean()
            embedding_std = F.normalize(teacher_features.float(), dim=-1).std(0).mean()
            if self.training:
                batch_center = all_reduce_mean(teacher_logits.to(self.center.dtype).mean(0, keepdim=True))
                m = self.config.center_momentum
                self.center.mul_(m).add_(batch_center, alpha=1 - m)

        output = DinoPreTrainingOutput(loss=loss, dino_loss=distillation.detach(), koleo=koleo.detach(),
                                       teacher_entropy=entropy, teacher_center_kl=center_kl,
                                       embedding_std=embedding_std)
        return output if return_dict else output.to_tuple()

    def schedule_values(self, progress: TrainingProgress) -> dict[str, float]:
        """τt: linear warmup, then constant."""
        config = self.config
        warmup = progress.steps(config.warmup_teacher_temperature_epochs)
        return {"teacher_temperature": linear_warmup_then_constant(
            progress.step, warmup, config.warmup_teacher_temperature, config.teacher_temperature)}

    def before_optimizer_step(self, progress: TrainingProgress) -> None:
        if progress.epoch < self.config.freeze_last_layer_epochs:
            for p in self.student_head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def post_optimizer_step(self, momentum: float) -> None:
        ema_update(self.teacher_backbone.parameters(), self.student_backbone.parameters(), momentum)
        ema_update(self.teacher_head.parameters(), self.student_head.parameters(), momentum)
