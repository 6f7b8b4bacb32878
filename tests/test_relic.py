"""RELICv2: golden loss (both terms, numpy), the pairs and their normalisation, β = 0, no gradient into the target,
negative sampling (seeded, process-count independent), saliency masking in the views, config errors, resume."""
import math

import numpy as np
import pytest
import torch
from transformers import AutoModel

from hf_ssl.augment import build_views
from hf_ssl.recipe import RecipeError, load_recipe
from hf_ssl.train import train
from modeling import RelicConfig, RelicForPreTraining
from modeling.losses import in_batch_info_nce_loss, relic_loss
from modeling.relic import sample_candidates

from .test_moco import BACKBONE, MOCO_RECIPE, _unit
from .test_train import assert_resume_parity

# The tiny MoCo recipe as a RELICv2 one: 2 large 32 px crops + 2 small 16 px crops, 4 of the 7 other images as
# negatives, β = 0.5 (so that the logged terms' weights are told apart).
RELIC_RECIPE = (MOCO_RECIPE.replace("method: moco", "method: relic")
                .replace("  queue_size: 20\n", "  num_negatives: 4\n  invariance_weight: 0.5\n")
                .replace("augmentation: {{crop_size: 32, crop_scale: [0.3, 1.0]}}",
                         "augmentation: {{global_crop_size: 32, global_crop_scale: [0.3, 1.0], num_local_crops: 2, "
                         "local_crop_size: 16, local_crop_scale: [0.1, 0.4]}}"))


def tiny_relic(**kwargs) -> RelicForPreTraining:
    torch.manual_seed(0)
    config = RelicConfig(backbone_config=BACKBONE, projector_config={"in_dim": 16, "hidden_dim": 32, "out_dim": 8},
                         **kwargs)
    return RelicForPreTraining(config).double()


def crops(num_large=2, num_small=3, num_images=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_large, num_images, 3, 32, 32, generator=g, dtype=torch.float64),
            torch.randn(num_small, num_images, 3, 16, 16, generator=g, dtype=torch.float64))


def _log_softmax(x):
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def reference_relic(anchor, targets, candidates, temperature):
    """Both terms written from their definition in float64 numpy, one anchor at a time."""
    a, t = _unit(anchor), _unit(targets)
    contrastive = invariance = 0.0
    for i, row in enumerate(np.asarray(candidates)):
        log_p = _log_softmax(np.array([a[i] @ t[k] for k in row]) / temperature)
        log_q = _log_softmax(np.array([t[row[0]] @ t[k] for k in row]) / temperature)
        contrastive += -log_p[0]
        invariance += float(np.sum(np.exp(log_q) * (log_q - log_p)))
    return contrastive / len(a), invariance / len(a)


# ------------------------------------------------------------------------------------------------- the loss


def test_relic_loss_hand_computed_case():
    # anchor orthogonal to its positive, parallel to its negative: p = softmax([0, 1]), q = softmax([1, 0])
    contrastive, invariance = relic_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]]),
                                         torch.tensor([[0, 1]]), temperature=1.0)
    assert contrastive.item() == pytest.approx(math.log(1 + math.e))
    assert invariance.item() == pytest.approx(math.tanh(0.5))  # Σ q (log q - log p) = q0 - q1


def test_relic_loss_golden_against_numpy():
    g = torch.Generator().manual_seed(3)
    anchor, targets = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(12, 7, generator=g,
                                                                                         dtype=torch.float64)
    candidates = sample_candidates(12, offset=4, num_rows=5, num_negatives=6, generator=g)
    contrastive, invariance = relic_loss(anchor, targets, candidates, temperature=0.3)
    expected = reference_relic(anchor.numpy(), targets.numpy(), candidates.numpy(), 0.3)
    assert contrastive.item() == pytest.approx(expected[0], rel=1e-12)
    assert invariance.item() == pytest.approx(expected[1], rel=1e-12)
    assert invariance.item() > 0


def test_with_every_negative_the_contrastive_term_is_in_batch_info_nce():
    g = torch.Generator().manual_seed(4)
    anchor, targets = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g,
                                                                                        dtype=torch.float64)
    candidates = sample_candidates(8, offset=2, num_rows=4, num_negatives=100)
    contrastive, _ = relic_loss(anchor, targets, candidates, temperature=0.5)
    expected = in_batch_info_nce_loss(anchor, targets, 0.5, label_offset=2)
    torch.testing.assert_close(contrastive, expected, rtol=1e-12, atol=1e-12)


