"""The training loop end to end: CLI smoke with the output-directory contract, exact resume, export."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ssl.recipe import load_recipe
from hf_ssl.train import train

from .conftest import REPO_ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_ssl", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_cli_train_writes_the_output_directory_contract(tiny_recipe, tmp_path):
    result = run_cli("train", tiny_recipe, "--max_steps", "4", "--checkpointing_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert load_recipe(run / "config.yaml").max_steps == 4  # the resolved recipe, overrides applied
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for r in train_records:
        assert {"epoch", "lr", "weight_decay", "ema_momentum", "teacher_temperature", "embedding_std"} <= r.keys()
        assert torch.isfinite(torch.tensor(r["loss"]))
    knn = [r for r in records if "eval/knn_top1" in r]
    assert len(knn) == 1 and 0 <= knn[0]["eval/knn_top1"] <= 100
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"step_{step}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    assert not list((run / "checkpoints").glob(".tmp*"))
    assert (run / "pretraining" / "model.safetensors").is_file()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json"):
        assert (run / "encoder" / name).is_file(), name
    assert not list(run.rglob("*.bin")) or all(p.name == "optimizer.bin" for p in run.rglob("*.bin"))
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    card = (run / "encoder" / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "library_name: transformers" in card
    assert f"{knn[0]['eval/knn_top1']}" in card


def assert_resume_parity(recipe_path: Path, tmp_path: Path) -> tuple[Path, Path]:
    """6 steps == 3 steps + resume from the step-3 checkpoint + 3 steps: bitwise losses and final weights.
    Returns (uninterrupted run dir, resumed run dir)."""
    full = load_recipe(recipe_path, ["--max_steps", "6", "--checkpointing_steps", "3", "--do_eval", "false"])
    train(full)
    uninterrupted = losses(Path(full.output_dir))
    # A second run that stopped after step 3: its directory holds only that checkpoint; it resumes from it.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(Path(full.output_dir) / "checkpoints" / "step_3", resumed_dir / "checkpoints" / "step_3")
    resumed = load_recipe(recipe_path, ["--max_steps", "6", "--checkpointing_steps", "3", "--do_eval", "false",
                                        "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "latest"])
    train(resumed)
    after = losses(resumed_dir)
    assert sorted(after) == [4, 5, 6]
    for step in (4, 5, 6):
        assert after[step] == uninterrupted[step], (step, after[step], uninterrupted[step])
    from safetensors.torch import load_file

    a = load_file(Path(full.output_dir) / "pretraining" / "model.safetensors")
    b = load_file(resumed_dir / "pretraining" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return Path(full.output_dir), resumed_dir


def test_resume_gives_the_same_loss_curve(tiny_recipe, tmp_path):
    assert_resume_parity(tiny_recipe, tmp_path)


def test_channels_last_changes_only_the_memory_layout(tiny_recipe, tmp_path):
    """`channels_last: true` trains the same model (float64: the losses agree to rounding), saves weights that reload
    as ordinary tensors equal to the default run's to rounding, and resumes exactly."""
    runs = {}
    for layout in ("false", "true"):
        recipe = load_recipe(tiny_recipe, ["--max_steps", "3", "--do_eval", "false", "--dtype", "float64",
                                           "--channels_last", layout, "--output_dir", str(tmp_path / layout)])
        train(recipe)
        runs[layout] = losses(tmp_path / layout)
    assert sorted(runs["true"]) == sorted(runs["false"]) == [1, 2, 3]
    for step, loss in runs["false"].items():
        assert runs["true"][step] == pytest.approx(loss, rel=1e-10), step
    from transformers import AutoModel

    default, nhwc = (AutoModel.from_pretrained(tmp_path / layout / "encoder") for layout in ("false", "true"))
    expected = default.state_dict()
    for name, weight in nhwc.state_dict().items():
        assert torch.allclose(weight, expected[name], rtol=1e-9, atol=1e-12), name

    with_layout = tmp_path / "recipe_channels_last.yaml"
    with_layout.write_text(tiny_recipe.read_text() + "channels_last: true\n")
    assert_resume_parity(with_layout, tmp_path / "resume")


def test_dino_starts_student_and_teacher_from_a_pretrained_backbone(tiny_recipe, tmp_path):
    from transformers import ResNetConfig, ResNetModel

    from hf_ssl.train import build_model

    torch.manual_seed(5)
    pretrained = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    pretrained.save_pretrained(tmp_path / "pretrained")
    model = build_model(load_recipe(tiny_recipe, ["--backbone_config", "null", "--backbone_name_or_path",
                                                   str(tmp_path / "pretrained")]))
    expected = pretrained.state_dict()
    for backbone in (model.student_backbone, model.teacher_backbone):
        loaded = backbone.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_resume_without_checkpoint_is_a_clear_error(tiny_recipe):
    result = run_cli("train", tiny_recipe, "--max_steps", "2", "--resume_from_checkpoint", "latest")
    assert result.returncode == 2
    assert "no checkpoint under" in result.stderr and "Traceback" not in result.stderr


