from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..backbones import build_backbone, pooled_features
from ..distributed import all_gather, all_gather_with_offset, batch_shuffle, batch_unshuffle, has_sync_batchnorm
from ..heads import ProjectionHead
from ..losses import ema_update, info_nce_loss, moco_v3_loss
from ..pretraining import SSLPreTrainedModel
from .configuration_moco import MocoConfig


@dataclass
class MocoPreTrainingOutput(ModelOutput):
    """
    loss: MoCo v2's InfoNCE against the queue, or MoCo v3's symmetric loss (× 2T).
    embedding_std: std over the batch of the L2-normalised query embeddings, averaged over dimensions
        (1/sqrt(D) for well-spread embeddings, 0 when collapsed).
    """

    loss: torch.FloatTensor | None = None
    embedding_std: torch.FloatTensor | None = None


class MocoForPreTraining(SSLPreTrainedModel):
    """MoCo v2 / v3: a query encoder (backbone + projector [+ predictor, v3]) is trained to pick out the momentum
    (key) encoder's embedding of another view of the same image among negatives: v2's queue of past keys, or v3's
    other images of the global batch.

    `forward(view_1, view_2)` takes the two augmented views `[B, C, H, W]` of the same images (v2: view 1 is the
    query, view 2 the key). Under DDP the key encoder runs on a shuffled global batch (shuffle-BN), and the keys
    of every process go into the queue / serve as v3's negatives. `post_optimizer_step(momentum)` updates the key
    encoder by EMA and enqueues the keys of the micro-batches since the last step. The published encoder is the
    query backbone.
    """

    config_class = MocoConfig
    base_model_prefix = "moco"
    backbone_attributes = ("query_backbone", "key_backbone")

    def __init__(self, config: MocoConfig):
        super().__init__(config)
        self.query_backbone = build_backbone(config.backbone_config)
        self.query_projector = ProjectionHead(config.projector_config)
        # v3 always has a predictor, v2 never; a method built on MoCo (RELICv2) may leave it out
        self.predictor = ProjectionHead(config.predictor_config) if config.predictor_config is not None else None
        self.key_backbone = build_backbone(config.backbone_config)
        self.key_projector = ProjectionHead(config.projector_config)
        if config.queue_size:
            # L2-normalised keys, one per row; state that must survive a resume, hence buffers.
            self.register_buffer("queue", torch.zeros(config.queue_size, config.projector_config.out_dim))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._pending_keys: list[torch.Tensor] = []  # gathered keys waiting for the next optimizer step
        self.post_init()
        # The key encoder starts as a copy of the query encoder and is only ever updated by EMA.
        self.key_backbone.load_state_dict(self.query_backbone.state_dict())
        self.key_projector.load_state_dict(self.query_projector.state_dict())
        self.set_requires_grad()

    def _init_weights(self, module):
        if module is self and self.config.queue_size:
            init.copy_(self.queue, F.normalize(torch.randn(self.queue.shape, device=self.queue.device), dim=1))
            init.zeros_(self.queue_ptr)

    def set_requires_grad(self) -> None:
        self.key_backbone.requires_grad_(False)
        self.key_projector.requires_grad_(False)

    def get_encoder(self):
        return self.query_backbone

    @property
    def embedding_dim(self) -> int:
        return self.config.projector_config.out_dim

    def embedding_std_dim(self) -> int:
        """`embedding_std` is measured on the query projections."""
        return self.config.projector_config.out_dim

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The query encoder's projection embedding (backbone + projector, before v3's predictor)."""
        return self.query_projector(pooled_features(self.query_backbone, pixel_values))

    @torch.no_grad()
    def keys(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's L2-normalised embeddings of this process's images (shuffle-BN under DDP, unless the
        key encoder has SyncBatchNorm: its statistics already mix every process's images)."""
        if has_sync_batchnorm(self.key_backbone):
            shuffled, unshuffle = pixel_values, None
        else:
            shuffled, unshuffle = batch_shuffle(pixel_values)
        keys = self.key_projector(pooled_features(self.key_backbone, shuffled))
        return F.normalize(batch_unshuffle(keys, unshuffle), dim=1)

    def _queue_loss(self, view_1: torch.Tensor, view_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoCo v2: (InfoNCE of queries of view 1 against keys of view 2 and the queue, the query embeddings).
        In training mode the keys (of all processes) wait for `post_optimizer_step` to be enqueued."""
        query = self.embed(view_1)
        key = self.keys(view_2)
        loss = info_nce_loss(query, key, self.queue, self.config.contrastive_temperature)
        if self.training:
            self._pending_keys.append(all_gather(key.to(self.queue.dtype)))
            # bounded even if no optimizer step ever comes (e.g. forward-only use in training mode)
            while sum(k.shape[0] for k in self._pending_keys[1:]) >= self.config.queue_size:
                self._pending_keys.pop(0)
        return loss, query

    def _symmetric_loss(self, view_1: torch.Tensor, view_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoCo v3: (2T · (InfoNCE(q1, k2) + InfoNCE(q2, k1)) with the global batch's keys, the view-1 embeddings)."""
        z_1, z_2 = self.embed(view_1), self.embed(view_2)
        # Keys of the global batch (no gradient: the momentum encoder is not trained); this process's positives start
        # at its row offset. The loss is a mean over this process's queries, so DDP's average over processes is the
        # one-process loss of the global batch.
        keys_1, offset = all_gather_with_offset(self.keys(view_1))
        keys_2, _ = all_gather_with_offset(self.keys(view_2))
        loss = moco_v3_loss(self.predictor(z_1), self.predictor(z_2), keys_1, keys_2, self.config.contrastive_temperature,
                            label_offset=offset)
        return loss, z_1

    def forward(self, view_1: torch.Tensor, view_2: torch.Tensor, return_dict: bool = True) -> MocoPreTrainingOutput:
        if view_1.shape[0] != view_2.shape[0]:
            raise ValueError(f"view_1 and view_2 need the same number of images, got {view_1.shape[0]} and "
                             f"{view_2.shape[0]}")
        loss_fn = self._queue_loss if self.config.version == 2 else self._symmetric_loss
        loss, query = loss_fn(view_1, view_2)
        with torch.no_grad():
            embedding_std = F.normalize(query.float(), dim=1).std(0).mean()
        output = MocoPreTrainingOutput(loss=loss, embedding_std=embedding_std)
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` (L2-normalised, oldest first) into the queue at its pointer, wrapping around; when there are
        more keys than places, only the newest are kept."""
        size = self.queue.shape[0]
        keys = keys[-size:]
        ptr = int(self.queue_ptr.item())
        index = (ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)

    def discard_step(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Also drop the keys of the skipped step: they must not reach the queue."""
        super().discard_step(snapshot)
        self._pending_keys.clear()

    @torch.no_grad()
    def post_optimizer_step(self, momentum: float) -> None:
        ema_update(self.key_backbone.parameters(), self.query_backbone.parameters(), momentum)
        ema_update(self.key_projector.parameters(), self.query_projector.parameters(), momentum)
        if self.config.queue_size and self._pending_keys:
            self.enqueue(torch.cat(self._pending_keys))
        self._pending_keys.clear()
