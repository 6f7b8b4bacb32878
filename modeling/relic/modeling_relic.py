from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..distributed import all_gather_with_offset
from ..losses import relic_loss
from ..moco.modeling_moco import MocoForPreTraining
from .configuration_relic import RelicConfig


def sample_candidates(num_targets: int, offset: int, num_rows: int, num_negatives: int,
                      generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """`[num_rows, 1 + n]` rows of a gathered target batch of `num_targets` that the anchors `offset ..
    offset + num_rows - 1` are compared with: column 0 the anchor's own row (its positive), then
    n = min(num_negatives, num_targets - 1) other rows drawn without replacement, uniformly.

    The draw is made for every row of the global batch and this process's rows are kept, so the candidates of an
    image depend on (generator state, its row), not on the number of processes. With `num_negatives` >=
    num_targets - 1 every other row is a candidate and nothing is drawn."""
    rows = torch.arange(offset, offset + num_rows, device=device)
    if num_negatives >= num_targets - 1:
        others = torch.arange(num_targets, device=device).expand(num_rows, -1)
        others = others[others != rows[:, None]].view(num_rows, num_targets - 1)
        return torch.cat([rows[:, None], others], dim=1)
    noise = torch.rand(num_targets, num_targets, generator=generator, device=device)[offset:offset + num_rows]
    noise[torch.arange(num_rows, device=device), rows] = float("inf")  # the positive is never its own negative
    negatives = noise.topk(num_negatives, dim=1, largest=False).indices
    return torch.cat([rows[:, None], negatives], dim=1)


@dataclass
class RelicPreTrainingOutput(ModelOutput):
    """
    loss: α · contrastive_loss + β · invariance_loss.
    contrastive_loss: mean over the (L + S) · L (anchor view, large view) pairs of the batch-mean contrastive NLL.
    invariance_loss: mean over the same pairs of the batch-mean KL(target distribution ‖ online distribution).
    embedding_std: std over the batch of the L2-normalised online projections of the first large view, averaged over
        dimensions (1/sqrt(D) when spread out, 0 when collapsed).
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    invariance_loss: torch.FloatTensor | None = None
    embedding_std: torch.FloatTensor | None = None


class RelicForPreTraining(MocoForPreTraining):
    """RELICv2: the online encoder (backbone + projector [+ predictor]) embeds L large and S small crops of each image;
    the target encoder (MoCo's momentum encoder: EMA after the optimizer step, shuffle-BN / SyncBN) embeds the large
    crops only. Every (anchor crop, large crop) pair adds α · contrastive NLL + β · KL over the positive and n_e
    negatives sampled from the gathered batch (see [`RelicConfig`] and `modeling.losses.relic_loss`).

    `forward(large_crops, small_crops, negatives_seed)`: crops stacked view-major, `[L, B, C, H, W]` and
    `[S, B, C, h, w]` (S may be 0 or the argument left out); `negatives_seed` seeds the sampling of negatives (the
    `relic_views` recipe draws it from the step's view seed, the same on every process, so that 2 processes draw what
    1 does and a resumed run draws what the uninterrupted one did). Without it (use outside hf-ssl's loop) the
    negatives come from the global RNG. The published encoder is the online backbone.
    """

    config_class = RelicConfig
    base_model_prefix = "relic"

    def input_columns(self) -> dict[str, str]:
        """The foreground mask of saliency masking, when the config names its column."""
        return {"mask": self.config.mask_column} if self.config.mask_column else {}

    def online_embeddings(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor embeddings: projections through the predictor if there is one, projections) of `[N, C, H, W]`."""
        projections = self.embed(crops)
        return (projections if self.predictor is None else self.predictor(projections)), projections

    def _negatives_generator(self, negatives_seed, device: torch.device) -> torch.Generator | None:
        if negatives_seed is None:
            return None
        seed = int(negatives_seed.item()) if torch.is_tensor(negatives_seed) else int(negatives_seed)
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, large_crops: torch.Tensor, small_crops: torch.Tensor | None = None,
                negatives_seed: torch.Tensor | int | None = None, return_dict: bool = True) -> RelicPreTrainingOutput:
        if large_crops.dim() != 5 or (small_crops is not None and small_crops.dim() != 5):
            small_shape = None if small_crops is None else tuple(small_crops.shape)
            raise ValueError("large_crops and small_crops must be stacked view-major, [views, B, C, H, W], got shapes "
                             f"{tuple(large_crops.shape)} and {small_shape}")
        num_large, num_images = large_crops.shape[:2]
        if small_crops is not None and small_crops.shape[1] != num_images:
            raise ValueError(f"small_crops has {small_crops.shape[1]} images per view, large_crops {num_images}")
        anchors, projections = self.online_embeddings(large_crops.flatten(0, 1))
        anchors = list(anchors.unflatten(0, (num_large, num_images)))
        if small_crops is not None and small_crops.shape[0]:
            anchors += list(self.online_embeddings(small_crops.flatten(0, 1))[0].unflatten(0, (-1, num_images)))
        # Targets of the large crops only, of every process (no gradient); this process's images start at `offset`.
        targets = self.keys(large_crops.flatten(0, 1)).unflatten(0, (num_large, num_images))
        gathered = [all_gather_with_offset(view) for view in targets]
        generator = self._negatives_generator(negatives_seed, large_crops.device)
        contrastive, invariance = 0.0, 0.0
        for anchor in anchors:  # large crops first, then small: the pairs in a fixed order, so the draws are too
            for view_targets, offset in gathered:
                candidates = sample_candidates(view_targets.shape[0], offset, num_images, self.config.num_negatives,
                                               generator, device=view_targets.device)
                pair = relic_loss(anchor, view_targets, candidates, self.config.contrastive_temperature)
                contrastive, invariance = contrastive + pair[0], invariance + pair[1]
        num_pairs = len(anchors) * num_large  # (L + S) · L
        contrastive, invariance = contrastive / num_pairs, invariance / num_pairs
        loss = self.config.contrastive_weight * contrastive + self.config.invariance_weight * invariance
        with torch.no_grad():
            embedding_std = F.normalize(projections[:num_images].float(), dim=1).std(0).mean()
        output = RelicPreTrainingOutput(loss=loss, contrastive_loss=contrastive, invariance_loss=invariance,
                                        embedding_std=embedding_std)
        return output if return_dict else output.to_tuple()
