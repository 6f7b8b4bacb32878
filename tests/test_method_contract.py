"""The model contract (modeling/pretraining.py), checked for every registered method from its tiny setting in
tests/tiny_methods.py: save/load round trip, Auto* registration, views that match `forward`, a loss equal to its
logged parts, EMA/momentum only after real optimizer steps, and a skipped step that leaves no trace."""
import copy
import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModel

from hf_ssl.augment import build_views, check_input_columns_cover_views, check_views_match_forward
from hf_ssl.optimization import build_optimizer
from hf_ssl.recipe import RecipeError, load_recipe
from hf_ssl.train import build_model, model_inputs, train
from modeling import METHODS
from modeling.pretraining import TrainingProgress

from .tiny_methods import TINY_METHODS, VARIANTS, write_tiny_recipe

PROGRESS = TrainingProgress(step=3, total_steps=10, steps_per_epoch=5)


def test_every_registered_method_has_a_tiny_setting():
    assert set(TINY_METHODS) == set(METHODS), "add the method's tiny setting to tests/tiny_methods.py"


@pytest.fixture(params=sorted(VARIANTS))
def tiny(request, tmp_path, tiny_dataset, tiny_teacher):
    """(recipe, model, views) of one variant, in float64 so that comparisons are exact up to rounding."""
    path, overrides = write_tiny_recipe(request.param, tmp_path, tiny_dataset, tiny_teacher)
    recipe = load_recipe(path, overrides + ["--dtype", "float64"])
    torch.manual_seed(0)
    model = build_model(recipe)
    views = build_views(METHODS[recipe.method].views, recipe.image_mean, recipe.image_std, **recipe.augmentation)
    return recipe, model, views


def draw_views(recipe, views, seed: int) -> dict[str, torch.Tensor]:
    images = torch.randint(0, 256, (8, 3, recipe.image_size, recipe.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return model_inputs(views(images, seed), recipe)


def test_views_match_forward(tiny):
    recipe, model, views = tiny
    check_views_match_forward(views, model.forward, model.schedule_values(PROGRESS))
    check_input_columns_cover_views(views, model.input_columns())
    inputs = {**draw_views(recipe, views, 0), **model.schedule_values(PROGRESS)}
    assert set(inputs) == set(views.output_names()) | set(model.schedule_values(PROGRESS))
    assert torch.isfinite(model(**inputs).loss)


def test_a_view_recipe_that_does_not_fit_forward_stops_training_before_any_step(tiny_recipe, monkeypatch):
    monkeypatch.setitem(METHODS, "dino", dataclasses.replace(METHODS["dino"], views="two_views"))
    with pytest.raises(RecipeError, match="method 'dino': .*view_1"):
        train(load_recipe(None, {**load_recipe(tiny_recipe).to_dict(), "augmentation": {"crop_size": 32}}))


def test_save_load_round_trip_through_auto_classes(tiny, tmp_path):
    recipe, model, views = tiny
    method = METHODS[recipe.method]
    assert AutoConfig.for_model(model.config.model_type).__class__ is method.config_class
    assert type(model) is method.model_class
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModel.from_pretrained(tmp_path / "saved", dtype=torch.float64)
    assert type(reloaded) is method.model_class
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the same trainable / frozen split (frozen parts are restored after loading)
    assert ([n for n, p in model.named_parameters() if p.requires_grad]
            == [n for n, p in reloaded.named_parameters() if p.requires_grad])
    inputs = {**draw_views(recipe, views, 1), **model.schedule_values(PROGRESS)}
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).loss, reloaded(**inputs).loss)


def test_loss_is_its_logged_parts(tiny):
    recipe, model, views = tiny
    outputs = model.train()(**draw_views(recipe, views, 2), **model.schedule_values(PROGRESS))
    weights = TINY_METHODS[recipe.method].loss_weights
    if not weights:  # the loss has no parts: no other loss term may be logged
        assert [k for k in outputs if "loss" in k] == ["loss"]
        return
    expected = sum(outputs[term] * (1.0 if attr is None else getattr(model.config, attr))
                   for term, attr in weights.items())
    torch.testing.assert_close(outputs.loss.detach(), expected, rtol=1e-12, atol=1e-12)


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_momentum_state_moves_only_in_post_optimizer_step(tiny):
    recipe, model, views = tiny
    optimizer = build_optimizer(model, recipe)
    before = frozen_state(model)
    if not TINY_METHODS[recipe.method].momentum:  # nothing frozen, and post_optimizer_step touches nothing
        assert not before, "a method without a momentum network trains every parameter"
        state = copy.deepcopy(model.state_dict())
        model.post_optimizer_step(momentum=0.5)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        return
    assert before, "a method with an EMA / momentum network has frozen parameters"
    model.train()(**draw_views(recipe, views, 3), **model.schedule_values(PROGRESS)).loss.backward()
    optimizer.step()
    after_step = frozen_state(model)
    assert all(torch.equal(before[n], after_step[n]) for n in before), "forward/backward/step moved frozen weights"
    model.post_optimizer_step(momentum=0.5)
    moved = [n for n, p in frozen_state(model).items() if not torch.equal(p, before[n])]
    assert moved, "post_optimizer_step moved no frozen weight"


def test_ema_runs_once_per_real_optimizer_step_in_training(tiny, monkeypatch):
    recipe, model, _ = tiny
    calls = []
    original = type(model).post_optimizer_step

    def counting(self, momentum):
        calls.append(momentum)
        return original(self, momentum)

    monkeypatch.setattr(type(model), "post_optimizer_step", counting)
    train(load_recipe(None, {**recipe.to_dict(), "max_steps": 2, "gradient_accumulation_steps": 2, "do_eval": False,
                             "dtype": "float32"}))
    assert len(calls) == 2  # 4 micro-batches, 2 optimizer steps


def test_a_skipped_step_leaves_no_trace(tiny):
    """A forward whose step is discarded (nan_policy: skip) changes nothing that the next real step sees: buffers
    (BatchNorm statistics, DINO's center) and MoCo's keys waiting for the queue included."""
    recipe, model, views = tiny
    model.train()
    twin = copy.deepcopy(model)
    snapshot = model.step_snapshot()
    model(**draw_views(recipe, views, 4), **model.schedule_values(PROGRESS))  # the step that will be skipped
    model.discard_step(snapshot)
    good = draw_views(recipe, views, 5)
    for m in (model, twin):
        m(**good, **m.schedule_values(PROGRESS))
        m.post_optimizer_step(momentum=0.5)
    got, want = model.state_dict(), twin.state_dict()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"the skipped step left a trace in {different}"