def test_no_gradient_reaches_the_target_through_the_kl():
    g = torch.Generator().manual_seed(5)
    anchor = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randn(8, 6, generator=g, dtype=torch.float64).requires_grad_()
    _, invariance = relic_loss(anchor, targets, sample_candidates(8, 0, 4, 3, generator=g), temperature=0.5)
    invariance.backward()
    assert targets.grad is None  # the target distribution (and the candidates) are constants
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ negative sampling


def test_sampled_candidates_are_the_positive_then_distinct_other_rows():
    g = torch.Generator().manual_seed(0)
    candidates = sample_candidates(20, offset=5, num_rows=6, num_negatives=7, generator=g)
    assert candidates.shape == (6, 8) and candidates.dtype == torch.long
    assert candidates[:, 0].tolist() == list(range(5, 11))
    for row in candidates.tolist():
        assert len(set(row)) == 8 and row[0] not in row[1:] and all(0 <= k < 20 for k in row)
    # every other row once when there are no more than n_e of them
    everything = sample_candidates(5, offset=1, num_rows=2, num_negatives=4)
    assert everything.tolist() == [[1, 0, 2, 3, 4], [2, 0, 1, 3, 4]]


def test_sampled_negatives_depend_on_the_seed_not_on_the_number_of_processes():
    def draw(offset, rows, seed=1):
        return sample_candidates(16, offset, rows, 5, generator=torch.Generator().manual_seed(seed))

    one_process = draw(0, 16)
    torch.testing.assert_close(torch.cat([draw(0, 8), draw(8, 8)]), one_process, rtol=0, atol=0)
    assert not torch.equal(draw(0, 16, seed=2), one_process)
    state = torch.random.get_rng_state()
    draw(0, 16)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG was used"


# ------------------------------------------------------------------------------------------------- the model


def test_forward_sums_the_pairs_of_every_crop_with_every_large_crop():
    """(L + S) · L pairs (large, large) including i = j and (small, large), each term the golden loss of its pair."""
    model = tiny_relic(num_negatives=3, contrastive_weight=0.7, invariance_weight=0.4).train()
    large, small = crops()
    outputs = model(large_crops=large, small_crops=small, negatives_seed=torch.tensor(11.0, dtype=torch.float64))
    # the same embeddings (BatchNorm in training mode sees the same batches), then the pairs by hand
    model_copy = tiny_relic(num_negatives=3).train()
    with torch.no_grad():
        anchors = list(model_copy.online_embeddings(large.flatten(0, 1))[0].unflatten(0, (2, 6)))
        anchors += list(model_copy.online_embeddings(small.flatten(0, 1))[0].unflatten(0, (3, 6)))
        targets = model_copy.keys(large.flatten(0, 1)).unflatten(0, (2, 6))
    generator = torch.Generator().manual_seed(11)
    terms = []
    for anchor in anchors:
        for view in targets:
            candidates = sample_candidates(6, 0, 6, 3, generator=generator)
            terms.append(reference_relic(anchor.numpy(), view.numpy(), candidates.numpy(), 0.2))
    assert len(terms) == (2 + 3) * 2
    contrastive, invariance = np.mean([t[0] for t in terms]), np.mean([t[1] for t in terms])
    assert outputs.contrastive_loss.item() == pytest.approx(contrastive, rel=1e-10)
    assert outputs.invariance_loss.item() == pytest.approx(invariance, rel=1e-10)
    assert outputs.loss.item() == pytest.approx(0.7 * contrastive + 0.4 * invariance, rel=1e-10)
    assert 0 < outputs.embedding_std.item() < 1


def test_beta_zero_is_the_contrastive_term_alone():
    large, small = crops(seed=1)
    seed = torch.tensor(3.0, dtype=torch.float64)
    with_kl = tiny_relic(invariance_weight=1.0).train()(large_crops=large, small_crops=small, negatives_seed=seed)
    without = tiny_relic(invariance_weight=0.0).train()(large_crops=large, small_crops=small, negatives_seed=seed)
    assert without.loss.item() == pytest.approx(without.contrastive_loss.item(), rel=1e-14)
    assert without.contrastive_loss.item() == pytest.approx(with_kl.contrastive_loss.item(), rel=1e-14)
    assert with_kl.loss.item() > without.loss.item()


