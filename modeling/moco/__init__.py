from .configuration_moco import MocoConfig
from .modeling_moco import MocoForPreTraining, MocoPreTrainingOutput

__all__ = ["MocoConfig", "MocoForPreTraining", "MocoPreTrainingOutput"]
