"""Heads shared by the methods: small `PreTrainedModel`s with their own configs, nested in method configs."""
import math

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, norm: str | None, activation: str,
        last_norm: bool = False, last_norm_affine: bool = False) -> nn.Sequential:
    """`num_layers` linear layers; between them `norm` (None, "batchnorm" or "layernorm") and `activation`.
    `last_norm` adds a BatchNorm after the last layer: affine-free (MoCo v3's projector) unless `last_norm_affine`
    (Fast-MoCo's projector)."""
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got num_layers={num_layers}")
    act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
    norms = {None: None, "batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}
    if norm not in norms:
        raise ValueError(f"norm must be one of {list(norms)}, got {norm!r}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            if norm is not None:
                layers.append(norms[norm](dims[i + 1]))
            layers.append(act())
    if last_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_norm_affine))
    return nn.Sequential(*layers)


def torch_default_init(module: nn.Linear | nn.Conv2d) -> None:
    """PyTorch's default initialisation of a linear or convolution layer (what the MoCo and CPC code use), through
    transformers' init functions, so that `post_init` gives what `nn.Linear(...)` / `nn.Conv2d(...)` would."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        init.uniform_(module.bias, -bound, bound)


class ProjectionHeadConfig(PretrainedConfig):
    """An MLP head: projector (MoCo v2: 2 layers, no norm; MoCo v3: 3 layers, BatchNorm, affine-free last BN) or
    predictor (MoCo v3: 2 layers, BatchNorm).

    Args:
        in_dim: input size (the backbone's pooled feature for a projector; the projector's output for a predictor).
        hidden_dim: hidden width; None means `in_dim` (MoCo v2's `Linear(dim_mlp, dim_mlp)`).
        out_dim: embedding size.
        num_layers: linear layers.
        norm: None, "batchnorm" or "layernorm" after every hidden linear layer.
        last_norm: a BatchNorm after the last layer.
        last_norm_affine: that last BatchNorm has a learned scale and shift (Fast-MoCo); default affine-free (MoCo v3).
        activation: "relu" or "gelu".
    """

    model_type = "hf_ssl_projection_head"

    def __init__(self, in_dim: int = 2048, hidden_dim: int | None = None, out_dim: int = 128, num_layers: int = 2,
                 norm: str | None = None, last_norm: bool = False, activation: str = "relu",
                 last_norm_affine: bool = False, **kwargs):
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.num_layers = num_layers
        self.norm = norm
        self.last_norm = last_norm
        self.last_norm_affine = last_norm_affine
        self.activation = activation
        super().__init__(**kwargs)


class ProjectionHead(PreTrainedModel):
    config_class = ProjectionHeadConfig
    base_model_prefix = "projection_head"
    main_input_name = "features"

    def __init__(self, config: ProjectionHeadConfig):
        super().__init__(config)
        hidden = config.hidden_dim or config.in_dim
        self.mlp = mlp(config.in_dim, hidden, config.out_dim, config.num_layers, config.norm, config.activation,
                       last_norm=config.last_norm, last_norm_affine=getattr(config, "last_norm_affine", False))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch_default_init(module)
        elif isinstance(module, (nn.BatchNorm1d, nn.LayerNorm)) and module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class DinoHeadConfig(PretrainedConfig):
    """DINO projection head: MLP -> bottleneck -> L2-norm -> weight-normed linear to `out_dim` prototypes.

    Args:
        in_dim: input size (the backbone's pooled feature).
        hidden_dim: hidden width of the MLP.
        bottleneck_dim: output size of the MLP, L2-normalised before the prototype layer.
        out_dim: number of prototypes (the softmax's size).
        num_layers: linear layers of the MLP.
        use_bn: BatchNorm after every hidden linear layer.
        norm_last_layer: the prototype layer's weight norms stay 1 (DINO); false: they are learned.
    """

    model_type = "hf_ssl_dino_head"

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 65536,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True, **kwargs):
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.out_dim = out_dim
        self.num_layers = num_layers
        self.use_bn = use_bn
        self.norm_last_layer = norm_last_layer
        super().__init__(**kwargs)


class DinoHead(PreTrainedModel):
    config_class = DinoHeadConfig
    base_model_prefix = "dino_head"
    main_input_name = "features"

    def __init__(self, config: DinoHeadConfig):
        super().__init__(config)
        self.mlp = mlp(config.in_dim, config.hidden_dim, config.bottleneck_dim, config.num_layers,
                       "batchnorm" if config.use_bn else None, "gelu")
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(config.bottleneck_dim, config.out_dim, bias=False))
        self.post_init()
        # The prototype layer is set up here rather than in `_init_weights`, which transformers does not apply to a
        # parametrised module; `from_pretrained` overwrites these values with the saved ones.
        weight_g, weight_v = self.last_layer.parametrizations.weight.original0, self.last_layer.parametrizations.weight.original1
        with torch.no_grad():
            nn.init.trunc_normal_(weight_v, std=0.02)
            weight_g.fill_(1.0)
        self.set_requires_grad()

    def set_requires_grad(self) -> None:
        """With norm_last_layer the prototype norms stay 1 (DINO); otherwise they are learned."""
        self.last_layer.parametrizations.weight.original0.requires_grad_(not self.config.norm_last_layer)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and module is not self.last_layer:
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.mlp(features)
        x = nn.functional.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class ContextNetworkConfig(PretrainedConfig):
    """CPC's context network: a PixelCNN-style stack of masked residual blocks over a grid of patch vectors
    (Hénaff et al. 2020, appendix: 5 blocks of 1x1 conv -> ReLU -> 1x3 conv -> pad one row on top -> 2x1 conv -> ReLU
    -> 1x1 conv, 256 channels inside a block, a ReLU on the output).

    Args:
        in_dim: size of a patch vector (the patch encoder's pooled feature); also the output size.
        hidden_dim: channels inside a residual block.
        num_blocks: residual blocks; the context of row i sees rows i - num_blocks .. i.
    """

    model_type = "hf_ssl_context_network"

    def __init__(self, in_dim: int = 1024, hidden_dim: int = 256, num_blocks: int = 5, **kwargs):
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("num_blocks", num_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"context network {name} must be a positive int, got {value!r}")
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.num_blocks = num_blocks
        super().__init__(**kwargs)


class MaskedResidualBlock(nn.Module):
    """x + 1x1 -> ReLU -> 1x3 (within the row) -> 2x1 over (row above, row) -> ReLU -> 1x1: output row i sees input rows
    i - 1 and i only, never a row below (the top padding row stands for "nothing above")."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.along_row = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=(1, 3), padding=(0, 1))
        self.from_above = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=(2, 1))
        self.expand = nn.Conv2d(hidden_dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.along_row(nn.functional.relu(self.reduce(x)))
        c = self.from_above(nn.functional.pad(c, (0, 0, 1, 0)))  # one zero row on top: row i sees rows i-1, i
        return x + self.expand(nn.functional.relu(c))


class ContextNetwork(PreTrainedModel):
    """`[B, D, H, W]` grid of patch vectors -> `[B, D, H, W]` contexts; context (i, j) depends on rows <= i only."""

    config_class = ContextNetworkConfig
    base_model_prefix = "context_network"
    main_input_name = "patch_vectors"

    def __init__(self, config: ContextNetworkConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(MaskedResidualBlock(config.in_dim, config.hidden_dim)
                                    for _ in range(config.num_blocks))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            torch_default_init(module)

    def forward(self, patch_vectors: torch.Tensor) -> torch.Tensor:
        x = patch_vectors
        for block in self.blocks:
            x = block(x)
        return nn.functional.relu(x)
