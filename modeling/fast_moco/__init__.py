from .configuration_fast_moco import FastMocoConfig
from .modeling_fast_moco import FastMocoForPreTraining, FastMocoPreTrainingOutput, combination_indices

__all__ = ["FastMocoConfig", "FastMocoForPreTraining", "FastMocoPreTrainingOutput", "combination_indices"]
