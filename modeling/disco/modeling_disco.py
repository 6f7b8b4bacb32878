import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel
from transformers.utils import ModelOutput, cached_file

from ..losses import normalized_mse_loss
from ..moco.modeling_moco import MocoForPreTraining
from ..pretraining import SSLPreTrainedModel
from .configuration_disco import DiscoConfig


class TeacherError(ValueError):
    """The DisCo teacher cannot be used; the message names the teacher and the problem."""


@dataclass
class DiscoPreTrainingOutput(ModelOutput):
    """
    loss: contrastive_weight · contrastive_loss + query_distillation_weight · query_distillation_loss
        + key_distillation_weight · key_distillation_loss.
    contrastive_loss: the student's MoCo v2 InfoNCE.
    query_distillation_loss: MSE(norm(teacher(x_q)), norm(student_q(x_q))).
    key_distillation_loss: MSE(norm(teacher(x_k)), norm(student_q(x_k))).
    embedding_std: std over the batch of the L2-normalised student query embeddings, averaged over dimensions.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    query_distillation_loss: torch.FloatTensor | None = None
    key_distillation_loss: torch.FloatTensor | None = None
    embedding_std: torch.FloatTensor | None = None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _teacher_config(name: str, revision: str | None, subfolder: str):
    """(config, subfolder) of the teacher; without a subfolder, an OUTPUT_DIR's or a pushed repo's `pretraining/`
    is used when the top level is not an hf-ssl pretraining model."""
    candidates = [subfolder] if subfolder else ["", "pretraining"]
    first: tuple | None = None
    for candidate in candidates:
        try:
            config = AutoConfig.from_pretrained(name, revision=revision, subfolder=candidate)
        except (OSError, ValueError) as err:
            first = first or ("error", err)
            continue
        if config.model_type.startswith("hf_ssl_"):
            return config, candidate
        first = first or ("type", config.model_type)
    kind, detail = first
    where = f"{name!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    if kind == "type":
        raise TeacherError(
            f"DisCo teacher {where} is a {detail!r} model, not an hf-ssl pretraining model: give OUTPUT_DIR/pretraining "
            "of a moco (or disco) run, which holds the backbone and its projection head (an exported encoder/ has no "
            "projection head)")
    local = Path(name).expanduser()
    if local.exists():
        reason = f"{local} holds no config.json of a pretraining model (nor does {local / 'pretraining'})"
    else:
        reason = f"no such local directory, and it cannot be loaded from the Hub ({_first_line(detail)})"
    raise TeacherError(f"DisCo teacher {where} not found: {reason}")


class DiscoForPreTraining(MocoForPreTraining):
    """DisCo: a MoCo v2 student whose query embeddings of both views are also pulled (MSE on L2-normalised
    embeddings) towards those of a frozen, larger self-supervised teacher.

    The teacher (`config.teacher_name_or_path`) is loaded at construction and by `from_pretrained`; it is kept
    outside the module tree, so it is in no `parameters()` (never optimised), no `state_dict()` (never saved in the
    student's safetensors or checkpoints) and never switched to training mode (its BatchNorm uses running
    statistics); `.to()` moves it along with the student. The published encoder is the student's query backbone.
    """

    config_class = DiscoConfig
    base_model_prefix = "disco"

    def __init__(self, config: DiscoConfig):
        object.__setattr__(self, "_teacher", None)
        super().__init__(config)
        # `from_pretrained` builds the model on the meta device, then loads the weights: the teacher comes after.
        if torch.get_default_device().type != "meta":
            self.load_teacher()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.load_teacher()
        return model

    @property
    def teacher(self) -> SSLPreTrainedModel:
        if self._teacher is None:
            raise TeacherError("the DisCo teacher is not loaded (call load_teacher())")
        return self._teacher

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if getattr(self, "_teacher", None) is not None:
            self._teacher._apply(fn, recurse)
        return self

    def load_teacher(self) -> SSLPreTrainedModel:
        """Load, check and freeze the teacher named by the config; records its revision and weights' sha256 in the
        config (a later load with a recorded sha256 must find the same weights)."""
        config = self.config
        name = config.teacher_name_or_path
        if not name:
            raise TeacherError("DisCo needs a teacher: set teacher_name_or_path (model.teacher_name_or_path in a "
                               "recipe) to a Hub repo id or a local OUTPUT_DIR/pretraining of a moco run")
        teacher_config, subfolder = _teacher_config(str(name), config.teacher_revision, config.teacher_subfolder)
        where = f"{name!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        try:
            teacher = AutoModel.from_pretrained(name, revision=config.teacher_revision, subfolder=subfolder)
        except (OSError, ValueError) as err:
            raise TeacherError(f"DisCo teacher {where} ({teacher_config.model_type}) cannot be loaded: "
                               f"{_first_line(err)}") from None
        if not isinstance(teacher, SSLPreTrainedModel) or teacher.embedding_dim is None:
            raise TeacherError(f"DisCo teacher {where} is a {teacher_config.model_type!r} model without a projection "
                               "embedding; DisCo distils the embedding of a moco (or disco) pretraining model")
        if teacher.embedding_dim != config.projector_config.out_dim:
            raise TeacherError(
                f"embedding sizes differ: DisCo teacher {where} gives {teacher.embedding_dim}-d embeddings, the "
                f"student's projector {config.projector_config.out_dim}-d; set projector_config.out_dim "
                f"(model.projector_config.out_dim in a recipe) to {teacher.embedding_dim}")
        weights = cached_file(name, "model.safetensors", revision=config.teacher_revision, subfolder=subfolder,
                              _raise_exceptions_for_missing_entries=False)
        if weights is not None:
            sha256 = _sha256(weights)
            if config.teacher_sha256 and config.teacher_sha256 != sha256:
                raise TeacherError(f"DisCo teacher {where} changed since this student was trained: its "
                                   f"model.safetensors has sha256 {sha256}, the config recorded "
                                   f"{config.teacher_sha256}")
            config.teacher_sha256 = sha256
            commit = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", str(weights))
            if commit:
                config.teacher_revision = commit.group(1)
        config.teacher_subfolder = subfolder
        teacher.requires_grad_(False)
        teacher.eval()
        reference = next(self.parameters())
        teacher.to(device=reference.device, dtype=reference.dtype)
        object.__setattr__(self, "_teacher", teacher)
        return teacher

    def forward(self, view_1: torch.Tensor, view_2: torch.Tensor, return_dict: bool = True) -> DiscoPreTrainingOutput:
        if view_1.shape[0] != view_2.shape[0]:
            raise ValueError(f"view_1 and view_2 need the same number of images, got {view_1.shape[0]} and "
                             f"{view_2.shape[0]}")
        config = self.config
        contrastive, query = self._queue_loss(view_1, view_2)  # view 1 = x_q, view 2 = x_k
        query_of_key_view = self.embed(view_2)
        with torch.no_grad():
            teacher_query, teacher_key = self.teacher.embed(view_1), self.teacher.embed(view_2)
        query_distillation = normalized_mse_loss(query, teacher_query)
        key_distillation = normalized_mse_loss(query_of_key_view, teacher_key)
        loss = (config.contrastive_weight * contrastive + config.query_distillation_weight * query_distillation
                + config.key_distillation_weight * key_distillation)
        with torch.no_grad():
            embedding_std = torch.nn.functional.normalize(query.float(), dim=1).std(0).mean()
        output = DiscoPreTrainingOutput(loss=loss, contrastive_loss=contrastive,
                                        query_distillation_loss=query_distillation,
                                        key_distillation_loss=key_distillation, embedding_std=embedding_std)
        return output if return_dict else output.to_tuple()
