"""Optimizers over the model's parameter groups: LARS against its formula, constant-lr groups, group checks."""
import numpy as np
import pytest
import torch

from hf_ssl.optimization import LARS, apply_schedule, build_optimizer, checked_parameter_groups
from hf_ssl.recipe import RecipeError, load_recipe
from hf_ssl.train import build_model, schedule_values, train
from modeling.pretraining import TrainingProgress, parameter_group


def reference_lars(params, grads, steps, lr, weight_decay, momentum, eta, adapt):
    """LARS from the formula in float64 numpy: u = g + wd·w, scaled by eta·‖w‖/‖u‖ for adapted parameters (unless a
    norm is 0); mu = momentum·mu + u; w -= lr·mu."""
    params = [np.array(p, dtype=np.float64) for p in params]
    mus = [np.zeros_like(p) for p in params]
    for step in range(steps):
        for i, (w, a) in enumerate(zip(params, adapt)):
            decay = weight_decay if a else 0.0
            u = grads[step][i] + decay * w
            if a:
                w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(u)
                if w_norm > 0 and u_norm > 0:
                    u = u * eta * w_norm / u_norm
            mus[i] = momentum * mus[i] + u
            params[i] = w - lr * mus[i]
    return params


def test_lars_matches_the_formula_with_and_without_adaptation():
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,), (2, 2)]
    start = [rng.normal(size=s) for s in shapes]
    start[2] = np.zeros((2, 2))  # a zero weight: trust ratio 1
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(3)]
    weights = [torch.tensor(p, requires_grad=True) for p in start]
    optimizer = LARS([parameter_group("weights", [weights[0], weights[2]]),
                      parameter_group("biases_and_norms", [weights[1]], apply_weight_decay=False)],
                     lr=0.1, momentum=0.9, trust_coefficient=0.02)
    apply_schedule(optimizer, lr=0.1, peak_lr=0.1, weight_decay=0.05)
    for step in range(3):
        for w, g in zip(weights, grads[step]):
            w.grad = torch.tensor(g)
        optimizer.step()
    expected = reference_lars(start, grads, 3, lr=0.1, weight_decay=0.05, momentum=0.9, eta=0.02,
                              adapt=[True, False, True])
    for got, want in zip(weights, expected):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-14)
    # the adapted update is eta·‖w‖ in size, whatever the gradient's scale
    assert not np.allclose(expected[0], start[0] - 0.1 * grads[0][0])


def test_constant_lr_group_stays_at_the_peak_lr_while_the_others_follow_the_schedule():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.SGD([parameter_group("backbone", [a]), parameter_group("predictor", [b], constant_lr=True)],
                                lr=1.0)
    apply_schedule(optimizer, lr=0.01, peak_lr=0.5, weight_decay=1e-4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("backbone", 0.01, 1e-4), ("predictor", 0.5, 1e-4)]


