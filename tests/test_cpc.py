"""CPC v2: the patch grid and its per-patch views, the context network's causality in every direction, golden InfoNCE
(numpy, written from the formula), BatchNorm refused, patch-mean features, recipes, resume and export, the card's
patch-mean snippet."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel

import modeling
import modeling.cpc.modeling_cpc as cpc_module
from hf_ssl.augment import build_views, patch_grid
from hf_ssl.hub import export_encoder, render_model_card
from hf_ssl.recipe import RecipeError, load_recipe, save_recipe
from hf_ssl.train import build_model
from modeling import CpcConfig, CpcForPreTraining
from modeling.backbones import pooled_features
from modeling.cpc import patch_mean_features, rotate_grid
from modeling.heads import ContextNetwork, ContextNetworkConfig

from .test_moco import _cross_entropy
from .test_train import assert_resume_parity

TINY_CONVNEXT = {"model_type": "convnext", "patch_size": 2, "num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 1]}

# 16 px images, 8 px patches 4 px apart: a 3x3 grid; offsets 1 and 2 (row 1 overlaps, allowed in a test).
CPC_RECIPE = """
method: cpc
output_dir: {output_dir}
dataset_name: {dataset}
image_size: 16
image_mean: [0.5, 0.5, 0.5]
image_std: [0.5, 0.5, 0.5]
dataloader_num_workers: 0
backbone_config: {{model_type: convnext, patch_size: 2, num_stages: 2, hidden_sizes: [8, 16], depths: [1, 1]}}
model:
  patch_size: 8
  patch_stride: 4
  grid_size: 3
  prediction_offsets: [1, 2]
  target_dim: 8
  context_config: {{hidden_dim: 8, num_blocks: 2}}
