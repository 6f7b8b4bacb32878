from .configuration_relic import RelicConfig
from .modeling_relic import RelicForPreTraining, RelicPreTrainingOutput, sample_candidates

__all__ = ["RelicConfig", "RelicForPreTraining", "RelicPreTrainingOutput", "sample_candidates"]