def test_default_groups_exclude_biases_and_norms_from_decay_and_lars(repo_root):
    model = build_model(load_recipe(repo_root / "recipes/moco/fashion-mnist-v3-resnet-tiny.yaml",
                                    ["--optimizer", "lars"]))
    groups = {g["name"]: g for g in checked_parameter_groups(model)}
    assert all(p.ndim > 1 for p in groups["weights"]["params"])
    assert all(p.ndim <= 1 for p in groups["biases_and_norms"]["params"])
    assert not groups["biases_and_norms"]["apply_weight_decay"] and not groups["biases_and_norms"]["lars_adaptation"]
    optimizer = build_optimizer(model, load_recipe(repo_root / "recipes/moco/fashion-mnist-v3-resnet-tiny.yaml",
                                                   ["--optimizer", "lars"]))
    assert isinstance(optimizer, LARS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable


@pytest.mark.parametrize("case", ["twice", "left_out", "frozen"])
def test_bad_parameter_groups_are_named(repo_root, case, monkeypatch):
    model = build_model(load_recipe(repo_root / "recipes/moco/fashion-mnist-resnet-tiny.yaml"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = next(p for p in model.parameters() if not p.requires_grad)
    groups = {"twice": [parameter_group("a", trainable), parameter_group("b", trainable[:1])],
              "left_out": [parameter_group("a", trainable[1:])],
              "frozen": [parameter_group("a", trainable + [frozen])]}[case]
    monkeypatch.setattr(type(model), "parameter_groups", lambda self: groups)
    message = {"twice": "is in groups 'a' and 'b'", "left_out": "leaves out trainable parameters: query_backbone",
               "frozen": "is frozen"}[case]
    with pytest.raises(RecipeError, match=message):
        checked_parameter_groups(model)


def test_the_loop_schedules_only_generic_values_and_the_method_its_own(repo_root):
    dino = load_recipe(repo_root / "recipes/dino/imagenet-vit-small-16.yaml")
    moco = load_recipe(repo_root / "recipes/moco/fashion-mnist-resnet-tiny.yaml")
    progress = TrainingProgress(step=15 * 100, total_steps=300 * 100, steps_per_epoch=100)  # epoch 15 of 300
    assert set(schedule_values(dino, progress, 1024)) == set(schedule_values(moco, progress, 1024)) == {
        "lr", "weight_decay", "ema_momentum"}
    tiny_dino = build_model(load_recipe(repo_root / "recipes/dino/imagenet-vit-small-16.yaml",
                                        ["--model.head_config.out_dim", "64", "--model.head_config.hidden_dim", "32"]))
    assert tiny_dino.schedule_values(progress) == {"teacher_temperature": pytest.approx(0.055)}  # halfway 0.04 -> 0.07
    assert build_model(moco).schedule_values(progress) == {}


@pytest.mark.parametrize("key", ["teacher_temperature", "warmup_teacher_temperature",
                                 "warmup_teacher_temperature_epochs"])
def test_dino_keys_at_the_old_top_level_place_are_refused_naming_the_new_one(repo_root, key):
    with pytest.raises(RecipeError, match=rf"recipe key '{key}' moved to model\.{key} \(DINO's config\)"):
        load_recipe(repo_root / "recipes/dino/fashion-mnist-resnet-tiny.yaml", [f"--{key}", "0.05"])


def test_training_with_lars_keeps_a_constant_lr_group_at_the_peak_lr(tmp_path, tiny_dataset, tiny_teacher,
                                                                      monkeypatch):
    """The loop sets each group's lr every step: a model's constant-lr group (here MoCo v3's predictor, as Fast-MoCo
    will) stays at the peak lr during warmup while the others follow the schedule; LARS trains through the loop."""
    from modeling import MocoForPreTraining

    from .tiny_methods import write_tiny_recipe

    def groups(self):
        predictor = list(self.predictor.parameters())
        rest = [p for p in self.parameters() if p.requires_grad and all(p is not q for q in predictor)]
        return [parameter_group("encoder", rest), parameter_group("predictor", predictor, constant_lr=True)]

    monkeypatch.setattr(MocoForPreTraining, "parameter_groups", groups)
    path, overrides = write_tiny_recipe("moco-v3", tmp_path, tiny_dataset, tiny_teacher)
    recipe = load_recipe(path, overrides + ["--optimizer", "lars", "--max_steps", "2", "--warmup_epochs", "1",
                                            "--checkpointing_steps", "2", "--do_eval", "false"])
    train(recipe)
    state = torch.load(tmp_path / "moco-v3" / "checkpoints" / "step_2" / "optimizer.bin", weights_only=True)
    lrs = {g["name"]: g["lr"] for g in state["param_groups"]}
    peak = recipe.learning_rate * 8 / recipe.lr_scaling_batch_size
    assert lrs["predictor"] == pytest.approx(peak)
    assert lrs["encoder"] == pytest.approx(peak / 2)  # step 1 of the warmup (1 epoch, capped at the 2 steps)
    assert all("momentum_buffer" in s for s in state["state"].values())  # LARS stepped every parameter
