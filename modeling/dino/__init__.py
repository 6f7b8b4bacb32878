from .configuration_dino import DinoConfig
from .modeling_dino import DinoForPreTraining, DinoPreTrainingOutput

__all__ = ["DinoConfig", "DinoForPreTraining", "DinoPreTrainingOutput"]
