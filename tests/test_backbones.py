"""Every supported transformers vision backbone family (modeling/backbones.py), on tiny configs.

For each family: a checkpoint saved with plain transformers (with its pooler, as the Hub has them) starts two DINO
steps through `backbone_name_or_path`, and the exported `encoder/` reloads with plain `AutoModel` and gives the same
pooled feature, named in its card; a `backbone_config` builds and trains every backbone parameter (the method's
backbones are built the same way on both paths). Models of other families are refused in one line.
Position-embedding models are configured for 64 px and fed 32 px (as a 224 px checkpoint continued on small
images), so their interpolation is exercised.
"""
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, BeitForMaskedImageModeling

from hf_ssl import cli
from hf_ssl.recipe import RecipeError, load_recipe
from hf_ssl.train import build_model, train
from modeling.backbones import (BACKBONE_FAMILIES, backbone_family, build_backbone, feature_dim, load_backbone,
                                pooled_features)

# Few channels and layers; the checkpoints are made by each family's own default initialisation.
TINY_BACKBONES = {
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    "vit": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8,
                image_size=64),
    "deit": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8,
                 image_size=64),
    "dinov2": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=8,
                   image_size=64),
    "vit_msn": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8,
                    image_size=64),
    "beit": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8,
                 image_size=64, use_relative_position_bias=True),
    "swin": dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2, patch_size=4, image_size=64),
    "convnext": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "convnextv2": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "regnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
    # EfficientNet's final BatchNorm has hidden_dim channels: round_filters(1280) at this width.
    "efficientnet": dict(width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, image_size=32),
    "mobilenet_v2": dict(depth_multiplier=0.1, finegrained_output=False, image_size=32),
}

# DINO without local crops: EfficientNet's stride-2 convolutions need inputs of at least 32 px.
RECIPE = """
method: dino
output_dir: {output_dir}
dataset_name: {dataset}
image_size: 32
image_mean: [0.5, 0.5, 0.5]
image_std: [0.5, 0.5, 0.5]
dataloader_num_workers: 0
{backbone}
model:
  head_config: {{hidden_dim: 16, bottleneck_dim: 8, out_dim: 32}}
augmentation: {{global_crop_size: 32, num_local_crops: 0}}
per_device_train_batch_size: 8
max_steps: 2
learning_rate: 0.001
warmup_epochs: 0.2
logging_steps: 1
do_eval: false
seed: 7
"""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, which only stall when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_recipe(tmp_path, dataset, backbone: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(output_dir=tmp_path / "run", dataset=dataset, backbone=backbone))
    return path


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, **TINY_BACKBONES[model_type])


def test_every_family_is_tested():
    assert TINY_BACKBONES.keys() == BACKBONE_FAMILIES.keys()


