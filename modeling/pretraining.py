"""The contract every `XForPreTraining` model follows (see DESIGN.md, "Models").

The training loop only talks to a method model through this interface, once per optimizer step:
  * `schedule_values(progress)`: the method's own per-step values (DINO's teacher temperature), a pure function of
    the `TrainingProgress`; the loop passes them to `forward` and logs them;
  * `forward(**views, **schedule_values)` returns a `ModelOutput` with `loss` (and the logged terms);
  * `before_optimizer_step(progress)` may edit gradients (e.g. DINO's frozen last layer in epoch 1);
  * `post_optimizer_step(momentum=...)` does EMA / queue updates, called only after a real optimizer step;
  * `step_snapshot()` / `discard_step(snapshot)`: a step skipped under `nan_policy: skip` leaves no trace.
Once, when training is set up:
  * `parameter_groups()`: the optimizer's parameter groups (no weight decay on biases and norms, a constant-lr
    predictor, ...), each with the flags the loop's lr / weight-decay schedule and LARS respect;
  * `input_columns()`: dataset columns besides the image that the method's views read (e.g. a mask);
  * `get_encoder()` is the backbone that gets published;
  * `embedding_std_dim()` is the size of the embeddings behind the output's `embedding_std` (collapse monitor);
  * `set_requires_grad()` freezes what is not trained (called at construction and after `from_pretrained`);
  * `load_backbone_weights(state_dict)` starts every backbone in `backbone_attributes` from pretrained weights.
A model that can serve as a distillation teacher (DisCo) also implements `embed(pixel_values)` (backbone +
projection head, the embedding its loss compares) and `embedding_dim`.
"""
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .backbones import feature_dim, freeze_unused_parameters


@dataclass(frozen=True)
class TrainingProgress:
    """Where training is: optimizer step `step` of `total_steps`, `steps_per_epoch` steps making one epoch."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> int:
        """The epoch the step is in (0-based)."""
        return self.step // self.steps_per_epoch

    def steps(self, epochs: float) -> int:
        """A duration given in epochs, in optimizer steps."""
        return int(epochs * self.steps_per_epoch)


def parameter_group(name: str, params: list, apply_weight_decay: bool = True, lars_adaptation: bool | None = None,
                    constant_lr: bool = False) -> dict:
    """One optimizer parameter group as the training loop reads it:
    `apply_weight_decay`: the scheduled weight decay applies (else 0);
    `lars_adaptation`: LARS scales the update by its trust ratio (default: as `apply_weight_decay`; biases and norms
        are excluded from both, as in the MoCo v3 / BYOL code);
    `constant_lr`: the group stays at the peak learning rate, without warmup or decay (e.g. Fast-MoCo's predictor)."""
    return {"params": params, "name": name, "apply_weight_decay": apply_weight_decay,
            "lars_adaptation": apply_weight_decay if lars_adaptation is None else lars_adaptation,
            "constant_lr": constant_lr}


class SSLPreTrainedModel(PreTrainedModel):
    main_input_name = "pixel_values"
    # Attributes holding a copy of the backbone (student and EMA teacher, query and momentum encoder, ...): all start
    # from `backbone_name_or_path`'s weights.
    backbone_attributes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # Loading materialises fresh parameters, all with requires_grad=True: restore the frozen ones.
        model.set_requires_grad()
        for name in model.backbone_attributes:
            freeze_unused_parameters(getattr(model, name))
        return model

    def set_requires_grad(self) -> None:
        """Freeze what the optimizer must never update (EMA teacher, momentum encoder, fixed prototype norms)."""

    def load_backbone_weights(self, state_dict: dict) -> None:
        """Start every backbone of `backbone_attributes` from pretrained weights (`backbone_name_or_path`, read by
        `modeling.backbones.load_backbone`, which builds the backbone as the method does): a strict load."""
        if not self.backbone_attributes:
            raise NotImplementedError(f"{type(self).__name__} names no backbone_attributes to load weights into")
        for name in self.backbone_attributes:
            getattr(self, name).load_state_dict(state_dict)

    def schedule_values(self, progress: TrainingProgress) -> dict[str, float]:
        """The method's own scheduled values at `progress`, passed to `forward` by name (none by default)."""
        return {}

    def parameter_groups(self) -> list[dict]:
        """Weights decay; biases and norm parameters (1-d) do not (DINO, MoCo v3). Frozen parameters are left out."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [parameter_group("weights", [p for p in trainable if p.ndim > 1]),
                parameter_group("biases_and_norms", [p for p in trainable if p.ndim <= 1], apply_weight_decay=False)]

    def input_columns(self) -> dict[str, str]:
        """Dataset columns the views read besides the image, as {batch key: column} (none by default)."""
        return {}

    def before_optimizer_step(self, progress: TrainingProgress) -> None:
        """Hook between backward and the optimizer step; gradients are complete and synchronised."""

    def post_optimizer_step(self, momentum: float) -> None:
        """Update state that follows the optimised weights (EMA teacher, momentum encoder, ...)."""

    def step_snapshot(self) -> dict[str, torch.Tensor]:
        """What `discard_step` needs to undo a step: copies of the buffers that forward updates (DINO's center,
        BatchNorm statistics)."""
        return {name: buffer.detach().clone() for name, buffer in self.named_buffers()}

    @torch.no_grad()
    def discard_step(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Forget a step that will not be taken: buffers back to `snapshot`. A method holding other per-step state
        (MoCo's keys waiting for the queue) extends this."""
        for name, buffer in self.named_buffers():
            buffer.copy_(snapshot[name])

    def get_encoder(self) -> PreTrainedModel:
        raise NotImplementedError

    def embedding_std_dim(self) -> int:
        """Size d of the embeddings whose spread the output's `embedding_std` reports (about 1/sqrt(d) when they
        are spread out, 0 when collapsed; the training loop's collapse monitor). Default: the encoder's pooled
        feature; a method that reports the std of another embedding (e.g. a projection) overrides this."""
        return feature_dim(self.get_encoder())

    @property
    def embedding_dim(self) -> int | None:
        """Size of `embed`'s output; None for a model without a projection embedding."""
        return None

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, embedding_dim]`: the projection embedding of images (not normalised), as a DisCo teacher gives it."""
        raise NotImplementedError(f"{type(self).__name__} has no projection embedding")
