"""DisCo: loss of its parts, a frozen teacher outside the student (no gradient, no optimizer, not saved), refusals of
unusable teachers, reload by name, CLI smoke."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from hf_ssl.recipe import RecipeError, load_recipe
from hf_ssl.train import build_model, build_optimizer, train
from modeling import DinoConfig, DinoForPreTraining, DiscoConfig, DiscoForPreTraining, MocoConfig, MocoForPreTraining
from modeling.backbones import backbone_config_from_preset, build_backbone, pooled_features
from modeling.disco import TeacherError
from modeling.heads import DinoHeadConfig
from modeling.losses import info_nce_loss, normalized_mse_loss

from .test_moco import MOCO_RECIPE, reference_info_nce
from .test_train import run_cli

STUDENT = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}
TEACHER = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 1],
           "layer_type": "basic"}


@pytest.fixture
def teacher_dir(tiny_teacher) -> Path:
    return tiny_teacher


def tiny_disco(teacher, out_dim=8, **kwargs) -> DiscoForPreTraining:
    torch.manual_seed(0)
    config = DiscoConfig(backbone_config=STUDENT, projector_config={"in_dim": 16, "out_dim": out_dim},
                         queue_size=12, teacher_name_or_path=str(teacher), **kwargs)
    return DiscoForPreTraining(config)


def test_student_is_moco_v2_with_a_wide_projector_and_the_teacher_loaded_frozen(teacher_dir):
    model = tiny_disco(teacher_dir)
    assert model.config.version == 2 and model.config.projector_config.hidden_dim == 2048
    assert isinstance(model.teacher, MocoForPreTraining) and not model.teacher.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert model.config.teacher_sha256 and len(model.config.teacher_sha256) == 64
    student_ids = {id(p) for p in model.parameters()}
    assert not student_ids & {id(p) for p in model.teacher.parameters()}
    assert not any(key.startswith("teacher") or "_teacher" in key for key in model.state_dict())
    model.train()
    assert not model.teacher.training  # train() of the student leaves the teacher in eval mode


def test_forward_is_info_nce_plus_both_distillation_terms(teacher_dir):
    model = tiny_disco(teacher_dir, query_distillation_weight=2.0, key_distillation_weight=0.5).train()
    for module in model.children():
        module.eval()
    g = torch.Generator().manual_seed(2)
    view_1, view_2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        q, q_of_k = model.embed(view_1), model.embed(view_2)
        k = model.key_projector(model.key_backbone(pixel_values=view_2).pooler_output.flatten(1))
        t_q, t_k = model.teacher.embed(view_1), model.teacher.embed(view_2)
    contrastive = reference_info_nce(q, k, model.queue, 0.2)
    # MSE of L2-normalised embeddings, written out: mean over batch and dimensions
    mse = lambda a, b: float(((torch.nn.functional.normalize(a.double(), dim=1)  # noqa: E731
                               - torch.nn.functional.normalize(b.double(), dim=1)) ** 2).mean())
    out = model(view_1=view_1, view_2=view_2)
    assert out.contrastive_loss.item() == pytest.approx(contrastive, rel=1e-5)
    assert out.query_distillation_loss.item() == pytest.approx(mse(q, t_q), rel=1e-5)
    assert out.key_distillation_loss.item() == pytest.approx(mse(q_of_k, t_k), rel=1e-5)
    assert out.loss.item() == pytest.approx(contrastive + 2.0 * mse(q, t_q) + 0.5 * mse(q_of_k, t_k), rel=1e-5)
    assert out.query_distillation_loss.item() > 0


def test_teacher_gets_no_gradient_is_not_optimised_and_does_not_change(teacher_dir, tmp_path, tiny_dataset):
    recipe = load_recipe(None, {"method": "disco", "output_dir": str(tmp_path), "backbone_config": STUDENT,
                                "model": {"teacher_name_or_path": str(teacher_dir), "queue_size": 12,
                                          "projector_config": {"out_dim": 8}},
                                "optimizer": "sgd", "learning_rate": 0.5})
    model = build_model(recipe).train()
    optimizer = build_optimizer(model, recipe)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised and not optimised & {id(p) for p in model.teacher.parameters()}
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = model.query_backbone.embedder.embedder.convolution.weight.clone()
    for _ in range(3):
        out = model(view_1=torch.randn(4, 3, 32, 32), view_2=torch.randn(4, 3, 32, 32))
        out.loss.backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        optimizer.step()
        optimizer.zero_grad()
        model.post_optimizer_step(momentum=0.9)
    after = model.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in after)  # BN running statistics included
    assert not torch.equal(student_before, model.query_backbone.embedder.embedder.convolution.weight)
    assert int(model.queue_ptr) == 0 and model.config.queue_size == 12  # 3 x 4 keys wrapped around a queue of 12


def test_saved_student_has_no_teacher_weights_and_reloads_the_teacher_by_name(teacher_dir, tmp_path):
    model = tiny_disco(teacher_dir)
    model.save_pretrained(tmp_path / "student")
    saved = load_file(tmp_path / "student" / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    assert not any("teacher" in key for key in saved)
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["teacher_name_or_path"] == str(teacher_dir) and config["teacher_sha256"] == model.config.teacher_sha256
    loaded = AutoModel.from_pretrained(tmp_path / "student")
    assert isinstance(loaded, DiscoForPreTraining)
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.state_dict().values(),
                                                 loaded.teacher.state_dict().values()))
    assert all(torch.equal(model.state_dict()[k], loaded.state_dict()[k]) for k in saved)


def test_a_changed_teacher_is_refused_on_reload(teacher_dir, tmp_path):
    import shutil

    teacher_copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher_copy)
    tiny_disco(teacher_copy).save_pretrained(tmp_path / "student")
    other = MocoForPreTraining.from_pretrained(teacher_copy)
    with torch.no_grad():
        other.query_projector.mlp[0].weight.add_(1.0)
    other.save_pretrained(teacher_copy)
    with pytest.raises(TeacherError, match="changed since this student was trained"):
        AutoModel.from_pretrained(tmp_path / "student")


def test_an_output_dir_as_teacher_finds_its_pretraining_folder(teacher_dir):
    model = tiny_disco(teacher_dir.parent)
    assert model.config.teacher_subfolder == "pretraining"


def test_unusable_teachers_are_refused_with_a_clear_message(teacher_dir, tmp_path):
    with pytest.raises(TeacherError, match=r"embedding sizes differ.*gives 8-d.*16-d.*projector_config.out_dim"):
        tiny_disco(teacher_dir, out_dim=16)
    with pytest.raises(TeacherError, match="not found: no such local directory"):
        tiny_disco(tmp_path / "missing")
    encoder = tmp_path / "encoder"
    build_backbone(MocoConfig(backbone_config=TEACHER).backbone_config).save_pretrained(encoder)
    with pytest.raises(TeacherError, match="'resnet' model, not an hf-ssl pretraining model"):
        tiny_disco(encoder)
    dino = tmp_path / "dino"
    DinoForPreTraining(DinoConfig(backbone_config=TEACHER, head_config=DinoHeadConfig(
        in_dim=32, hidden_dim=16, bottleneck_dim=8, out_dim=16))).save_pretrained(dino)
    with pytest.raises(TeacherError, match="'hf_ssl_dino' model without a projection embedding"):
        tiny_disco(dino)
    with pytest.raises(TeacherError, match="DisCo needs a teacher"):
        DiscoForPreTraining(DiscoConfig(backbone_config=STUDENT, projector_config={"in_dim": 16}))
    with pytest.raises(ValueError, match="version must be 2"):
        DiscoConfig(version=3)


DISCO_RECIPE = MOCO_RECIPE.replace("method: moco", "method: disco").replace(
    "  queue_size: 20\n", "  queue_size: 20\n  teacher_name_or_path: {teacher}\n")


def test_cli_refuses_a_bad_teacher_in_one_line(tmp_path, tiny_dataset, teacher_dir):
    path = tmp_path / "disco.yaml"
    path.write_text(DISCO_RECIPE.format(output_dir=tmp_path / "run", dataset=tiny_dataset, teacher=teacher_dir))
    result = run_cli("train", path, "--model.projector_config.out_dim", "16", "--max_steps", "1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "embedding sizes differ" in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # (after transformers' "Loading weights" bar of the teacher)
    assert last.startswith("hf-ssl train: error: model (disco): embedding sizes differ")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training started


def test_cli_disco_run_writes_the_contract_without_the_teacher(tmp_path, tiny_dataset, teacher_dir):
    path = tmp_path / "disco.yaml"
    path.write_text(DISCO_RECIPE.format(output_dir=tmp_path / "run", dataset=tiny_dataset, teacher=teacher_dir))
    result = run_cli("train", path, "--max_steps", "3", "--checkpointing_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert all({"contrastive_loss", "query_distillation_loss", "key_distillation_loss"} <= r.keys()
               for r in train_records)
    assert any("eval/knn_top1" in r for r in records)
    for weights in (run / "pretraining" / "model.safetensors", run / "checkpoints" / "step_2" / "model.safetensors"):
        assert not any("teacher" in key for key in load_file(weights)), weights
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (run / "encoder" / name).is_file(), name
    encoder = AutoModel.from_pretrained(run / "encoder").eval()
    assert type(encoder).__module__.startswith("transformers.models.resnet")
    student = AutoModel.from_pretrained(run / "pretraining").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values=x).pooler_output,
                                   student.get_encoder()(pixel_values=x).pooler_output)
    assert encoder.config.hidden_sizes == [8, 16]  # the student, not the teacher ([16, 32])
    card = (run / "encoder" / "README.md").read_text()
    assert "distilled from (teacher)" in card and student.config.teacher_sha256 in card
    assert "MobileNetV3-Large" in card
    with pytest.raises(RecipeError, match="not found"):
        build_model(load_recipe(path, ["--model.teacher_name_or_path", str(tmp_path / "nothing")]))


@pytest.mark.parametrize("preset, parameters_millions, feature_dim", [
    ("efficientnet-b0", 4.0, 1280), ("mobilenet-v2", 2.2, 1280), ("resnet-18", 11.2, 512)])
def test_student_presets_have_the_papers_sizes(preset, parameters_millions, feature_dim):
    # transformers' EfficientNetConfig() is B7 (64 M parameters, 2560-d): the preset must set B0's coefficients.
    backbone = build_backbone(backbone_config_from_preset(preset)).eval()
    assert sum(p.numel() for p in backbone.parameters()) / 1e6 == pytest.approx(parameters_millions, abs=0.1)
    with torch.no_grad():
        assert pooled_features(backbone, torch.zeros(1, 3, 32, 32)).shape == (1, feature_dim)