@pytest.mark.parametrize("model_type", TINY_BACKBONES)
def test_training_from_a_checkpoint_exports_an_encoder_with_the_same_features(model_type, tmp_path, tiny_dataset,
                                                                              monkeypatch):
    # The run's plots (tested in test_train.py) would take most of the time here.
    monkeypatch.setattr("hf_ssl.plots.plot_training_curves", lambda *args, **kwargs: None)
    monkeypatch.setattr("hf_ssl.plots.plot_run", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    checkpoint = AutoModel.from_config(tiny_config(model_type))  # ViT/DeiT: with a pooler, as the Hub has them
    checkpoint.save_pretrained(tmp_path / "start")
    start = checkpoint.state_dict()
    recipe = write_recipe(tmp_path, tiny_dataset, f"backbone_name_or_path: {tmp_path / 'start'}")
    train(load_recipe(recipe))

    trained = AutoModel.from_pretrained(tmp_path / "run" / "pretraining").eval()
    exported = AutoModel.from_pretrained(tmp_path / "run" / "encoder").eval()
    assert type(exported).__module__.startswith("transformers.models.")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pooled_features(trained.get_encoder(), pixels)
        torch.testing.assert_close(pooled_features(exported, pixels), expected, atol=1e-5, rtol=0)
        # ... also through a plain forward at the training size (what the card's snippet and the pipeline call),
        # although the transformers checkpoints above were made for 64 px
        plain = exported(pixel_values=pixels)
        feature = plain.last_hidden_state[:, 0] if backbone_family(model_type).cls_token else plain.pooler_output
        torch.testing.assert_close(feature.flatten(1), expected, atol=1e-5, rtol=0)
    # The card names that feature.
    card = (tmp_path / "run" / "encoder" / "README.md").read_text()
    cls_token = backbone_family(model_type).cls_token
    assert ("last_hidden_state[:, 0]" in card) == cls_token and ("pooler_output.flatten(1)" in card) != cls_token
    # Two small steps from the checkpoint: every weight near its start (a random init is far), and some moved.
    for backbone in (trained.student_backbone, trained.teacher_backbone):
        shifts = [(p - start[name]).abs().max().item() for name, p in backbone.named_parameters()]
        assert len(shifts) > 0 and max(shifts) < 0.01 and max(shifts) > 0


@pytest.mark.parametrize("model_type", TINY_BACKBONES)
def test_backbone_config_trains_every_parameter_of_the_pooled_feature(model_type, tmp_path, tiny_dataset):
    backbone = "backbone_config: " + json.dumps({"model_type": model_type, **TINY_BACKBONES[model_type]})
    model = build_model(load_recipe(write_recipe(tmp_path, tiny_dataset, backbone))).train()
    student = model.student_backbone
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    features = pooled_features(student, pixels)
    assert features.shape == (4, feature_dim(student)) == (4, model.config.head_config.in_dim)
    model(global_crops=torch.cat([pixels, pixels.flip(-1)])).loss.backward()
    # Under DDP a trainable parameter without a gradient stalls the reduction (DINOv2's mask token is frozen).
    assert [name for name, p in student.named_parameters() if p.requires_grad and p.grad is None] == []


def test_a_reloaded_method_model_keeps_unused_backbone_parameters_frozen(tmp_path, tiny_dataset):
    # transformers' from_pretrained makes every parameter trainable again; DINOv2's mask token must stay frozen.
    backbone = "backbone_config: " + json.dumps({"model_type": "dinov2", **TINY_BACKBONES["dinov2"]})
    build_model(load_recipe(write_recipe(tmp_path, tiny_dataset, backbone))).save_pretrained(tmp_path / "dino")
    model = AutoModel.from_pretrained(tmp_path / "dino")
    assert not model.student_backbone.embeddings.mask_token.requires_grad
    assert model.student_backbone.embeddings.cls_token.requires_grad


@pytest.mark.parametrize("model_type", TINY_BACKBONES)
def test_pooled_feature_of_each_family_at_another_input_size(model_type):
    backbone = build_backbone(tiny_config(model_type)).eval()
    family = backbone_family(model_type)
    takes_interpolate = "interpolate_pos_encoding" in inspect.signature(type(backbone).forward).parameters
    assert family.interpolates_positions == takes_interpolate
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outputs = backbone(pixel_values=pixels, **({"interpolate_pos_encoding": True} if takes_interpolate else {}))
        hidden = outputs.last_hidden_state
        if family.cls_token:  # after the final LayerNorm
            expected = hidden[:, 0]
        elif model_type == "swin":
            expected = hidden.mean(1)
        elif model_type == "beit":  # use_mean_pooling: LayerNorm of the mean patch token
            expected = backbone.pooler.layernorm(hidden[:, 1:].mean(1))
        elif model_type in ("convnext", "convnextv2"):
            expected = backbone.layernorm(hidden.mean((2, 3)))
        else:  # global average pooling
            expected = hidden.mean((2, 3))
        torch.testing.assert_close(pooled_features(backbone, pixels), expected, atol=1e-5, rtol=1e-5)


def test_unsupported_families_are_refused_in_one_line(tmp_path, tiny_dataset, capsys):
    for backbone in ("backbone_config: {model_type: bert, hidden_size: 16}",  # a text model
                     "backbone_config: {model_type: segformer}",  # a vision model without pooled feature
                     "backbone_config: {model_type: no_such_model}"):
        with pytest.raises(RecipeError, match="supported families: ResNet .*, MobileNetV2") as err:
            build_model(load_recipe(write_recipe(tmp_path, tiny_dataset, backbone)))
        assert "\n" not in str(err.value) and "cannot use a" in str(err.value)

    AutoModel.from_config(AutoConfig.for_model("bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    recipe = write_recipe(tmp_path, tiny_dataset, f"backbone_name_or_path: {tmp_path / 'bert'}")
    capsys.readouterr()
    assert cli.main(["train", str(recipe)]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [line for line in errors if line.startswith("hf-ssl train: error: backbone_name_or_path: ")]
    assert len(errors) == 1 and "cannot use a 'bert' model as backbone" in errors[0]


def test_a_checkpoint_without_the_backbone_weights_is_refused(tmp_path, tiny_dataset):
    # A ViT config over another model's weights (a composite model's folder): transformers would load a random ViT.
    AutoModel.from_config(tiny_config("vit")).save_pretrained(tmp_path / "start")
    weights = load_file(tmp_path / "start" / "model.safetensors")
    save_file({f"student_backbone.{k}": v for k, v in weights.items()}, tmp_path / "start" / "model.safetensors",
              metadata={"format": "pt"})
    recipe = write_recipe(tmp_path, tiny_dataset, f"backbone_name_or_path: {tmp_path / 'start'}")
    with pytest.raises(RecipeError, match="is not a ViT backbone checkpoint: it has no weights for"):
        build_model(load_recipe(recipe))


def test_a_beit_pretrained_by_masked_image_modeling_starts_its_pooler_norm_at_its_default(tmp_path, caplog):
    BeitForMaskedImageModeling(tiny_config("beit")).save_pretrained(tmp_path / "mim")  # no pooler LayerNorm
    backbone = load_backbone(str(tmp_path / "mim"))
    assert "no pooler weights; pooler.layernorm.bias, pooler.layernorm.weight start at their default" in caplog.text
    assert torch.equal(backbone.pooler.layernorm.weight, torch.ones(16))
    assert torch.equal(backbone.pooler.layernorm.bias, torch.zeros(16))


def test_eval_and_features_refuse_an_encoder_of_an_unsupported_family_in_one_line(tmp_path, tiny_dataset, capsys):
    from transformers import AutoImageProcessor, ViTImageProcessor

    encoder = tmp_path / "segformer"
    AutoModel.from_config(AutoConfig.for_model("segformer", hidden_sizes=[8, 8, 8, 8], num_attention_heads=[1, 1, 1, 1],
                                               depths=[1, 1, 1, 1], decoder_hidden_size=8)).save_pretrained(encoder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(encoder)
    assert AutoImageProcessor.from_pretrained(encoder) is not None
    for command in (["eval", "knn", "--model", str(encoder), "--dataset", str(tiny_dataset)],
                    ["features", "--model", str(encoder), "--dataset", str(tiny_dataset), "--output",
                     str(tmp_path / "f.npy")]):
        capsys.readouterr()
        assert cli.main(command) == 2
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr and "cannot use a 'segformer' model as backbone" in stderr, stderr
