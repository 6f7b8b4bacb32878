"""DINO: golden loss, model wiring, EMA/center state, save/load and AutoModel registration."""
import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

import modeling
from modeling import DinoConfig, DinoForPreTraining
from modeling.backbones import pooled_features
from modeling.heads import DinoHeadConfig
from modeling.losses import dino_loss, ema_update, koleo_loss
from modeling.pretraining import TrainingProgress


def tiny_dino(out_dim=16, **kwargs) -> DinoForPreTraining:
    backbone = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                "layer_type": "basic"}
    head = DinoHeadConfig(in_dim=16, hidden_dim=32, bottleneck_dim=8, out_dim=out_dim)
    torch.manual_seed(0)
    return DinoForPreTraining(DinoConfig(backbone_config=backbone, head_config=head, **kwargs))


def reference_dino_loss(student, teacher, center, tau_s, tau_t):
    """Written from METHODS.md in float64 numpy, one sample at a time."""
    student = [s.detach().double().numpy() for s in student]
    teacher = [t.detach().double().numpy() for t in teacher]
    center = center.detach().double().numpy()[0]
    pair_losses = []
    for iq, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            per_sample = []
            for b in range(t.shape[0]):
                z = (t[b] - center) / tau_t
                q = np.exp(z - z.max())
                q /= q.sum()
                y = s[b] / tau_s
                log_p = y - (y.max() + np.log(np.exp(y - y.max()).sum()))
                per_sample.append(-(q * log_p).sum())
            pair_losses.append(np.mean(per_sample))
    return float(np.mean(pair_losses))


def test_dino_loss_by_hand():
    # teacher softmax (tau_t = 1) is [1/4, 3/4]; student softmax (tau_s = 1) is uniform -> loss = ln 2.
    teacher = [torch.tensor([[0.0, math.log(3.0)]])]
    student = [torch.tensor([[9.0, 9.0]]), torch.tensor([[1.0, 1.0]])]  # crop 0 is skipped (same as teacher's)
    loss = dino_loss(student, teacher, torch.zeros(1, 2), 1.0, 1.0)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_dino_loss_matches_independent_computation():
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(5, 7, generator=g) * 3 for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(5, 7, generator=g) * 3 for _ in range(2)]
    center = torch.randn(1, 7, generator=g)
    loss = dino_loss(student, teacher, center, 0.1, 0.04)
    assert loss.item() == pytest.approx(reference_dino_loss(student, teacher, center, 0.1, 0.04), rel=1e-5)


def test_model_forward_is_the_dino_loss_of_its_parts():
    model = tiny_dino().train()
    g = torch.Generator().manual_seed(2)
    global_crops, local_crops = torch.randn(2 * 3, 3, 32, 32, generator=g), torch.randn(4 * 3, 3, 16, 16, generator=g)
    model.center.copy_(torch.randn(1, 16, generator=g))
    center_before = model.center.clone()
    # Sub-modules in eval mode (BatchNorm with running statistics) so that the parts computed below are exactly
    # what the forward computes; the model itself stays in training mode, so the forward updates the center.
    for module in (model.student_backbone, model.teacher_backbone, model.student_head, model.teacher_head):
        module.eval()
    with torch.no_grad():
        s_global = model.student_head(pooled_features(model.student_backbone, global_crops))
        s_local = model.student_head(pooled_features(model.student_backbone, local_crops))
        t_global = model.teacher_head(pooled_features(model.teacher_backbone, global_crops))
    student = list(s_global.split(3)) + list(s_local.split(3))
    expected = reference_dino_loss(student, list(t_global.split(3)), center_before, 0.1, 0.05)
    out = model(global_crops=global_crops, local_crops=local_crops, teacher_temperature=0.05)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # the center moved towards the teacher batch mean with momentum 0.9
    torch.testing.assert_close(model.center, 0.9 * center_before + 0.1 * t_global.mean(0, keepdim=True))
    assert 0 < out.teacher_entropy.item() <= math.log(16) + 1e-5
    assert out.embedding_std.item() > 0


def reference_koleo(x):
    """-mean log(distance to the nearest other point) of the L2-normalised rows, float64 numpy, by loops."""
    x = x.detach().double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    logs = []
    for i in range(len(x)):
        logs.append(np.log(min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i) + 1e-8))
    return -float(np.mean(logs))