def test_the_target_is_only_moved_by_ema_and_sees_large_crops_only(monkeypatch):
    model = tiny_relic().train()
    large, small = crops(seed=2)
    seen = []
    original = type(model).keys
    monkeypatch.setattr(type(model), "keys", lambda self, x: seen.append(x.shape) or original(self, x))
    model(large_crops=large, small_crops=small, negatives_seed=1).loss.backward()
    assert seen == [torch.Size([12, 3, 32, 32])]
    assert all(p.grad is None for p in [*model.key_backbone.parameters(), *model.key_projector.parameters()])
    assert model.get_encoder() is model.query_backbone


def test_predictor_is_optional_and_round_trips(tmp_path):
    assert tiny_relic().predictor is None and tiny_relic().config.predictor_config is None
    model = tiny_relic(predictor_config={"hidden_dim": 4})
    assert (model.config.predictor_config.in_dim, model.config.predictor_config.out_dim) == (8, 8)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModel.from_pretrained(tmp_path / "saved", dtype=torch.float64)
    assert type(reloaded) is RelicForPreTraining and reloaded.predictor is not None
    large, small = crops(seed=3)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(large, small, 5).loss, reloaded(large, small, 5).loss)


@pytest.mark.parametrize("kwargs, message", [
    ({"version": 2}, "version must be 3 and queue_size 0"),
    ({"num_negatives": 0}, "num_negatives must be a positive int"),
    ({"invariance_weight": -1.0}, "invariance_weight must be a number >= 0"),
    ({"mask_column": ""}, "mask_column must be a dataset column name"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RelicConfig(backbone_config=BACKBONE, **kwargs)


# ------------------------------------------------------------------------------------------------- the views


def relic_views(**kwargs):
    plain = dict(color_jitter_p=0.0, grayscale_p=0.0, flip_p=0.0, global_blur_p=(0.0, 0.0),
                 global_solarize_p=(0.0, 0.0), local_blur_p=0.0)
    return build_views("relic_views", (0.5,) * 3, (0.5,) * 3, **{**plain, **kwargs})


def white_images(n, size=16):
    return torch.full((n, 3, size, size), 255, dtype=torch.uint8)


def test_views_are_view_major_with_a_seed_for_the_negatives():
    views = relic_views(global_crop_size=16, local_crop_size=8, num_local_crops=3)
    out = views(white_images(5), seed=0)
    assert set(out) == {"large_crops", "small_crops", "negatives_seed"}
    assert out["large_crops"].shape == (2, 5, 3, 16, 16) and out["small_crops"].shape == (3, 5, 3, 8, 8)
    seed = out["negatives_seed"]
    assert seed.dim() == 0 and 0 <= seed.item() < 2**24 and float(seed.float().item()) == seed.item()
    assert views(white_images(5), seed=0)["negatives_seed"] == seed
    assert views(white_images(5), seed=1)["negatives_seed"] != seed
    assert set(relic_views(num_local_crops=0).output_names()) == {"large_crops", "negatives_seed"}


def test_masks_are_applied_with_probability_p_to_large_crops_only():
    n, p = 400, 0.3
    views = relic_views(global_crop_size=16, local_crop_size=8, num_local_crops=2, mask_p=p)
    assert views.input_names == ("pixel_values", "mask")
    # white images, all background: a masked crop is black (-1 after normalisation), an unmasked one white (+1)
    out = views({"pixel_values": white_images(n), "mask": torch.zeros(n, 1, 16, 16, dtype=torch.uint8)}, seed=0)
    large_black = (out["large_crops"] < -0.99).flatten(2).all(-1)  # [L, n]
    assert ((out["large_crops"] > 0.99).flatten(2).all(-1) | large_black).all()
    assert abs(large_black.float().mean().item() - p) < 0.05  # 800 coins: 3 standard deviations ~ 0.05
    assert (out["small_crops"] > 0.99).all(), "small crops are never masked"
    # one coin per large crop and image, independent: no masked image leaks into the other large crop
    both = (large_black[0] & large_black[1]).float().mean().item()
    assert abs(both - p * p) < 0.05
    assert relic_views(mask_p=0.0).input_names == ("pixel_values",)


def test_the_mask_is_applied_before_the_crop():
    """A half mask (left foreground) on white images, every large crop masked: a crop of the masked image shows the
    edge wherever the crop puts it, or no edge at all; a mask applied after the crop would always be at column 8."""
    n = 64
    views = relic_views(global_crop_size=16, global_crop_scale=(0.1, 0.3), num_local_crops=0, mask_p=1.0)
    mask = torch.zeros(n, 1, 16, 16, dtype=torch.uint8)
    mask[..., :8] = 255
    large = views({"pixel_values": white_images(n), "mask": mask}, seed=0)["large_crops"]
    white_columns = (large[:, :, 0] > 0).all(dim=2).sum(-1)  # [L, n] fully white columns of each crop
    assert (white_columns == 0).any() and (white_columns == 16).any()  # crops entirely in one half
    assert len(set(white_columns.flatten().tolist())) > 3


def test_masked_views_of_two_processes_are_the_one_process_views():
    n = 8
    views = relic_views(global_crop_size=16, local_crop_size=8, num_local_crops=1, mask_p=0.5,
                        color_jitter_p=0.8, flip_p=0.5)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
             "mask": torch.randint(0, 2, (n, 1, 16, 16), dtype=torch.uint8, generator=g) * 255}
    one = views(batch, seed=4)
    halves = [views({k: v[r * 4:(r + 1) * 4] for k, v in batch.items()}, seed=4, offset=r * 4, total=n)
              for r in range(2)]
    for key in ("large_crops", "small_crops"):
        torch.testing.assert_close(torch.cat([h[key] for h in halves], dim=1), one[key], rtol=0, atol=1e-6)
    assert halves[0]["negatives_seed"] == halves[1]["negatives_seed"] == one["negatives_seed"]


# ------------------------------------------------------------------------------------ training, masks, resume


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory, tiny_dataset):
    """The tiny dataset with a `foreground` mask column (the central 16 x 16 square of the 28 px images)."""
    import io

    import datasets
    from PIL import Image

    square = np.zeros((28, 28), dtype=np.uint8)
    square[6:22, 6:22] = 255
    png = io.BytesIO()
    Image.fromarray(square, mode="L").save(png, format="PNG")
    data = datasets.load_from_disk(str(tiny_dataset))
    path = tmp_path_factory.mktemp("masked_dataset") / "data"
    datasets.DatasetDict({split: data[split].add_column("foreground", [{"bytes": png.getvalue(), "path": None}]
                                                        * len(data[split])).cast_column("foreground", datasets.Image())
                          for split in data}).save_to_disk(str(path))
    return path


def test_mask_p_without_a_mask_column_stops_before_training(tmp_path, tiny_dataset):
    path = tmp_path / "relic.yaml"
    path.write_text(RELIC_RECIPE.format(output_dir=tmp_path / "run", dataset=tiny_dataset))
    with pytest.raises(RecipeError, match=r"mask_p > 0 needs a foreground mask: set model.mask_column") as error:
        train(load_recipe(path, ["--augmentation.mask_p", "0.5"]))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_with_saliency_masks_gives_the_same_loss_curve(tmp_path, masked_dataset):
    path = tmp_path / "relic.yaml"
    path.write_text(RELIC_RECIPE.format(output_dir=tmp_path / "run", dataset=masked_dataset)
                    .replace("  num_negatives: 4\n", "  num_negatives: 4\n  mask_column: foreground\n")
                    .replace("local_crop_scale: [0.1, 0.4]}}", "local_crop_scale: [0.1, 0.4], mask_p: 0.5}}"))
    assert_resume_parity(path, tmp_path)


# ------------------------------------------------------------------------------------- saliency from a model


def test_saliency_masks_are_cached_and_invalidated_when_the_model_changes(tmp_path, monkeypatch):
    import datasets
    from PIL import Image
    from transformers import ResNetConfig, ResNetModel

    import hf_ssl.saliency as saliency

    images = []
    for i in range(4):  # a bright square on black, at a different place in each image
        pixels = np.zeros((20, 24), dtype=np.uint8)
        pixels[2 + 2 * i:10 + 2 * i, 4 + 3 * i:12 + 3 * i] = 255
        images.append(Image.fromarray(pixels, mode="L"))
    dataset = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        ResNetModel(config).save_pretrained(tmp_path / name)
    calls = []
    original = saliency._masks_of
    monkeypatch.setattr(saliency, "_masks_of", lambda images, *args: calls.append(len(images)) or original(images,
                                                                                                        *args))

    def masks(encoder):
        return saliency.add_saliency_masks(dataset, tmp_path / encoder, "image", tmp_path / "cache", batch_size=2,
                                           image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)

    first = masks("a")
    assert calls == [2, 2] and first.column_names == ["image", "saliency_mask"]
    for row in first:  # one mask per image, at its size, black and white
        assert row["saliency_mask"].size == row["image"].size
        assert set(np.unique(np.asarray(row["saliency_mask"]))) <= {0, 255}
    again = masks("a")  # cached: nothing computed
    assert calls == [2, 2]
    assert [np.asarray(r["saliency_mask"]).tolist() for r in again] == [np.asarray(r["saliency_mask"]).tolist()
                                                                        for r in first]
    masks("b")  # other weights: computed again, under another key
    assert calls == [2, 2, 2, 2] and len(list((tmp_path / "cache").iterdir())) == 2
    key = saliency.saliency_cache_key(tmp_path / "a", 32, (0.5,) * 3, (0.5,) * 3, dataset._fingerprint)
    assert key != saliency.saliency_cache_key(tmp_path / "a", 64, (0.5,) * 3, (0.5,) * 3, dataset._fingerprint)
    assert key != saliency.saliency_cache_key(tmp_path / "a", 32, (0.5,) * 3, (0.5,) * 3, "another dataset")


@pytest.fixture()
def saliency_encoder(tmp_path):
    """A tiny ResNet encoder directory with an image processor (32 px, mean = std = 0.5), as `hf-ssl export` writes."""
    from transformers import ResNetConfig, ResNetModel, ViTImageProcessor

    torch.manual_seed(0)
    path = tmp_path / "saliency-encoder"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
                ).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path