def test_cli_refuses_unknown_recipe_key_without_traceback(tiny_recipe):
    result = run_cli("train", tiny_recipe, "--per_device_batch_size", "4")
    assert result.returncode == 2
    assert "did you mean 'per_device_train_batch_size'" in result.stderr and "Traceback" not in result.stderr


def test_cli_methods_lists_dino_and_its_recipes():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    assert "dino" in result.stdout and "recipes/dino/fashion-mnist-resnet-tiny.yaml" in result.stdout


def test_cli_methods_lists_every_registered_method_with_all_its_recipes(capsys):
    from hf_ssl.cli import main as cli_main
    from modeling import METHODS

    assert cli_main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        recipes = sorted((REPO_ROOT / "recipes" / name).glob("*.yaml"))
        assert recipes, f"no recipes/{name}/*.yaml"
        for recipe in recipes:
            assert str(recipe.relative_to(REPO_ROOT)) in out, (name, recipe)


LOAD_WITHOUT_HF_SSL = r"""
import sys, json, numpy as np
from PIL import Image
from transformers import AutoModel, pipeline
encoder_dir, images = sys.argv[1], sys.argv[2:]
extractor = pipeline("image-feature-extraction", model=encoder_dir)
features = [np.asarray(extractor(Image.open(p), pool=True)).reshape(-1).tolist() for p in images]
assert "hf_ssl" not in sys.modules and "modeling" not in sys.modules
print(json.dumps(features))
"""


def test_exported_encoder_loads_by_path_in_a_process_without_hf_ssl(tiny_recipe, tiny_dataset, tmp_path):
    recipe = load_recipe(tiny_recipe, ["--max_steps", "2", "--do_eval", "false"])
    train(recipe)
    run = Path(recipe.output_dir)
    # the training-time feature: the pretraining model's encoder on images decoded as in training
    import datasets

    from hf_ssl.data import ImageDecoder
    from modeling.backbones import pooled_features
    from transformers import AutoModel

    rows = [dict(r) for r in datasets.load_from_disk(str(tiny_dataset))["test"].select(range(4))]
    paths = []
    for i, row in enumerate(rows):
        paths.append(tmp_path / f"img{i}.png")
        row["image"].convert("RGB").resize((32, 32)).save(paths[-1])
    pixels = ImageDecoder("image", size=32)([{"image": {"path": str(p), "bytes": None}} for p in paths])["pixel_values"]
    model = AutoModel.from_pretrained(run / "pretraining").eval()
    with torch.no_grad():
        expected = pooled_features(model.get_encoder(), (pixels.float() / 255 - 0.5) / 0.5)

    clean_env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HF_SSL, str(run / "encoder"), *map(str, paths)],
                            capture_output=True, text=True, env=clean_env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_export_from_a_checkpoint(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe, ["--max_steps", "2", "--checkpointing_steps", "1", "--do_eval", "false"])
    train(recipe)
    run = Path(recipe.output_dir)
    result = run_cli("export", run / "checkpoints" / "step_1", "--output_dir", tmp_path / "exported")
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "exported" / "model.safetensors")
    checkpoint = load_file(run / "checkpoints" / "step_1" / "model.safetensors")
    teacher = {k.removeprefix("teacher_backbone."): v for k, v in checkpoint.items() if k.startswith("teacher_backbone.")}
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher)
    final = load_file(run / "encoder" / "model.safetensors")
    assert any(not torch.equal(final[k], exported[k]) for k in final)  # step 1 is not the final encoder


def test_export_of_a_wrong_directory_is_a_clear_error(tmp_path):
    result = run_cli("export", tmp_path, "--output_dir", tmp_path / "out")
    assert result.returncode == 2
    assert "neither a training OUTPUT_DIR" in result.stderr and "Traceback" not in result.stderr


def test_ema_runs_only_after_real_optimizer_steps(tiny_recipe, monkeypatch):
    from modeling import DinoForPreTraining

    calls = []
    original = DinoForPreTraining.post_optimizer_step

    def counting(self, momentum):
        calls.append(momentum)
        return original(self, momentum)

    monkeypatch.setattr(DinoForPreTraining, "post_optimizer_step", counting)
    recipe = load_recipe(tiny_recipe, ["--max_steps", "2", "--gradient_accumulation_steps", "2",
                                       "--do_eval", "false"])
    train(recipe)
    assert len(calls) == 2  # 4 micro-batches, 2 optimizer steps
    assert [r for r in losses(Path(recipe.output_dir))] == [1, 2]