def test_koleo_loss_matches_independent_computation_and_spreads_points():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    assert koleo_loss(x).item() == pytest.approx(reference_koleo(x), rel=1e-5)
    # two points at 90 degrees: distance sqrt(2) each
    assert koleo_loss(torch.tensor([[1.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)
    # a gradient step on the loss pushes the closest pair apart
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(x).backward()
    with torch.no_grad():
        moved = torch.nn.functional.normalize(x - 0.1 * x.grad, dim=1)
    assert (moved[0] - moved[1]).norm() > (torch.nn.functional.normalize(x.detach(), dim=1)[:2].diff(dim=0)).norm()
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 4))


def test_model_loss_adds_the_weighted_koleo_of_the_student_global_features():
    model = tiny_dino(koleo_weight=0.3).train()
    for module in (model.student_backbone, model.teacher_backbone, model.student_head, model.teacher_head):
        module.eval()
    g = torch.Generator().manual_seed(4)
    global_crops, local_crops = torch.randn(2 * 5, 3, 32, 32, generator=g), torch.randn(2 * 5, 3, 16, 16, generator=g)
    with torch.no_grad():
        s_global = pooled_features(model.student_backbone, global_crops)
    expected_koleo = (reference_koleo(s_global[:5]) + reference_koleo(s_global[5:])) / 2
    out = model(global_crops=global_crops, local_crops=local_crops, teacher_temperature=0.04)
    assert out.koleo.item() == pytest.approx(expected_koleo, rel=1e-5)
    assert out.loss.item() == pytest.approx(out.dino_loss.item() + 0.3 * expected_koleo, rel=1e-5)
    assert tiny_dino().config.koleo_weight == 0.0  # off by default: the original DINO
    with pytest.raises(ValueError, match="koleo_weight"):
        DinoConfig(koleo_weight=-1.0)


def test_teacher_starts_as_student_gets_no_gradient_and_follows_by_ema():
    model = tiny_dino().train()
    for (n_s, p_s), (n_t, p_t) in zip(model.student_backbone.named_parameters(),
                                      model.teacher_backbone.named_parameters()):
        assert n_s == n_t and torch.equal(p_s, p_t)
    out = model(global_crops=torch.randn(4, 3, 32, 32), local_crops=None, teacher_temperature=0.04)
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher_backbone.parameters())
    assert all(p.grad is None for p in model.teacher_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student_backbone.parameters())
    with torch.no_grad():
        for p in model.student_backbone.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in model.teacher_backbone.parameters()]
    model.post_optimizer_step(momentum=0.75)
    for t_before, t, s in zip(teacher_before, model.teacher_backbone.parameters(),
                              model.student_backbone.parameters()):
        torch.testing.assert_close(t, 0.75 * t_before + 0.25 * s)


def test_ema_update_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="matching"):
        ema_update([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], 0.9)


def test_last_layer_frozen_in_first_epochs_only():
    model = tiny_dino(freeze_last_layer_epochs=1).train()
    model(global_crops=torch.randn(4, 3, 32, 32), teacher_temperature=0.04).loss.backward()
    weight_v = model.student_head.last_layer.parametrizations.weight.original1
    assert weight_v.grad is not None
    model.before_optimizer_step(TrainingProgress(step=10, total_steps=20, steps_per_epoch=10))  # epoch 1
    assert weight_v.grad is not None
    model.before_optimizer_step(TrainingProgress(step=9, total_steps=20, steps_per_epoch=10))  # epoch 0
    assert weight_v.grad is None
    # norm_last_layer: prototype norms are fixed at 1 and never trained
    assert not model.student_head.last_layer.parametrizations.weight.original0.requires_grad


def test_save_load_round_trip_through_automodel(tmp_path):
    model = tiny_dino()
    model.center.copy_(torch.arange(16.0).view(1, 16))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DinoConfig) and config.head_config.out_dim == 16
    assert config.backbone_config.hidden_sizes == [8, 16]
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, DinoForPreTraining)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # frozen parts stay frozen after loading
    assert not any(p.requires_grad for p in loaded.teacher_backbone.parameters())
    assert not loaded.student_head.last_layer.parametrizations.weight.original0.requires_grad
    assert all(p.requires_grad for p in loaded.student_backbone.parameters())


def test_registry_lists_dino():
    assert modeling.METHODS["dino"].model_class is DinoForPreTraining
    assert modeling.METHODS["dino"].views == "multicrop"


def test_vit_backbone_uses_cls_token_and_takes_small_local_crops():
    backbone = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "patch_size": 8, "image_size": 32}
    head = DinoHeadConfig(in_dim=32, hidden_dim=32, bottleneck_dim=8, out_dim=16)
    model = DinoForPreTraining(DinoConfig(backbone_config=backbone, head_config=head)).train()
    out = model(global_crops=torch.randn(4, 3, 32, 32), local_crops=torch.randn(6, 3, 16, 16),
                teacher_temperature=0.04)
    assert torch.isfinite(out.loss)
    x = torch.randn(2, 3, 32, 32)
    encoder = model.get_encoder().eval()
    torch.testing.assert_close(pooled_features(encoder, x), encoder(pixel_values=x).last_hidden_state[:, 0])
