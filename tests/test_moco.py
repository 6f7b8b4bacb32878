"""MoCo v2 / v3: golden losses, queue (wrap-around, persistence, resume), momentum encoder, views, CLI smoke."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

import modeling
from hf_ssl.augment import build_views
from hf_ssl.recipe import RecipeError, load_recipe
from hf_ssl.train import build_model, train
from modeling import MocoConfig, MocoForPreTraining
from modeling.distributed import all_gather, batch_shuffle, batch_unshuffle
from modeling.losses import in_batch_info_nce_loss, info_nce_loss, koleo_loss, moco_v3_loss, normalized_mse_loss

from .test_train import assert_resume_parity, losses, run_cli

BACKBONE = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
            "layer_type": "basic"}

MOCO_RECIPE = """
method: moco
output_dir: {output_dir}
dataset_name: {dataset}
image_size: 32
image_mean: [0.5, 0.5, 0.5]
image_std: [0.5, 0.5, 0.5]
dataloader_num_workers: 0
backbone_config: {{model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], layer_type: basic}}
model:
  projector_config: {{hidden_dim: 32, out_dim: 8}}
  queue_size: 20
augmentation: {{crop_size: 32, crop_scale: [0.3, 1.0]}}
per_device_train_batch_size: 8
num_train_epochs: 1
optimizer: sgd
learning_rate: 0.05
warmup_epochs: 0
weight_decay: 0.0005
weight_decay_end: 0.0005
max_grad_norm: null
ema_momentum: 0.99
ema_momentum_end: 0.99
logging_steps: 1
eval_batch_size: 16
seed: 7
"""


@pytest.fixture
def moco_recipe(tmp_path, tiny_dataset) -> Path:
    path = tmp_path / "moco.yaml"
    path.write_text(MOCO_RECIPE.format(output_dir=tmp_path / "run", dataset=tiny_dataset))
    return path


def tiny_moco(version=2, queue_size=6, out_dim=8, **kwargs) -> MocoForPreTraining:
    torch.manual_seed(0)
    config = MocoConfig(backbone_config=BACKBONE, projector_config={"in_dim": 16, "hidden_dim": 32, "out_dim": out_dim},
                        predictor_config={"hidden_dim": 32} if version == 3 else None, version=version,
                        queue_size=queue_size if version == 2 else 0, **kwargs)
    return MocoForPreTraining(config)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cross_entropy(logits_row, target):
    m = logits_row.max()
    return -(logits_row[target] - (m + math.log(np.exp(logits_row - m).sum())))


def reference_info_nce(query, key, queue, temperature):
    """MoCo v2 InfoNCE written from the formula in float64 numpy, one sample at a time."""
    q, k, n = _unit(query), _unit(key), np.asarray(queue, dtype=np.float64)
    total = 0.0
    for b in range(q.shape[0]):
        logits = np.concatenate([[q[b] @ k[b]], n @ q[b]]) / temperature
        total += _cross_entropy(logits, 0)
    return total / q.shape[0]


def reference_v3(q1, q2, k1, k2, temperature, offset):
    def ctr(q, k):
        q, k = _unit(q), _unit(k)
        return np.mean([_cross_entropy(k @ q[b] / temperature, b + offset) for b in range(q.shape[0])])
    return 2 * temperature * (ctr(q1, k2) + ctr(q2, k1))


# ------------------------------------------------------------------------------------------------ losses


def test_info_nce_by_hand():
    # q = k -> positive logit 1/T; one negative orthogonal -> logit 0: loss = -log(e^{1/T} / (e^{1/T} + 1)).
    q = torch.tensor([[2.0, 0.0]])  # normalised inside the loss
    loss = info_nce_loss(q, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), temperature=0.5)
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), abs=1e-6)


def test_info_nce_with_queue_matches_independent_computation():
    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(11, 8, generator=g), dim=1)
    loss = info_nce_loss(query, key, queue, 0.2)
    assert loss.item() == pytest.approx(reference_info_nce(query, key, queue, 0.2), rel=1e-5)


def test_symmetric_v3_loss_matches_independent_computation_with_label_offset():
    g = torch.Generator().manual_seed(4)
    q1, q2 = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    # the keys of a 2-process global batch; this process is rank 1: its positives are rows 3..5
    k1, k2 = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    loss = moco_v3_loss(q1, q2, k1, k2, temperature=0.7, label_offset=3)
    assert loss.item() == pytest.approx(reference_v3(q1, q2, k1, k2, 0.7, 3), rel=1e-5)
    one = in_batch_info_nce_loss(q1, k2, 0.7, label_offset=3)
    assert loss.item() != pytest.approx(2 * 0.7 * 2 * one.item())  # both directions count, not one twice


def test_losses_keep_float64_and_compute_half_precision_in_float32():
    """A float64 run (recipe dtype: float64) is float64 through the losses, never rounded to float32 on the way;
    bfloat16/float16 inputs (mixed precision) are upcast to float32."""
    g = torch.Generator().manual_seed(5)
    q1, q2, k1, k2 = torch.randn(4, 6, 6, generator=g, dtype=torch.float64).unbind(0)
    loss = moco_v3_loss(q1[:3], q2[:3], k1, k2, temperature=0.7, label_offset=3)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(reference_v3(q1[:3], q2[:3], k1, k2, 0.7, 3), rel=1e-12, abs=0)
    queue = torch.nn.functional.normalize(k2, dim=1)
    for dtype, expected in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        q, k = q1.to(dtype), k1.to(dtype)
        assert moco_v3_loss(q, q, k, k, 1.0).dtype == expected
        assert info_nce_loss(q, k, queue, 0.2).dtype == expected
        assert normalized_mse_loss(q, k).dtype == expected
        assert koleo_loss(q).dtype == expected


def test_normalized_mse_is_two_minus_two_cos_over_dim():
    a, b = torch.tensor([[3.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert normalized_mse_loss(a, b).item() == pytest.approx((2 - 2 * math.cos(math.pi / 4)) / 4, abs=1e-6)


def test_collectives_are_identity_without_a_process_group():
    x = torch.randn(4, 3)
    assert all_gather(x) is x
    shuffled, index = batch_shuffle(x)
    assert shuffled is x and index is None and batch_unshuffle(x, None) is x


# ------------------------------------------------------------------------------------------------ model


def test_v2_forward_is_the_info_nce_of_its_parts():
    model = tiny_moco().train()
    for module in (model.query_backbone, model.key_backbone, model.query_projector, model.key_projector):
        module.eval()  # BatchNorm with running statistics: the parts below are exactly what forward computes
    g = torch.Generator().manual_seed(5)
    view_1, view_2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        q = model.embed(view_1)
        k = model.key_projector(model.key_backbone(pixel_values=view_2).pooler_output.flatten(1))
    expected = reference_info_nce(q, k, model.queue, model.config.contrastive_temperature)
    out = model(view_1=view_1, view_2=view_2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert model.config.contrastive_temperature == 0.2 and model.predictor is None
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(6))  # the initial queue is L2-normalised


def test_v3_forward_is_the_symmetric_loss_of_its_parts():
    model = tiny_moco(version=3).train()
    for module in model.children():
        module.eval()
    g = torch.Generator().manual_seed(6)
    view_1, view_2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        p1, p2 = model.predictor(model.embed(view_1)), model.predictor(model.embed(view_2))
        k1, k2 = model.keys(view_1), model.keys(view_2)
    out = model(view_1=view_1, view_2=view_2)
    assert out.loss.item() == pytest.approx(reference_v3(p1, p2, k1, k2, 1.0, 0), rel=1e-5)
    assert not hasattr(model, "queue") and model.config.contrastive_temperature == 1.0
    # v3 heads: 3-layer projector with an affine-free last BatchNorm, 2-layer predictor
    last = model.query_projector.mlp[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and last.weight is None
    assert sum(isinstance(m, torch.nn.Linear) for m in model.predictor.mlp) == 2


def test_key_encoder_gets_no_gradient_and_follows_by_ema_after_the_step():
    model = tiny_moco().train()
    for (_, p_q), (_, p_k) in zip(model.query_backbone.named_parameters(), model.key_backbone.named_parameters()):
        assert torch.equal(p_q, p_k)
    out = model(view_1=torch.randn(4, 3, 32, 32), view_2=torch.randn(4, 3, 32, 32))
    out.loss.backward()
    assert all(p.grad is None for p in model.key_backbone.parameters())
    assert all(p.grad is None for p in model.key_projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.query_backbone.parameters())
    with torch.no_grad():
        for p in model.query_projector.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.key_projector.parameters()]
    queue_before = model.queue.clone()
    assert int(model.queue_ptr) == 0 and torch.equal(model.queue, queue_before)  # forward does not enqueue
    model.post_optimizer_step(momentum=0.75)
    for b, k, q in zip(before, model.key_projector.parameters(), model.query_projector.parameters()):
        torch.testing.assert_close(k, 0.75 * b + 0.25 * q)
    assert int(model.queue_ptr) == 4 and not torch.equal(model.queue[:4], queue_before[:4])


def test_queue_wraps_around_and_keeps_the_newest_keys():
    model = tiny_moco(queue_size=5)
    keys = torch.nn.functional.normalize(torch.randn(13, 8), dim=1)
    model.enqueue(keys[:3])
    assert int(model.queue_ptr) == 3
    model.enqueue(keys[3:7])  # rows 3, 4, then wraps to 0, 1
    assert int(model.queue_ptr) == 2
    torch.testing.assert_close(model.queue, torch.stack([keys[5], keys[6], keys[2], keys[3], keys[4]]))
    model.enqueue(keys[7:13])  # 6 keys > 5 places: only the newest 5, from the pointer
    torch.testing.assert_close(model.queue, torch.stack([keys[11], keys[12], keys[8], keys[9], keys[10]]))
    assert int(model.queue_ptr) == 2


def test_gradient_accumulation_enqueues_every_micro_batch_at_the_step():
    model = tiny_moco(queue_size=20).train()
    for _ in range(3):  # three micro-batches of 4, one optimizer step
        model(view_1=torch.randn(4, 3, 32, 32), view_2=torch.randn(4, 3, 32, 32))
    assert int(model.queue_ptr) == 0
    model.post_optimizer_step(momentum=0.99)
    assert int(model.queue_ptr) == 12
    model.eval()
    model(view_1=torch.randn(4, 3, 32, 32), view_2=torch.randn(4, 3, 32, 32))
    model.post_optimizer_step(momentum=0.99)
    assert int(model.queue_ptr) == 12  # evaluation forwards never reach the queue


def test_queue_survives_save_pretrained_and_from_pretrained(tmp_path):
    model = tiny_moco()
    model.enqueue(torch.nn.functional.normalize(torch.randn(4, 8), dim=1))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MocoConfig) and config.queue_size == 6 and config.projector_config.hidden_dim == 32
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MocoForPreTraining)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and "queue" in after and "queue_ptr" in after
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert int(loaded.queue_ptr) == 4
    assert not any(p.requires_grad for p in loaded.key_backbone.parameters())
    assert all(p.requires_grad for p in loaded.query_backbone.parameters())


def test_v3_round_trip_and_config_errors(tmp_path):
    model = tiny_moco(version=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.version == 3 and loaded.config.predictor_config.in_dim == 8
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="version must be 2 or 3"):
        MocoConfig(version=1)
    with pytest.raises(ValueError, match="queue_size must be 0"):
        MocoConfig(version=3, queue_size=10)
    with pytest.raises(ValueError, match="no predictor"):
        MocoConfig(version=2, predictor_config={"hidden_dim": 8})


def test_two_views_are_seeded_and_asymmetric():
    views = build_views("two_views", (0.5,) * 3, (0.5,) * 3, crop_size=16, solarize_p=[0.0, 1.0], blur_p=[0.0, 0.0])
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    a, b = views(images, seed=3), views(images, seed=3)
    assert set(a) == {"view_1", "view_2"} and a["view_1"].shape == (4, 3, 16, 16)
    assert torch.equal(a["view_1"], b["view_1"]) and torch.equal(a["view_2"], b["view_2"])
    assert not torch.equal(a["view_1"], views(images, seed=4)["view_1"])
    with pytest.raises(ValueError, match="one value per view"):
        build_views("two_views", (0.5,) * 3, (0.5,) * 3, blur_p=[1.0])


# ------------------------------------------------------------------------------------------------ training


def test_registry_recipes_and_build_model(repo_root, moco_recipe):
    assert modeling.METHODS["moco"].views == "two_views" and modeling.METHODS["disco"].views == "two_views"
    model = build_model(load_recipe(moco_recipe))
    assert model.config.projector_config.in_dim == 16 and model.predictor is None
    v3 = build_model(load_recipe(repo_root / "recipes/moco/fashion-mnist-v3-resnet-tiny.yaml"))
    assert v3.config.projector_config.in_dim == 256 and v3.config.predictor_config.in_dim == 256
    with pytest.raises(RecipeError, match="queue_size must be 0"):
        build_model(load_recipe(moco_recipe, ["--model.version", "3"]))
    paper = load_recipe(repo_root / "recipes/moco/imagenet-v2-resnet-50.yaml")
    assert (paper.model["queue_size"], paper.model["contrastive_temperature"], paper.ema_momentum) == (65536, 0.2, 0.999)
    assert paper.learning_rate == 0.03 and paper.optimizer == "sgd" and paper.num_train_epochs == 200


def test_momentum_and_queue_update_only_after_real_optimizer_steps(moco_recipe, monkeypatch):
    calls = []
    original = MocoForPreTraining.post_optimizer_step

    def counting(self, momentum):
        calls.append((momentum, len(self._pending_keys)))
        return original(self, momentum)

    monkeypatch.setattr(MocoForPreTraining, "post_optimizer_step", counting)
    recipe = load_recipe(moco_recipe, ["--max_steps", "2", "--gradient_accumulation_steps", "2", "--do_eval", "false"])
    train(recipe)
    assert calls == [(0.99, 2), (0.99, 2)]  # 4 micro-batches, 2 optimizer steps, 2 micro-batches of keys each
    saved = AutoModel.from_pretrained(Path(recipe.output_dir) / "pretraining")
    assert int(saved.queue_ptr) == (2 * 2 * 8) % 20


def test_resume_gives_the_same_loss_curve_and_queue(moco_recipe, tmp_path):
    from safetensors.torch import load_file

    full_dir, resumed_dir = assert_resume_parity(moco_recipe, tmp_path)
    at_3 = load_file(resumed_dir / "checkpoints" / "step_3" / "model.safetensors")
    assert int(at_3["queue_ptr"]) == 3 * 8 % 20  # the queue is in the checkpoint
    final = load_file(full_dir / "pretraining" / "model.safetensors")
    assert not torch.equal(final["queue"], at_3["queue"])  # ... and it moved on after the resume, identically


def test_cli_moco_v3_run_writes_the_contract_and_a_plain_transformers_encoder(moco_recipe, tmp_path):
    result = run_cli("train", moco_recipe, "--max_steps", "3", "--checkpointing_steps", "3", "--model.version", "3",
                     "--model.queue_size", "0", "--model.predictor_config.hidden_dim", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert all({"embedding_std", "ema_momentum", "lr"} <= r.keys() for r in train_records)
    assert any("eval/knn_top1" in r for r in records)
    assert (run / "checkpoints" / "step_3" / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (run / "encoder" / name).is_file(), name
    encoder = AutoModel.from_pretrained(run / "encoder").eval()
    assert type(encoder).__module__.startswith("transformers.models.resnet")
    pretraining = AutoModel.from_pretrained(run / "pretraining").eval()
    assert pretraining.config.version == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values=x).pooler_output,
                                   pretraining.get_encoder()(pixel_values=x).pooler_output)
    card = (run / "encoder" / "README.md").read_text()
    assert "MoCo" in card and "chen2021empirical" in card


def test_cli_lists_moco_and_disco_recipes():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    for recipe in ("recipes/moco/fashion-mnist-resnet-tiny.yaml", "recipes/moco/imagenet-v3-vit-small-16.yaml",
                   "recipes/disco/fashion-mnist-teacher-resnet-18.yaml",
                   "recipes/disco/fashion-mnist-teacher-resnet-tiny-wide.yaml",
                   "recipes/disco/fashion-mnist-student-resnet-tiny.yaml"):
        assert recipe in result.stdout
