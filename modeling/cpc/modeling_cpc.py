from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..backbones import build_backbone, feature_dim, pooled_features
from ..distributed import all_gather_with_grad
from ..heads import ContextNetwork, torch_default_init
from ..losses import cpc_info_nce_loss
from ..pretraining import SSLPreTrainedModel
from .configuration_cpc import DIRECTION_ROTATIONS, CpcConfig
from .patches import patch_grid


def rotate_grid(grid: torch.Tensor, direction: str, inverse: bool = False) -> torch.Tensor:
    """`grid` `[..., H, W]` turned so that `direction` points down its rows (`inverse`: turned back)."""
    turns = DIRECTION_ROTATIONS[direction]
    return torch.rot90(grid, -turns if inverse else turns, dims=(-2, -1))


def refuse_batchnorm(encoder: nn.Module) -> None:
    """ValueError for a patch encoder with BatchNorm: its batch statistics mix the patches of an image, which lets the
    network see the patches it must predict (CPC v2 replaced BatchNorm by LayerNorm for this)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
        raise ValueError(f"CPC cannot use a {encoder.config.model_type!r} patch encoder: its BatchNorm statistics leak "
                         "information between the patches of an image; use a LayerNorm backbone (convnext, vit, ...)")


def patch_mean_features(encoder: PreTrainedModel, pixel_values: torch.Tensor, patch_size: int,
                        patch_stride: int) -> torch.Tensor:
    """`[B, D]`: the mean over the grid of each image's patch vectors (the encoder's pooled feature of every
    `patch_size` px patch, `patch_stride` px apart). The other whole-image feature is `pooled_features(encoder,
    pixel_values)`: the encoder run on the whole image, what `AutoModel` / `pipeline` give."""
    vectors = pooled_features(encoder, patch_grid(pixel_values, patch_size, patch_stride))
    return vectors.reshape(pixel_values.shape[0], -1, vectors.shape[-1]).mean(dim=1)


@dataclass
class CpcPreTrainingOutput(ModelOutput):
    """
    loss: mean over the directions of `loss_<direction>`.
    loss_down, loss_up, loss_left, loss_right: the direction's InfoNCE, a mean over its prediction offsets (None for a
        direction the config leaves out).
    embedding_std: std over the patches of the L2-normalised patch vectors, averaged over dimensions.
    """

    loss: torch.FloatTensor | None = None
    loss_down: torch.FloatTensor | None = None
    loss_up: torch.FloatTensor | None = None
    loss_left: torch.FloatTensor | None = None
    loss_right: torch.FloatTensor | None = None
    embedding_std: torch.FloatTensor | None = None


class CpcForPreTraining(SSLPreTrainedModel):
    """CPC v2. `forward(patches)` takes every image's `grid_size²` augmented patches, image-major and row-major (the
    `patch_grid` view recipe). The patch encoder turns each into z_ij (its pooled feature); a 1x1 conv makes the
    targets t_ij, those of every process gathered with gradient, so that the candidates of each prediction are every
    patch position of every image of the global batch and 2 processes compute the 1-process loss and gradient. For each
    direction the grid is turned so that the direction points down (`rotate_grid`), the masked context network gives
    c_ij (rows <= i only), and ẑ_{i+k,j} = W_k c_ij (a 1x1 conv per offset k and direction) picks t_{i+k,j} out of the
    candidates (`cpc_info_nce_loss`). No momentum network: `post_optimizer_step` does nothing. The published encoder is
    the patch encoder.
    """

    config_class = CpcConfig
    base_model_prefix = "cpc"
    backbone_attributes = ("patch_encoder",)

    def __init__(self, config: CpcConfig):
        super().__init__(config)
        self.patch_encoder = build_backbone(config.backbone_config)
        refuse_batchnorm(self.patch_encoder)
        dim = config.context_config.in_dim
        if feature_dim(self.patch_encoder) != dim:
            raise ValueError(f"context_config.in_dim={dim} must equal the patch encoder's feature size "
                             f"{feature_dim(self.patch_encoder)}")
        self.context_network = ContextNetwork(config.context_config)
        self.target_projection = nn.Conv2d(dim, config.target_dim, kernel_size=1)
        self.predictors = nn.ModuleDict({
            direction: nn.ModuleList(nn.Conv2d(dim, config.target_dim, kernel_size=1)
                                     for _ in config.prediction_offsets)
            for direction in config.directions})
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            torch_default_init(module)

    def get_encoder(self):
        return self.patch_encoder

    def patch_vector_grid(self, patches: torch.Tensor) -> torch.Tensor:
        """`[B * grid², C, p, p]` patches -> `[B, D, grid, grid]` patch vectors."""
        grid, num_patches = self.config.grid_size, self.config.grid_size ** 2
        if patches.shape[0] % num_patches or patches.shape[-1] != self.config.patch_size:
            raise ValueError(f"patches {tuple(patches.shape)} are not grid_size²={num_patches} patches of "
                             f"{self.config.patch_size} px per image: the view recipe's patch_size / patch_stride and "
                             f"image size must make the model's {grid}x{grid} grid of {self.config.patch_size} px")
        vectors = pooled_features(self.patch_encoder, patches)
        return vectors.reshape(-1, grid, grid, vectors.shape[-1]).permute(0, 3, 1, 2)

    def direction_loss(self, vectors: torch.Tensor, candidates: torch.Tensor, offset: int,
                       direction: str) -> torch.Tensor:
        """Mean over the offsets k of the InfoNCE of predicting, from `direction`, the targets k rows ahead.
        `candidates` `[N * grid², T]`: every target of the global batch, image-major, row-major; this process's images
        start at row `offset`."""
        num_images, _, grid, _ = vectors.shape
        context = self.context_network(rotate_grid(vectors, direction))
        # where each position of the turned grid is in the image's row-major patch order
        positions = rotate_grid(torch.arange(grid * grid, device=vectors.device).view(grid, grid), direction)
        first_rows = offset + grid * grid * torch.arange(num_images, device=vectors.device).view(-1, 1, 1)
        terms = []
        for k, predictor in zip(self.config.prediction_offsets, self.predictors[direction]):
            predictions = predictor(context[:, :, :grid - k])  # rows 0 .. grid-k-1 predict rows k .. grid-1
            predictions = predictions.permute(0, 2, 3, 1).reshape(-1, self.config.target_dim)
            labels = (first_rows + positions[k:]).reshape(-1)
            terms.append(cpc_info_nce_loss(predictions, candidates, labels, self.config.prediction_scale))
        return torch.stack(terms).mean()

    def forward(self, patches: torch.Tensor, return_dict: bool = True) -> CpcPreTrainingOutput:
        vectors = self.patch_vector_grid(patches)
        targets = self.target_projection(vectors).permute(0, 2, 3, 1).reshape(-1, self.config.target_dim)
        candidates, offset = all_gather_with_grad(targets)
        losses = {f"loss_{d}": self.direction_loss(vectors, candidates, offset, d) for d in self.config.directions}
        loss = sum(losses.values()) * self.config.direction_loss_weight
        with torch.no_grad():
            flat = vectors.permute(0, 2, 3, 1).reshape(-1, vectors.shape[1])
            embedding_std = F.normalize(flat.float(), dim=1).std(0).mean()
        output = CpcPreTrainingOutput(loss=loss, embedding_std=embedding_std, **losses)
        return output if return_dict else output.to_tuple()
