"""Fast-MoCo: combinations, golden loss (numpy), target branch on full views only, heads, config errors, views,
parameter groups, resume."""
import numpy as np
import pytest
import torch
from transformers import AutoModel

import modeling
import modeling.fast_moco.modeling_fast_moco as fast_moco_module
from hf_ssl.augment import build_views, grid_crops
from hf_ssl.recipe import RecipeError, load_recipe
from hf_ssl.train import build_model
from modeling import FastMocoConfig, FastMocoForPreTraining, MocoConfig
from modeling.fast_moco import combination_indices

from .test_moco import BACKBONE, MOCO_RECIPE, _cross_entropy, _unit
from .test_train import assert_resume_parity

# The tiny MoCo recipe as a Fast-MoCo one: 32 px views cut into 2x2 grids of 16 px crops.
FAST_MOCO_RECIPE = (MOCO_RECIPE.replace("method: moco", "method: fast_moco")
                    .replace("  queue_size: 20\n", "  predictor_config: {{hidden_dim: 4}}\n")
                    .replace("crop_scale: [0.3, 1.0]}}", "crop_scale: [0.3, 1.0], grid: 2}}"))


@pytest.fixture
def fast_moco_recipe(tmp_path, tiny_dataset):
    path = tmp_path / "fast_moco.yaml"
    path.write_text(FAST_MOCO_RECIPE.format(output_dir=tmp_path / "run", dataset=tiny_dataset))
    return path


def tiny_fast_moco(grid_size=2, num_combined=2, **kwargs) -> FastMocoForPreTraining:
    torch.manual_seed(0)
    config = FastMocoConfig(backbone_config=BACKBONE, projector_config={"in_dim": 16, "hidden_dim": 32, "out_dim": 8},
                            predictor_config={"hidden_dim": 4}, grid_size=grid_size, num_combined=num_combined,
                            **kwargs)
    return FastMocoForPreTraining(config)


def inputs(num_images=4, size=32, grid=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    view_1, view_2 = torch.randn(num_images, 3, size, size, generator=g), torch.randn(num_images, 3, size, size, generator=g)
    return {"view_1": view_1, "view_2": view_2, "crops_1": grid_crops(view_1, grid), "crops_2": grid_crops(view_2, grid)}


@pytest.mark.parametrize("m, n, expected", [
    (2, 2, [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]),
    (2, 3, [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]),
    (3, 2, None),
])
def test_combination_indices_and_query_shapes(m, n, expected):
    indices = combination_indices(m * m, n)
    count = {(2, 2): 6, (2, 3): 4, (3, 2): 36}[(m, n)]
    assert indices.shape == (count, n) and indices.dtype == torch.long
    if expected is not None:
        assert [tuple(row) for row in indices.tolist()] == expected
    else:  # all pairs i < j of 0..8, row-major
        assert [tuple(row) for row in indices.tolist()] == [(i, j) for i in range(9) for j in range(i + 1, 9)]
    model = tiny_fast_moco(grid_size=m, num_combined=n).train()
    assert model.config.num_combinations == count
    size = 16 * m  # 16 px crops
    batch = inputs(num_images=3, size=size, grid=m)
    assert batch["crops_1"].shape == (3 * m * m, 3, 16, 16)
    predictions, projections = model.combined_queries(batch["crops_1"], 3)
    assert predictions.shape == projections.shape == (count, 3, 8)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, (out.loss_view_1 + out.loss_view_2) / 2)


def reference_fast_moco_loss(model, batch, target_view, temperature, extra_keys=None):
    """The loss from the pooled crop features, in float64 numpy: combinations written out by hand, averaged, the heads
    (torch) on the averages, InfoNCE against the target view's keys; `extra_keys` `[E, D]`: keys of a rank-0 process
    in front of ours (this process is then rank 1 and its labels are offset by E)."""
    m, n = model.config.grid_size, model.config.num_combined
    assert (m, n) == (2, 2)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    num_images = batch["view_1"].shape[0]
    with torch.no_grad():
        keys = {v: model.key_projector(model.key_backbone(pixel_values=batch[f"view_{v}"]).pooler_output.flatten(1))
                for v in (1, 2)}
        keys = {v: _unit(k) for v, k in keys.items()}
    offset = 0 if extra_keys is None else extra_keys.shape[0]
    view_losses = []
    for v in (1, 2):
        target = keys[3 - v] if target_view == "other" else keys[v]
        if extra_keys is not None:
            target = np.concatenate([_unit(extra_keys), target])
        with torch.no_grad():
            features = model.query_backbone(pixel_values=batch[f"crops_{v}"]).pooler_output.flatten(1).double().numpy()
        features = features.reshape(num_images, 4, -1)
        terms = []
        for i, j in pairs:
            combined = (features[:, i] + features[:, j]) / 2
            with torch.no_grad():
                q = model.predictor(model.query_projector(torch.from_numpy(combined).to(torch.float32))).double().numpy()
            q = _unit(q)
            terms.append(np.mean([_cross_entropy(target @ q[b] / temperature, b + offset) for b in range(num_images)]))
        view_losses.append(np.mean(terms))
    return np.mean(view_losses), view_losses


