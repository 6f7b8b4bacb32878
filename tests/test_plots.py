"""Attention maps of ViT encoders (`hf-ssl plot OUTPUT_DIR --attention IMAGE...`)."""
from pathlib import Path

import pytest
import torch

from hf_ssl import cli
from hf_ssl.hub import export_encoder
from hf_ssl.plots import attention_figure, cls_attention
from hf_ssl.recipe import load_recipe, save_recipe
from hf_ssl.train import build_model
from tests.conftest import TINY_RECIPE

TINY_VIT = ('{"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, '
            '"intermediate_size": 32, "image_size": 32, "patch_size": 8}')


def exported_run(root: Path, dataset: Path, *overrides: str) -> Path:
    """An OUTPUT_DIR with config.yaml, pretraining/ and encoder/ of the tiny recipe's (untrained) DINO model."""
    root.mkdir(parents=True, exist_ok=True)
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(TINY_RECIPE.format(output_dir=root / "run", dataset=dataset))
    recipe = load_recipe(recipe_path, list(overrides))
    run = Path(recipe.output_dir)
    run.mkdir(parents=True)
    save_recipe(recipe, run / "config.yaml")
    torch.manual_seed(0)
    build_model(recipe).save_pretrained(run / "pretraining", safe_serialization=True)
    export_encoder(run, run / "encoder")
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory, tiny_dataset) -> list[Path]:
    import datasets

    directory = tmp_path_factory.mktemp("images")
    rows = datasets.load_from_disk(str(tiny_dataset))["test"].select(range(2))
    paths = [directory / f"img{i}.png" for i in range(2)]
    for row, path in zip(rows, paths):
        row["image"].save(path)
    return paths


def test_cls_attention_of_a_vit_is_a_distribution_over_patches_per_head(tmp_path, tiny_dataset):
    from transformers import AutoModel

    run = exported_run(tmp_path, tiny_dataset, "--backbone_config", TINY_VIT)
    encoder = AutoModel.from_pretrained(run / "encoder", attn_implementation="eager").eval()
    maps = cls_attention(encoder, torch.randn(3, 3, 32, 32))
    assert maps.shape == (3, 4, 4, 4)  # images, heads, 32/8 x 32/8 patches
    assert (maps >= 0).all() and (maps.sum((-2, -1)) < 1).all()  # CLS also attends to itself
    assert not torch.allclose(maps[:, 0], maps[:, 1])  # the heads differ


def test_plot_attention_draws_one_panel_per_head_and_puts_it_in_the_card(tmp_path, tiny_dataset, images, capsys):
    run = exported_run(tmp_path, tiny_dataset, "--backbone_config", TINY_VIT)
    fig = attention_figure(run / "encoder", images)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == len(images) * (1 + 4) and titles[:5] == ["image", "head 1", "head 2", "head 3", "head 4"]

    assert cli.main(["plot", str(run), "--attention", *map(str, images)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "plots" / "attention.png")]
    assert (run / "encoder" / "attention.png").read_bytes() == (run / "plots" / "attention.png").read_bytes()
    assert "![CLS self-attention per head](attention.png)" in (run / "encoder" / "README.md").read_text()


def test_plot_attention_refuses_a_cnn_encoder_and_a_bad_image_in_one_line(tmp_path, tiny_dataset, images, capsys):
    run = exported_run(tmp_path, tiny_dataset)  # the tiny recipe's ResNet
    capsys.readouterr()  # the export's progress bars
    assert cli.main(["plot", str(run), "--attention", str(images[0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "attention maps need a ViT encoder" in err and "is a resnet" in err
    assert not (run / "plots" / "attention.png").exists()
    vit = exported_run(tmp_path / "vit", tiny_dataset, "--backbone_config", TINY_VIT)
    (tmp_path / "not_an_image.png").write_text("text")
    capsys.readouterr()
    assert cli.main(["plot", str(vit), "--attention", str(tmp_path / "not_an_image.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read image" in err
