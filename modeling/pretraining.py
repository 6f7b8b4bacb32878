"""The contract every `XForPreTraining` model follows (see DESIGN.md, "Models").

The training loop only talks to a method model through this interface:
  * `forward(**views, **{name: value for name in schedule_inputs})` returns an output with `loss`;
  * `before_optimizer_step(epoch)` may edit gradients (e.g. DINO's frozen last layer in epoch 1);
  * `post_optimizer_step(momentum=...)` does EMA / queue updates, called only after a real optimizer step;
  * `get_encoder()` is the backbone that gets published;
  * `embedding_std_dim()` is the size of the embeddings behind the output's `embedding_std` (collapse monitor);
  * `set_requires_grad()` freezes what is not trained (called at construction and after `from_pretrained`);
  * `load_backbone_weights(state_dict)` starts every backbone in `backbone_attributes` from pretrained weights.
A model that can serve as a distillation teacher (DisCo) also implements `embed(pixel_values)` (backbone +
projection head, the embedding its loss compares) and `embedding_dim`.
"""
import torch
from transformers import PreTrainedModel

from .backbones import feature_dim, freeze_unused_parameters


class SSLPreTrainedModel(PreTrainedModel):
    main_input_name = "pixel_values"
    # Names of per-step schedule values (computed by the training loop) that `forward` takes.
    schedule_inputs: tuple[str, ...] = ()
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

    def before_optimizer_step(self, epoch: int) -> None:
        """Hook between backward and the optimizer step; gradients are complete and synchronised."""

    def post_optimizer_step(self, momentum: float) -> None:
        """Update state that follows the optimised weights (EMA teacher, momentum encoder, ...)."""

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