@pytest.mark.parametrize("target_view, rank_1", [("other", False), ("same", False), ("other", True)])
def test_forward_is_the_numpy_loss_of_its_parts(target_view, rank_1, monkeypatch):
    model = tiny_fast_moco(target_view=target_view, contrastive_temperature=0.5).train()
    for module in model.children():
        module.eval()  # BatchNorm with running statistics: the parts are exactly what forward computes
    batch = inputs(seed=1)
    extra = None
    if rank_1:  # a 2-process global batch: rank 0's keys come first, our positives start at row 3
        extra = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))

        def gather(x):
            return torch.cat([torch.nn.functional.normalize(extra, dim=1).to(x.dtype), x]), extra.shape[0]

        monkeypatch.setattr(fast_moco_module, "all_gather_with_offset", gather)
    expected, (view_1, view_2) = reference_fast_moco_loss(model, batch, target_view, 0.5, extra)
    out = model(**batch)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss_view_1.item() == pytest.approx(view_1, rel=1e-5)
    assert out.loss_view_2.item() == pytest.approx(view_2, rel=1e-5)
    with torch.no_grad():
        k1, k2 = model.keys(batch["view_1"]), model.keys(batch["view_2"])
    assert out.target_cosine.item() == pytest.approx((k1 * k2).sum(1).mean().item(), rel=1e-5)


def test_target_branch_sees_full_views_only_and_gets_no_gradient(monkeypatch):
    model = tiny_fast_moco().train()
    seen = {"key": [], "query": []}
    for name, backbone in (("key", model.key_backbone), ("query", model.query_backbone)):
        original = backbone.forward

        def recording(*args, _original=original, _name=name, **kwargs):
            pixel_values = kwargs.get("pixel_values", args[0] if args else None)
            seen[_name].append(tuple(pixel_values.shape))
            return _original(*args, **kwargs)

        monkeypatch.setattr(backbone, "forward", recording)
    out = model(**inputs(num_images=4))
    assert seen["key"] == [(4, 3, 32, 32), (4, 3, 32, 32)]  # the two full views
    assert seen["query"] == [(16, 3, 16, 16), (16, 3, 16, 16)]  # the crops only, never a full view
    out.loss.backward()
    assert all(p.grad is None for p in model.key_backbone.parameters())
    assert all(p.grad is None for p in model.key_projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.query_backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())


def test_heads_parameter_groups_and_round_trip(tmp_path):
    model = tiny_fast_moco()
    last = model.query_projector.mlp[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and last.weight is not None and last.bias is not None
    assert sum(isinstance(x, torch.nn.Linear) for x in model.query_projector.mlp) == 3
    assert sum(isinstance(x, torch.nn.BatchNorm1d) for x in model.query_projector.mlp) == 3
    assert [x.out_features for x in model.predictor.mlp if isinstance(x, torch.nn.Linear)] == [4, 8]
    assert MocoConfig(version=3).projector_config.last_norm_affine is False  # MoCo v3 unchanged
    defaults = FastMocoConfig()
    assert (defaults.projector_config.hidden_dim, defaults.projector_config.out_dim, defaults.predictor_config.hidden_dim,
            defaults.predictor_config.out_dim, defaults.contrastive_temperature, defaults.target_view) == (
        2048, 2048, 512, 2048, 1.0, "other")
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert set(groups) == {"encoder_and_projector", "predictor"}
    assert all(g["apply_weight_decay"] for g in groups.values())
    assert groups["predictor"]["constant_lr"] and not groups["encoder_and_projector"]["constant_lr"]
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    assert {id(p) for p in groups["predictor"]["params"]} == {id(p) for p in model.predictor.parameters()}
    assert model.get_encoder() is model.query_backbone
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, FastMocoForPreTraining) and loaded.config.grid_size == 2
    assert loaded.config.projector_config.last_norm_affine is True
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="num_combined must be an int in 1..grid_size² = 1..4"):
        FastMocoConfig(num_combined=5)
    with pytest.raises(ValueError, match="num_combined"):
        FastMocoConfig(num_combined=0)
    with pytest.raises(ValueError, match="grid_size must be a positive int"):
        FastMocoConfig(grid_size=0)
    with pytest.raises(ValueError, match="target_view must be one of"):
        FastMocoConfig(target_view="both")
    with pytest.raises(ValueError, match="version must be 3 and queue_size 0"):
        FastMocoConfig(queue_size=10)
    model = tiny_fast_moco()
    batch = inputs(num_images=2, size=48, grid=3)  # a 3x3 grid for a model with grid_size 2
    with pytest.raises(ValueError, match=r"crops_1 has 18 rows, expected grid_size² = 4 crops per image"):
        model(**batch)


