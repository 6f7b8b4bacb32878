from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..backbones import pooled_features
from ..distributed import all_gather_with_offset
from ..losses import in_batch_info_nce_loss
from ..moco.modeling_moco import MocoForPreTraining
from ..pretraining import parameter_group
from .configuration_fast_moco import FastMocoConfig


def combination_indices(num_crops: int, num_combined: int, device: torch.device | None = None) -> torch.Tensor:
    """`[C(num_crops, num_combined), num_combined]`: every combination of `num_combined` of the crop indices
    0..num_crops-1, in `itertools.combinations` order (lexicographic)."""
    return torch.tensor(list(combinations(range(num_crops), num_combined)), dtype=torch.long, device=device)


@dataclass
class FastMocoPreTrainingOutput(ModelOutput):
    """
    loss: mean over the 2·C(m², n) InfoNCE terms (each combined sample of each view against the momentum encoder's
        embeddings of the global batch of the target view); = (loss_view_1 + loss_view_2) / 2.
    loss_view_1, loss_view_2: mean over the combined samples of that view.
    target_cosine: mean cosine between the momentum encoder's embeddings of the two views of the same image (1 when
        the targets stop telling views apart: a collapse monitor).
    embedding_std: std over the combined samples of view 1 of their L2-normalised projections, averaged over
        dimensions.
    """

    loss: torch.FloatTensor | None = None
    loss_view_1: torch.FloatTensor | None = None
    loss_view_2: torch.FloatTensor | None = None
    target_cosine: torch.FloatTensor | None = None
    embedding_std: torch.FloatTensor | None = None


class FastMocoForPreTraining(MocoForPreTraining):
    """Fast-MoCo: MoCo v3 with combinatorial patches. Each view comes with its m x m grid of crops (cut from the
    augmented view, image-major: m² consecutive rows per image). The online backbone (incl. pooling) encodes every
    crop; the average of every combination of n of an image's m² crop features (`combination_indices`) goes through
    projector and predictor and is matched by InfoNCE (T, no 2T factor) against the momentum encoder's L2-normalised
    embedding of the full other view (`target_view="same"`: the full same view), the targets gathered over processes
    with labels offset by rank as in MoCo v3. The momentum encoder (shuffle-BN / SyncBN), its EMA after the optimizer
    step and the published encoder (the online backbone) are MoCo's.
    """

    config_class = FastMocoConfig
    base_model_prefix = "fast_moco"

    def parameter_groups(self) -> list[dict]:
        """Weight decay on every trainable parameter (the official code decays all, biases and norms included); the
        predictor in its own group at a constant learning rate."""
        predictor = {id(p) for p in self.predictor.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [parameter_group("encoder_and_projector", [p for p in trainable if id(p) not in predictor]),
                parameter_group("predictor", [p for p in trainable if id(p) in predictor], constant_lr=True)]

    def combined_queries(self, crops: torch.Tensor, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions `[C, B, D]`, projections `[C, B, D]`) of the C combined samples of each of the B images whose
        crops `[B * m², ...]` are given image-major."""
        num_crops = self.config.grid_size ** 2
        features = pooled_features(self.query_backbone, crops)  # [B * m², F]
        features = features.reshape(num_images, num_crops, -1)
        # fixed by the config: made here, neither state nor a buffer
        indices = combination_indices(num_crops, self.config.num_combined, device=features.device)
        combined = features[:, indices].mean(dim=2)  # [B, C, F]
        combined = combined.transpose(0, 1).reshape(-1, features.shape[-1])  # [C * B, F], combination-major
        projections = self.query_projector(combined)
        predictions = self.predictor(projections)
        shape = (indices.shape[0], num_images, -1)
        return predictions.reshape(shape), projections.reshape(shape)

    def forward(self, view_1: torch.Tensor, view_2: torch.Tensor, crops_1: torch.Tensor, crops_2: torch.Tensor,
                return_dict: bool = True) -> FastMocoPreTrainingOutput:
        num_images, num_crops = view_1.shape[0], self.config.grid_size ** 2
        if view_2.shape[0] != num_images:
            raise ValueError(f"view_1 and view_2 need the same number of images, got {num_images} and "
                             f"{view_2.shape[0]}")
        for name, crops in (("crops_1", crops_1), ("crops_2", crops_2)):
            if crops.shape[0] != num_images * num_crops:
                raise ValueError(f"{name} has {crops.shape[0]} rows, expected grid_size² = {num_crops} crops per image "
                                 f"for {num_images} images ({num_images * num_crops}): the view recipe's `grid` must "
                                 f"equal the model's grid_size={self.config.grid_size}")
        # Targets: the momentum encoder's embeddings of the full views, of every process (no gradient); this process's
        # positives start at `offset`.
        local_1, local_2 = self.keys(view_1), self.keys(view_2)
        keys_1, offset = all_gather_with_offset(local_1)
        keys_2, _ = all_gather_with_offset(local_2)
        targets = {"other": (keys_2, keys_1), "same": (keys_1, keys_2)}[self.config.target_view]
        temperature = self.config.contrastive_temperature
        view_losses, projections_1 = [], None
        for crops, keys in zip((crops_1, crops_2), targets):
            predictions, projections = self.combined_queries(crops, num_images)
            projections_1 = projections if projections_1 is None else projections_1
            view_losses.append(torch.stack([in_batch_info_nce_loss(p, keys, temperature, label_offset=offset)
                                            for p in predictions]).mean())
        loss = (view_losses[0] + view_losses[1]) * self.config.view_loss_weight
        with torch.no_grad():
            target_cosine = (local_1 * local_2).sum(dim=1).mean()
            embedding_std = F.normalize(projections_1.flatten(0, 1).float(), dim=1).std(0).mean()
        output = FastMocoPreTrainingOutput(loss=loss, loss_view_1=view_losses[0], loss_view_2=view_losses[1],
                                           target_cosine=target_cosine, embedding_std=embedding_std)
        return output if return_dict else output.to_tuple()