def test_training_with_a_saliency_model_computes_caches_and_names_the_masks(tmp_path, tiny_dataset, saliency_encoder,
                                                                           monkeypatch):
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "relic.yaml"
    path.write_text(RELIC_RECIPE.format(output_dir=tmp_path / "run", dataset=tiny_dataset))
    overrides = ["--augmentation.mask_p", "1.0", "--saliency_model", str(saliency_encoder), "--max_steps", "2"]
    train(load_recipe(path, overrides))
    cached = list((tmp_path / "xdg" / "hf_ssl" / "saliency").iterdir())
    assert len(cached) == 1 and cached[0].is_dir()  # one key, no partial left
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    card = (tmp_path / "run" / "encoder" / "README.md").read_text()
    assert f"foreground masks from the feature-norm map of `{saliency_encoder}`" in card
    # the second run reads the cache: the computation is not called again
    import hf_ssl.saliency as saliency

    monkeypatch.setattr(saliency, "_masks_of", lambda *args: pytest.fail("masks computed again"))
    train(load_recipe(path, [*overrides, "--output_dir", str(tmp_path / "again")]))
    assert len(list((tmp_path / "xdg" / "hf_ssl" / "saliency").iterdir())) == 1


@pytest.mark.parametrize("overrides, message", [
    (["--saliency_model", "{encoder}"], r"saliency_model is set but the relic views read no mask"),
    (["--saliency_model", "{encoder}", "--augmentation.mask_p", "0.5", "--model.mask_column", "foreground"],
     r"saliency_model and model.mask_column \('foreground'\) both give the foreground mask"),
    (["--saliency_model", "{missing}", "--augmentation.mask_p", "0.5"],
     r"saliency_model '.*no-such-encoder': cannot load an encoder"),
    (["--saliency_model", "{encoder}", "--augmentation.mask_p", "0.5", "--streaming", "true", "--max_steps", "2"],
     r"saliency_model needs a map-style dataset"),
])
def test_saliency_model_errors_stop_before_training(tmp_path, masked_dataset, saliency_encoder, overrides, message):
    path = tmp_path / "relic.yaml"
    path.write_text(RELIC_RECIPE.format(output_dir=tmp_path / "run", dataset=masked_dataset))
    overrides = [o.format(encoder=saliency_encoder, missing=tmp_path / "no-such-encoder") for o in overrides]
    with pytest.raises(RecipeError, match=message) as error:
        train(load_recipe(path, overrides))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