def test_grid_views_are_two_views_plus_their_grids():
    kwargs = dict(crop_size=16, crop_scale=[0.3, 1.0])
    grid = build_views("grid_views", (0.5,) * 3, (0.5,) * 3, grid=2, **kwargs)
    two = build_views("two_views", (0.5,) * 3, (0.5,) * 3, blur_p=[0.5, 0.5], solarize_p=[0.0, 0.0],
                      color_jitter_strength=[0.4, 0.4, 0.4, 0.1], crop_scale=[0.3, 1.0], crop_size=16)
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    views, reference = grid(images, seed=3), two(images, seed=3)
    assert set(views) == {"view_1", "view_2", "crops_1", "crops_2"}
    for v in (1, 2):
        assert torch.equal(views[f"view_{v}"], reference[f"view_{v}"])  # the same views as MoCo v2-style TwoViews
        assert torch.equal(views[f"crops_{v}"], grid_crops(views[f"view_{v}"], 2))  # cut from the augmented view
        assert views[f"crops_{v}"].shape == (16, 3, 8, 8)
    # global-batch augmentation: two halves give the one-process rows
    half = grid(images[2:], seed=3, offset=2, total=4)
    assert torch.equal(half["crops_2"], views["crops_2"][8:])
    with pytest.raises(ValueError, match="does not split into a 3x3 grid"):
        build_views("grid_views", (0.5,) * 3, (0.5,) * 3, crop_size=16, grid=3)


def test_registry_recipes_and_build_model(repo_root, fast_moco_recipe):
    assert modeling.METHODS["fast_moco"].views == "grid_views"
    model = build_model(load_recipe(fast_moco_recipe))
    assert model.config.projector_config.in_dim == 16 and model.config.predictor_config.in_dim == 8
    paper = build_model(load_recipe(repo_root / "recipes/fast_moco/fashion-mnist-resnet-tiny.yaml"))
    assert paper.config.projector_config.in_dim == 256 and paper.config.projector_config.last_norm_affine
    with pytest.raises(RecipeError, match="num_combined"):
        build_model(load_recipe(fast_moco_recipe, ["--model.num_combined", "7"]))
    imagenet = load_recipe(repo_root / "recipes/fast_moco/imagenet-resnet-50.yaml")
    assert (imagenet.learning_rate, imagenet.lr_scaling_batch_size, imagenet.total_train_batch_size,
            imagenet.max_grad_norm, imagenet.ema_momentum, imagenet.ema_momentum_end) == (0.1, 512, 512, 1.0, 0.99, 0.99)
    assert imagenet.augmentation["grid"] == imagenet.model["grid_size"] == 2
    baseline = load_recipe(repo_root / "recipes/moco/fashion-mnist-v3-fast-moco-baseline.yaml")
    ours = load_recipe(repo_root / "recipes/fast_moco/fashion-mnist-resnet-tiny.yaml")
    same = ("backbone", "image_size", "per_device_train_batch_size", "num_train_epochs", "optimizer", "learning_rate",
            "lr_scaling_batch_size", "warmup_epochs", "weight_decay", "max_grad_norm", "ema_momentum", "seed")
    assert all(getattr(baseline, k) == getattr(ours, k) for k in same)
    assert {k: v for k, v in ours.augmentation.items() if k != "grid"} == baseline.augmentation


def test_resume_gives_the_same_loss_curve(fast_moco_recipe, tmp_path):
    assert_resume_parity(fast_moco_recipe, tmp_path)
