"""Recipe parsing and validation; schedules."""
import math

import pytest
import torch

from hf_ssl.augment import build_views
from hf_ssl.recipe import RecipeError, load_recipe, parse_overrides
from hf_ssl.train import build_model, schedule_values
from modeling import schedules
from modeling.pretraining import TrainingProgress

RECIPE = "recipes/dino/fashion-mnist-resnet-tiny.yaml"


def test_every_shipped_recipe_loads_and_builds_its_model_config(repo_root):
    for path in sorted((repo_root / "recipes").glob("*/*.yaml")):
        if path.parent.name == "accelerate":
            continue
        recipe = load_recipe(path)
        if path.parent.name == "disco" and "teacher" in path.name:
            assert recipe.method == "moco"  # DisCo's teacher recipes: step 1 of a distillation
        else:
            assert recipe.method == path.parent.name


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["--max_steps", "5", "--model.head_config.out_dim=64", "--eval_split", "null"]) == {
        "max_steps": 5, "model": {"head_config": {"out_dim": 64}}, "eval_split": None}


def test_override_merges_into_nested_yaml(repo_root):
    recipe = load_recipe(repo_root / RECIPE, ["--model.head_config.out_dim", "64", "--output_dir", "x"])
    assert recipe.model["head_config"] == {"hidden_dim": 512, "bottleneck_dim": 128, "out_dim": 64}
    assert recipe.output_dir == "x"


def test_unknown_key_names_the_closest_valid_key(repo_root):
    with pytest.raises(RecipeError, match=r"'learning_rte'.*did you mean 'learning_rate'"):
        load_recipe(repo_root / RECIPE, ["--learning_rte", "0.1"])


def test_wrong_type_and_range_are_refused(repo_root):
    with pytest.raises(RecipeError, match="max_steps='ten' has the wrong type"):
        load_recipe(repo_root / RECIPE, ["--max_steps", "ten"])
    with pytest.raises(RecipeError, match="per_device_train_batch_size must be > 0"):
        load_recipe(repo_root / RECIPE, ["--per_device_train_batch_size", "0"])
    with pytest.raises(RecipeError, match="optimizer='adam' is not one of"):
        load_recipe(repo_root / RECIPE, ["--optimizer", "adam"])