augmentation: {{patch_size: 8, patch_stride: 4, patch_crop_scale: [0.6, 1.0]}}
per_device_train_batch_size: 8
num_train_epochs: 1
optimizer: adamw
learning_rate: 0.001
warmup_epochs: 0
weight_decay: 0.0
weight_decay_end: 0.0
logging_steps: 1
eval_batch_size: 16
seed: 7
"""

# the offset of one step in each direction, as (row, column) in the image
STEPS = {"down": (1, 0), "up": (-1, 0), "left": (0, -1), "right": (0, 1)}


@pytest.fixture
def cpc_recipe(tmp_path, tiny_dataset):
    path = tmp_path / "cpc.yaml"
    path.write_text(CPC_RECIPE.format(output_dir=tmp_path / "run", dataset=tiny_dataset))
    return path


def tiny_cpc(grid_size=3, offsets=(1, 2), **kwargs) -> CpcForPreTraining:
    torch.manual_seed(0)
    config = CpcConfig(backbone_config=TINY_CONVNEXT, context_config={"in_dim": 16, "hidden_dim": 8, "num_blocks": 2},
                       patch_size=8, patch_stride=4, grid_size=grid_size, prediction_offsets=list(offsets),
                       target_dim=8, **kwargs)
    return CpcForPreTraining(config)


def random_patches(num_images, grid_size=3, seed=0):
    return torch.randn(num_images * grid_size ** 2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_patch_grid_shapes_overlap_and_order():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    patches = patch_grid(images, 8, 4)
    assert patches.shape == (2 * 7 * 7, 3, 8, 8)
    for b, r, c in [(0, 0, 0), (0, 0, 6), (0, 6, 0), (1, 3, 4), (1, 6, 6)]:
        assert torch.equal(patches[b * 49 + r * 7 + c], images[b, :, 4 * r:4 * r + 8, 4 * c:4 * c + 8])
    # neighbours overlap by half a patch, along rows and columns
    assert torch.equal(patches[0][:, :, 4:], patches[1][:, :, :4])
    assert torch.equal(patches[0][:, 4:], patches[7][:, :4])
    # the last patch ends at the image border: every pixel is in some patch
    assert patches[48, 0, -1, -1] == images[0, 0, -1, -1]
    with pytest.raises(ValueError, match="do not tile an image height of 30 px"):
        patch_grid(images[:, :, :30], 8, 4)


def test_patch_views_are_the_grid_augmented_patch_by_patch():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = build_views("patch_grid", (0.5,) * 3, (0.5,) * 3, patch_size=8, patch_stride=4, patch_crop_scale=[1.0, 1.0],
                        flip_p=0.0, color_jitter_p=0.0, color_drop_p=0.0)
    expected = (patch_grid(images.float() / 255, 8, 4) - 0.5) / 0.5
    torch.testing.assert_close(plain(images, seed=1)["patches"], expected)
    views = build_views("patch_grid", (0.5,) * 3, (0.5,) * 3, patch_size=8, patch_stride=4)
    patches = views(images, seed=1)["patches"]
    assert patches.shape == (4 * 9, 3, 8, 8)
    assert torch.equal(views(images, seed=1)["patches"], patches)  # a pure function of the seed
    assert not torch.equal(views(images, seed=2)["patches"], patches)
    # colour dropping: exactly two of the three channels are 0 in every patch, not the same one in every patch
    dropped = patches.abs().sum(dim=(2, 3)) == 0
    assert dropped.sum(dim=1).eq(2).all()
    assert len({tuple(row) for row in dropped.tolist()}) > 1
    # augmented per patch: the 9 patches of an image do not share one crop (their differences vary)
    assert not torch.allclose(patches[0], plain(images, seed=1)["patches"][0])
    # global-batch augmentation: two halves give the one-process rows, patch for patch
    half = views(images[2:], seed=1, offset=2, total=4)["patches"]
    assert torch.equal(half, patches[18:])


@pytest.mark.parametrize("direction", ["down", "up", "left", "right"])
def test_the_context_cannot_see_what_it_predicts(direction):
    """For every position p and every context position q: when p is ahead of q in the direction (a row i+1 or below
    of q's, in the turned grid), changing z_p leaves c_q unchanged; and c_q does change with z_q itself."""
    torch.manual_seed(0)
    network = ContextNetwork(ContextNetworkConfig(in_dim=6, hidden_dim=5, num_blocks=2)).double()
    grid = 5
    z = torch.randn(1, 6, grid, grid, dtype=torch.float64)

    def contexts(x):  # in image coordinates
        return rotate_grid(network(rotate_grid(x, direction)), direction, inverse=True)

    base = contexts(z)
    dr, dc = STEPS[direction]
    for pr in range(grid):
        for pc in range(grid):
            changed = z.clone()
            changed[0, :, pr, pc] += 10.0
            moved = (contexts(changed) - base).abs().amax(dim=1)[0]  # [grid, grid]
            for qr in range(grid):
                for qc in range(grid):
                    ahead = (pr - qr) * dr + (pc - qc) * dc  # rows ahead of q along the direction
                    if ahead > 0:
                        assert moved[qr, qc] == 0, (direction, (pr, pc), (qr, qc))
            assert moved[pr, pc] > 0, "the context sees its own patch"
    # the row just behind is seen (the mask is not simply "own patch only")
    changed = z.clone()
    changed[0, :, 2 - dr, 2 - dc] += 10.0
    assert (contexts(changed) - base)[0, :, 2, 2].abs().max() > 0


def reference_cpc_loss(model, patches, extra_candidates=None):
    """The loss from the patch vectors in float64 numpy: targets and predictions as matrix products with the 1x1 convs'
    weights, the context network (torch) on the grid turned with numpy, every candidate and label enumerated by hand.
    `extra_candidates` `[E, T]`: a rank-0 process's targets in front of ours (our labels then start at E)."""
    config = model.config
    g, scale = config.grid_size, config.prediction_scale
    with torch.no_grad():
        z = model.patch_encoder(pixel_values=patches).pooler_output.flatten(1).double().numpy()
    num_images = z.shape[0] // (g * g)
    z = z.reshape(num_images, g, g, -1)  # [B, row, col, D]

    def conv1x1(conv, x):
        return x @ conv.weight.detach().double().numpy()[:, :, 0, 0].T + conv.bias.detach().double().numpy()

    targets = conv1x1(model.target_projection, z)  # [B, g, g, T]
    candidates = targets.reshape(-1, targets.shape[-1])
    start = 0
    if extra_candidates is not None:
        candidates = np.concatenate([extra_candidates, candidates])
        start = extra_candidates.shape[0]
    losses = {}
    for direction in config.directions:
        turns = {"down": 0, "left": 1, "up": 2, "right": 3}[direction]
        turned = np.ascontiguousarray(np.rot90(z, turns, axes=(1, 2)))
        with torch.no_grad():
            context = model.context_network(torch.from_numpy(turned).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        context = np.rot90(context, -turns, axes=(1, 2))  # back to image coordinates
        dr, dc = STEPS[direction]
        terms = []
        for k, predictor in zip(config.prediction_offsets, model.predictors[direction]):
            ce = []
            for b in range(num_images):
                for r in range(g):
                    for c in range(g):
                        tr, tc = r + k * dr, c + k * dc
                        if not (0 <= tr < g and 0 <= tc < g):
                            continue
                        prediction = conv1x1(predictor, context[b, r, c])
                        logits = scale * candidates @ prediction
                        ce.append(_cross_entropy(logits, start + b * g * g + tr * g + tc))
            terms.append(np.mean(ce))
        losses[f"loss_{direction}"] = np.mean(terms)
    return np.mean(list(losses.values())), losses


@pytest.mark.parametrize("rank_1", [False, True])
def test_forward_is_the_numpy_info_nce_of_its_parts(rank_1, monkeypatch):
    model = tiny_cpc(prediction_scale=0.5).double()
    patches = random_patches(3).double()
    extra = None
    if rank_1:  # a 2-process global batch: rank 0's 2 images (18 targets) come first
        extra = torch.randn(18, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        monkeypatch.setattr(cpc_module, "all_gather_with_grad", lambda x: (torch.cat([extra, x]), extra.shape[0]))
    expected, parts = reference_cpc_loss(model, patches, None if extra is None else extra.numpy())
    out = model(patches=patches)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    for name, value in parts.items():
        assert out[name].item() == pytest.approx(value, rel=1e-10), name
    assert len({round(v, 6) for v in parts.values()}) == 4  # the directions are different problems


def test_directions_are_switchable_and_gradients_reach_the_patch_encoder():
    model = tiny_cpc(directions=["down", "right"])
    assert set(model.predictors) == {"down", "right"}
    assert model.config.direction_loss_weight == 0.5
    out = model(patches=random_patches(2))
    assert out.loss_up is None and out.loss_left is None
    torch.testing.assert_close(out.loss, (out.loss_down + out.loss_right) / 2)
    out.loss.backward()
    for name in ("patch_encoder", "context_network", "target_projection", "predictors"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    one = tiny_cpc(directions=["down"])
    assert one(patches=random_patches(2)).loss == one(patches=random_patches(2)).loss_down


def test_batchnorm_patch_encoders_are_refused(cpc_recipe):
    resnet = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
              "layer_type": "basic"}
    with pytest.raises(ValueError, match="BatchNorm statistics leak information between the patches"):
        CpcForPreTraining(CpcConfig(backbone_config=resnet, context_config={"in_dim": 16}))
    with pytest.raises(RecipeError, match="model \\(cpc\\): CPC cannot use a 'resnet' patch encoder"):
        build_model(load_recipe(cpc_recipe, ["--backbone_config", "null", "--backbone", "resnet-tiny"]))


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="prediction_offsets must be rows ahead k with 1 <= k < grid_size=3"):
        CpcConfig(grid_size=3, prediction_offsets=[2, 3])
    with pytest.raises(ValueError, match="directions must be distinct values of"):
        CpcConfig(directions=["down", "diagonal"])
    with pytest.raises(ValueError, match="directions must be distinct"):
        CpcConfig(directions=[])
    with pytest.raises(ValueError, match="context_config.in_dim=32 must equal the patch encoder's feature size 16"):
        CpcForPreTraining(CpcConfig(backbone_config=TINY_CONVNEXT, context_config={"in_dim": 32}))
    with pytest.raises(ValueError, match="grid_size²=9 patches of 8 px per image"):
        tiny_cpc()(patches=torch.randn(10, 3, 8, 8))


def test_patch_mean_and_whole_image_features():
    model = tiny_cpc().eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        mean = patch_mean_features(model.get_encoder(), images, 8, 4)
        by_hand = torch.stack([torch.stack([pooled_features(model.patch_encoder, images[b:b + 1, :, r:r + 8, c:c + 8])[0]
                                            for r in (0, 4, 8) for c in (0, 4, 8)]).mean(0) for b in range(2)])
        whole = pooled_features(model.get_encoder(), images)
    torch.testing.assert_close(mean, by_hand)
    assert mean.shape == whole.shape == (2, 16) and not torch.allclose(mean, whole)


def test_registry_recipes_and_build_model(repo_root, cpc_recipe):
    assert modeling.METHODS["cpc"].views == "patch_grid"
    model = build_model(load_recipe(cpc_recipe))
    assert model.config.context_config.in_dim == 16 and model.config.grid_size == 3
    for name in ("fashion-mnist-convnext-patch-8", "imagenet-convnext-tiny-64"):
        recipe = load_recipe(repo_root / f"recipes/cpc/{name}.yaml")
        # the views' grid is the model's grid
        size, patch, stride = recipe.image_size, recipe.augmentation["patch_size"], recipe.augmentation["patch_stride"]
        assert (patch, stride) == (recipe.model["patch_size"], recipe.model["patch_stride"])
        assert (size - patch) // stride + 1 == recipe.model["grid_size"] == 7
    fmnist = build_model(load_recipe(repo_root / "recipes/cpc/fashion-mnist-convnext-patch-8.yaml"))
    assert fmnist.config.context_config.in_dim == 128


def test_resume_gives_the_same_loss_curve_and_the_export_is_the_patch_encoder(cpc_recipe, tmp_path):
    full, _ = assert_resume_parity(cpc_recipe, tmp_path)
    encoder = AutoModel.from_pretrained(full / "encoder").eval()
    trained = AutoModel.from_pretrained(full / "pretraining").eval()
    assert type(encoder).__name__ == "ConvNextModel"
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(encoder, images), pooled_features(trained.patch_encoder, images))


def test_the_cards_transformers_only_snippet_is_the_patch_mean(cpc_recipe, tmp_path, monkeypatch):
    """The CPC card publishes the patch mean (it evaluates better, benchmarks/README.md) as a snippet of plain
    transformers + torch: run after the card's loading snippet, it gives `patch_mean_features`."""
    recipe = load_recipe(cpc_recipe)
    run = Path(recipe.output_dir)
    build_model(recipe).save_pretrained(run / "pretraining", safe_serialization=True)
    save_recipe(recipe, run / "config.yaml")
    encoder_dir = export_encoder(run, tmp_path / "encoder")
    card = str(render_model_card(encoder_dir, repo_id=str(encoder_dir)))
    loading, patch_mean = [b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "from_pretrained(" in b
                           and "subfolder" not in b or "unfold" in b]
    assert "unfold(2, 8, 4)" in patch_mean and not re.search(r"hf_ssl|modeling", loading + patch_mean)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    snippet = {}
    exec(loading + patch_mean, snippet)
    with torch.no_grad():
        expected = patch_mean_features(snippet["model"], snippet["pixels"], 8, 4)
    assert snippet["feature"].shape == (1, 16)
    torch.testing.assert_close(snippet["feature"], expected)


def test_a_vit_patch_encoder_trains_and_exports_at_the_image_size():
    """A ViT (LayerNorm) configured for 8 px patches is a CPC patch encoder; `at_input_size` (the export) gives the
    plain model for whole 16 px images, with the feature of the interpolated training model."""
    from modeling.backbones import at_input_size

    vit = {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "patch_size": 4, "image_size": 8}
    torch.manual_seed(0)
    model = CpcForPreTraining(CpcConfig(backbone_config=vit, context_config={"in_dim": 16, "hidden_dim": 8,
                                                                             "num_blocks": 1},
                                        patch_size=8, patch_stride=4, grid_size=3, prediction_offsets=[2]))
    out = model(patches=random_patches(2))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.patch_encoder.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    images = torch.randn(2, 3, 16, 16)
    whole = at_input_size(model.get_encoder().eval(), 16)
    with torch.no_grad():
        torch.testing.assert_close(whole(pixel_values=images).last_hidden_state[:, 0],
                                   pooled_features(model.patch_encoder, images))
