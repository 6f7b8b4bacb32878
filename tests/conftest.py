from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def _pattern(label: int, seed: int):
    """A 28x28 grey image whose stripe direction/frequency depends on the class, plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:28, 0:28]
    freq = 2 + label
    base = np.sin((x if label % 2 else y) * freq * np.pi / 28) * 100 + 128
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img, mode="L")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A saved DatasetDict (train 48 / test 16 images, 4 classes, 28 px grey like Fashion-MNIST)."""
    import datasets

    root = tmp_path_factory.mktemp("tiny_dataset") / "data"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcd"))})
    splits = {}
    for split, n, offset in (("train", 48, 0), ("test", 16, 1000)):
        splits[split] = datasets.Dataset.from_dict(
            {"image": [_pattern(i % 4, offset + i) for i in range(n)], "label": [i % 4 for i in range(n)]},
            features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A (larger) MoCo v2 pretraining model with 8-d embeddings, saved like OUTPUT_DIR/pretraining: a DisCo teacher."""
    import torch

    from modeling import MocoConfig, MocoForPreTraining

    torch.manual_seed(1)
    model = MocoForPreTraining(MocoConfig(
        backbone_config={"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 1],
                         "layer_type": "basic"},
        projector_config={"in_dim": 32, "out_dim": 8}, queue_size=16))
    path = tmp_path_factory.mktemp("teacher_run") / "pretraining"
    model.save_pretrained(path)
    return path


TINY_RECIPE = """
method: dino
output_dir: {output_dir}
dataset_name: {dataset}
image_size: 32
image_mean: [0.5, 0.5, 0.5]
image_std: [0.5, 0.5, 0.5]
dataloader_num_workers: 0
backbone_config: {{model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], layer_type: basic}}
model:
  head_config: {{hidden_dim: 32, bottleneck_dim: 16, out_dim: 64}}
augmentation: {{global_crop_size: 32, num_local_crops: 2, local_crop_size: 16, local_crop_scale: [0.1, 0.4]}}
per_device_train_batch_size: 8
num_train_epochs: 1
learning_rate: 0.001
warmup_epochs: 0.2
weight_decay_end: 0.4
clip_grad_per_parameter: true
logging_steps: 1
eval_batch_size: 16
seed: 7
"""


@pytest.fixture
def tiny_recipe(tmp_path, tiny_dataset) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(output_dir=tmp_path / "run", dataset=tiny_dataset))
    return path