@pytest.mark.parametrize("override, message", [
    (["--learning_rate", "-0.1"], "learning_rate must be > 0, got -0.1"),
    (["--learning_rate", "0"], "learning_rate must be > 0, got 0"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be > 0, got 0"),
    (["--gradient_accumulation_steps", "-1"], "gradient_accumulation_steps must be > 0"),
    (["--image_size", "0"], "image_size must be > 0"),
    (["--min_learning_rate", "-1e-6"], "min_learning_rate must be >= 0, got -1e-06"),
    (["--warmup_epochs", "-1"], "warmup_epochs must be >= 0"),
    (["--weight_decay", "-0.04"], "weight_decay must be >= 0"),
    (["--dataloader_num_workers", "-1"], "dataloader_num_workers must be >= 0"),
    (["--adam_beta2", "1.0"], r"adam_beta2 must be in \[0, 1\), got 1.0"),
    (["--sgd_momentum", "-0.5"], r"sgd_momentum must be in \[0, 1\)"),
    (["--ema_momentum", "1.5"], r"ema_momentum must be in \[0, 1\], got 1.5"),
    (["--max_grad_norm", "0"], "max_grad_norm must be > 0 or null"),
    (["--save_total_limit", "0"], "save_total_limit must be > 0 or null"),
    (["--checkpointing_steps", "0"], "checkpointing_steps must be > 0 or null"),
    (["--num_train_epochs", "0"], "set num_train_epochs > 0 or max_steps > 0"),
    (["--image_std", "[0.5, 0.0, 0.5]"], r"image_std values must be > 0"),
    (["--image_mean", "[0.5, 0.5]", "--image_std", "[0.5, 0.5]"], "image_mean needs one value per RGB channel"),
    (["--on_bad_image", "ignore"], r"on_bad_image='ignore' is not one of \['skip', 'error'\]"),
    (["--nan_policy", "ignore"], r"nan_policy='ignore' is not one of \['stop', 'skip'\]"),
    (["--nan_max_consecutive_skips", "0"], "nan_max_consecutive_skips must be > 0"),
    (["--collapse_std_fraction", "-0.1"], "collapse_std_fraction must be > 0 or null"),
    (["--mixed_precision", "fp8"], r"mixed_precision='fp8' is not one of"),
    (["--dtype", "float16"], r"dtype='float16' is not one of \['float32', 'float64'\]"),
    (["--dtype", "float64", "--mixed_precision", "bf16"], "dtype=float64 trains in float64: mixed_precision must be"),
    (["--learning_rate", "fast"], "learning_rate='fast' has the wrong type: expected float"),
    (["--per_device_train_batch_size", "8.5"], "per_device_train_batch_size=8.5 has the wrong type: expected int"),
    (["--streaming", "maybe"], "streaming='maybe' has the wrong type: expected bool"),
    (["--eval_steps", "10", "--eval_split", "null"], "eval_steps .* needs an eval_split"),
])
def test_every_out_of_range_or_mistyped_value_is_refused_naming_the_key(repo_root, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(repo_root / RECIPE, override)


def test_scientific_notation_is_a_float_on_the_command_line_and_in_yaml(repo_root, tmp_path):
    assert load_recipe(repo_root / RECIPE, ["--learning_rate", "1e-4"]).learning_rate == 1e-4  # PyYAML: a str
    path = tmp_path / "r.yaml"
    path.write_text((repo_root / RECIPE).read_text().replace("learning_rate: 0.0005", "learning_rate: 5e-4"))
    assert load_recipe(path).learning_rate == 5e-4


def test_no_is_a_string_as_accelerate_users_write_it_and_only_true_false_are_booleans(repo_root, tmp_path):
    # PyYAML (YAML 1.1) reads no / yes / on / off as booleans: `mixed_precision: no` was refused as "expected str"
    assert load_recipe(repo_root / RECIPE, ["--mixed_precision", "no"]).mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text((repo_root / RECIPE).read_text() + "\nmixed_precision: no\nchannels_last: true\n")
    recipe = load_recipe(path)
    assert recipe.mixed_precision == "no" and recipe.channels_last is True
    with pytest.raises(RecipeError, match="channels_last='yes' has the wrong type: expected bool"):
        load_recipe(repo_root / RECIPE, ["--channels_last", "yes"])


@pytest.mark.parametrize("augmentation, message", [
    ({"local_crop_scale": [0.0, 0.4]}, r"local_crop_scale must satisfy 0 < min <= max <= 1 .*got \[0.0, 0.4\]"),
    ({"global_crop_scale": [0.4, 1.5]}, r"global_crop_scale must satisfy 0 < min <= max <= 1"),
    ({"global_crop_scale": [0.8, 0.4]}, r"global_crop_scale must satisfy 0 < min <= max <= 1"),
    ({"global_crop_scale": [0.4]}, r"global_crop_scale must be \[min, max\]"),
    ({"global_crop_size": 0}, "global_crop_size must be a positive number of pixels, got 0"),
    ({"num_local_crops": -2}, "num_local_crops must be an int >= 0, got -2"),
    ({"color_jitter_p": 1.5}, r"color_jitter_p must be a probability in \[0, 1\], got 1.5"),
    ({"global_blur_p": [1.0, -0.1]}, r"global_blur_p must be a probability in \[0, 1\]"),
    ({"color_jitter_strength": [0.4, 0.4]}, r"color_jitter_strength must be \[brightness, contrast, saturation, hue\]"),
    ({"color_jitter_strength": [0.4, 0.4, 0.2, 0.9]}, r"hue <= 0.5, got \[0.4, 0.4, 0.2, 0.9\]"),
    ({"local_crop_scal": [0.1, 0.4]}, r"\['local_crop_scal'\].*did you mean 'local_crop_scale'"),
])
def test_augmentation_values_are_checked(augmentation, message):
    with pytest.raises(ValueError, match=message):
        build_views("multicrop", (0.5,) * 3, (0.5,) * 3, **augmentation)


def test_cli_reports_a_bad_augmentation_value_as_a_recipe_error_before_any_work(tiny_recipe, tmp_path, capsys):
    from hf_ssl.cli import main

    assert main(["train", str(tiny_recipe), "--augmentation.local_crop_scale", "[0, 0.4]"]) == 2
    err = capsys.readouterr().err
    assert "hf-ssl train: error: augmentation: local_crop_scale must satisfy 0 < min <= max <= 1" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_unknown_method_backbone_and_model_keys(repo_root):
    with pytest.raises(RecipeError, match="unknown method 'dinov9'; valid methods: dino"):
        build_model(load_recipe(repo_root / RECIPE, ["--method", "dinov9"]))
    with pytest.raises(RecipeError, match=r"Unknown backbone 'resnet-7'; valid presets: .*resnet-18, .*resnet-tiny"):
        build_model(load_recipe(repo_root / RECIPE, ["--backbone", "resnet-7"]))
    with pytest.raises(RecipeError, match=r"'student_temp'.*did you mean 'student_temperature'"):
        build_model(load_recipe(repo_root / RECIPE, ["--model.student_temp", "0.2"]))
    with pytest.raises(RecipeError, match=r"model.head_config.*'outdim'"):
        build_model(load_recipe(repo_root / RECIPE, ["--model.head_config.outdim", "7"]))


def test_build_model_matches_head_to_backbone(repo_root):
    model = build_model(load_recipe(repo_root / RECIPE))
    assert model.config.head_config.in_dim == 256  # resnet-tiny's pooled feature
    assert model.config.head_config.out_dim == 4096


def test_build_model_in_the_recipe_dtype(repo_root):
    model = build_model(load_recipe(repo_root / RECIPE, ["--dtype", "float64"]))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float64}  # DINO's center too


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("does/not/exist.yaml")


def test_schedules_are_pure_functions_of_the_step():
    assert schedules.warmup_cosine(0, 100, 10, 1.0, 0.0) == 0.0
    assert schedules.warmup_cosine(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert schedules.warmup_cosine(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert schedules.warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert schedules.warmup_cosine(100, 100, 10, 1.0, 0.0) == 0.0
    assert schedules.cosine(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert schedules.linear_warmup_then_constant(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert schedules.linear_warmup_then_constant(31, 30, 0.04, 0.07) == 0.07


def test_lr_scales_with_global_batch(repo_root):
    recipe = load_recipe(repo_root / RECIPE, ["--warmup_epochs", "0"])
    values = schedule_values(recipe, TrainingProgress(0, 100, 10), global_batch_size=512)
    assert values["lr"] == pytest.approx(recipe.learning_rate * 2)
    assert values["weight_decay"] == pytest.approx(recipe.weight_decay)
    mid = schedule_values(recipe, TrainingProgress(50, 100, 10), global_batch_size=256)
    assert mid["ema_momentum"] == pytest.approx((recipe.ema_momentum + 1) / 2)
    assert mid["lr"] == pytest.approx(recipe.min_learning_rate + 0.5 * (recipe.learning_rate - recipe.min_learning_rate)
                                      * (1 + math.cos(math.pi * 0.5)))


def test_imagenet_recipe_is_the_paper_setting(repo_root):
    recipe = load_recipe(repo_root / "recipes/dino/imagenet-vit-small-16.yaml")
    assert recipe.backbone == "vit-small-16" and recipe.model["head_config"]["out_dim"] == 65536
    assert recipe.augmentation["num_local_crops"] == 8 and recipe.augmentation["local_crop_size"] == 96
    assert (recipe.model["teacher_temperature"], recipe.model["warmup_teacher_temperature_epochs"]) == (0.07, 30)
    model = build_model(load_recipe(repo_root / "recipes/dino/imagenet-vit-small-16.yaml",
                                    ["--model.head_config.out_dim", "256", "--model.head_config.hidden_dim", "64"]))
    assert model.config.head_config.in_dim == 384  # ViT-S hidden size, CLS token


# ------------------------------------------------------------------------------------ hf-ssl train --help


def train_help(capsys, *args) -> str:
    from hf_ssl.cli import main

    assert main(["train", *map(str, args), "--help"]) == 0
    return capsys.readouterr().out


def test_train_help_lists_every_shared_key_with_type_default_and_help(capsys):
    import dataclasses

    from hf_ssl.recipe import PretrainingRecipe

    text = " ".join(train_help(capsys).split())  # argparse wraps lines
    for f in dataclasses.fields(PretrainingRecipe):
        assert f.metadata.get("help"), f"recipe key {f.name} has no help"
        assert f"--{f.name} " in text
    assert "--learning_rate FLOAT The peak learning rate before batch scaling. (default: 0.0005)" in text
    assert "--push_to_hub BOOL" in text and "(default: false)" in text
    assert "--hub_model_id STR" in text and "(default: null)" in text
    assert "--image_mean [FLOAT]" in text and "(default: [0.485, 0.456, 0.406])" in text
    assert "fast_moco (hf-ssl methods). (required)" in text
    assert "model: keys of" not in text  # a method's keys need its recipe


def test_train_help_with_a_recipe_adds_its_method_keys_and_values(capsys, repo_root, tmp_path):
    text = " ".join(train_help(capsys, repo_root / "recipes/dino/fashion-mnist-demo.yaml").split())
    assert "model: keys of DinoConfig" in text and "--learning_rate FLOAT" in text
    assert "--model.koleo_weight FLOAT" in text and "(default: 0.0; fashion-mnist-demo.yaml: 0.05)" in text
    assert "--model.student_temperature FLOAT τs of the student softmax. (default: 0.1)" in text
    assert "--model.head_config.out_dim INT number of prototypes (the softmax's size). (default: 65536; " \
           "fashion-mnist-demo.yaml: 1024)" in text
    assert "--augmentation.num_local_crops INT small crops per image (0: none). (default: 8" in text
    assert "--augmentation.global_crop_scale [FLOAT,FLOAT]" in text and "(default: [0.4, 1.0]" in text
    assert not (tmp_path / "run").exists()
    # the heads listed are the ones this recipe can set: MoCo v2 has no predictor, v3 has one (v3 defaults)
    v2 = train_help(capsys, repo_root / "recipes/moco/fashion-mnist-resnet-tiny.yaml")
    v3 = " ".join(train_help(capsys, repo_root / "recipes/moco/fashion-mnist-v3-fast-moco-baseline.yaml").split())
    assert "--model.projector_config.out_dim" in v2 and "--model.predictor_config" not in v2
    assert "--model.predictor_config.hidden_dim INT" in v3 and "--model.projector_config.num_layers INT linear " \
           "layers. (default: 3)" in v3


@pytest.mark.parametrize("method", ["dino", "moco", "disco", "fast_moco"])
def test_every_method_and_view_key_has_help_from_its_docstring(method):
    from modeling import METHODS

    from hf_ssl.recipe import init_keys, method_key_docs

    sections = method_key_docs(method, {"model": {"version": 3} if method == "moco" else {}})
    keys = {key.name: key for section in sections for key in section.keys}
    assert [k for k, key in keys.items() if not key.help] == []
    config_cls = METHODS[method].config_class
    expected = [f"model.{k}" for k in init_keys(config_cls) if k not in ("backbone_config", "kwargs",
                                                                         *config_cls.sub_configs)]
    assert expected and all(k in keys for k in expected)
    assert any(k.startswith("augmentation.") for k in keys)


def test_train_without_a_recipe_is_one_line(capsys):
    from hf_ssl.cli import main

    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a recipe" in err
