from .configuration_cpc import CpcConfig
from .modeling_cpc import CpcForPreTraining, CpcPreTrainingOutput, patch_mean_features, rotate_grid
from .patches import patch_grid, patch_grid_shape

__all__ = ["CpcConfig", "CpcForPreTraining", "CpcPreTrainingOutput", "patch_grid", "patch_grid_shape",
           "patch_mean_features", "rotate_grid"]
