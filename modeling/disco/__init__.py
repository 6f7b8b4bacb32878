from .configuration_disco import DiscoConfig
from .modeling_disco import DiscoForPreTraining, DiscoPreTrainingOutput, TeacherError

__all__ = ["DiscoConfig", "DiscoForPreTraining", "DiscoPreTrainingOutput", "TeacherError"]
