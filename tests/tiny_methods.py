"""One tiny setting per registered method, from which the shared tests are derived (transformers' ModelTesterMixin
idea, for pretraining models): tests/test_method_contract.py (save/load, Auto* registration, views match forward,
loss = its logged parts, EMA only after real optimizer steps, a skipped step leaves no trace) and
tests/test_distributed.py (2 processes reproduce 1). A new method adds its entry here; a registered method without
one fails `test_every_registered_method_has_a_tiny_setting`.
"""
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import TINY_RECIPE
from .test_cpc import CPC_RECIPE
from .test_fast_moco import FAST_MOCO_RECIPE
from .test_moco import MOCO_RECIPE
from .test_relic import RELIC_RECIPE


@dataclass(frozen=True)
class TinyMethod:
    """`recipe`: YAML text with {output_dir}, {dataset} and {teacher} (a tiny MoCo v2 pretraining model with 8-d
    embeddings) placeholders. `variants`: name -> recipe overrides; each variant gets every shared test.
    `loss_weights`: the output terms whose weighted sum is `loss`, as {term: config attribute holding its weight}
    (None: weight 1). `momentum`: the method has an EMA / momentum network (frozen parameters that
    `post_optimizer_step` moves); CPC has none."""

    recipe: str
    variants: dict[str, list[str]]
    loss_weights: dict[str, str | None] = field(default_factory=dict)
    momentum: bool = True


MOCO_V3 = ["--model.version", "3", "--model.queue_size", "0", "--model.contrastive_temperature", "1.0",
           "--model.projector_config", "{hidden_dim: 32, out_dim: 8, num_layers: 3, norm: batchnorm, last_norm: true}",
           "--model.predictor_config", "{hidden_dim: 32, num_layers: 2, norm: batchnorm}"]

TINY_METHODS: dict[str, TinyMethod] = {
    "dino": TinyMethod(TINY_RECIPE, {"dino-koleo": ["--model.koleo_weight", "0.1"]},
                       loss_weights={"dino_loss": None, "koleo": "koleo_weight"}),
    "moco": TinyMethod(MOCO_RECIPE, {"moco-v2": [], "moco-v3": MOCO_V3}),
    "disco": TinyMethod(MOCO_RECIPE.replace("method: moco", "method: disco")
                        .replace("  queue_size: 20", "  queue_size: 20\n  teacher_name_or_path: {teacher}"),
                        {"disco": []},
                        loss_weights={"contrastive_loss": "contrastive_weight",
                                      "query_distillation_loss": "query_distillation_weight",
                                      "key_distillation_loss": "key_distillation_weight"}),
    # loss = (loss_view_1 + loss_view_2) / 2: the mean over both views' combinations (config.view_loss_weight = 0.5)
    "fast_moco": TinyMethod(FAST_MOCO_RECIPE, {"fast-moco": []},
                            loss_weights={"loss_view_1": "view_loss_weight", "loss_view_2": "view_loss_weight"}),
    "relic": TinyMethod(RELIC_RECIPE, {"relic": []},
                        loss_weights={"contrastive_loss": "contrastive_weight", "invariance_loss": "invariance_weight"}),
    # loss = mean of the four directions' losses (config.direction_loss_weight = 1/4)
    "cpc": TinyMethod(CPC_RECIPE, {"cpc": []},
                      loss_weights={f"loss_{d}": "direction_loss_weight" for d in ("down", "up", "left", "right")},
                      momentum=False),
}

# variant name -> method
VARIANTS: dict[str, str] = {variant: method for method, tiny in TINY_METHODS.items() for variant in tiny.variants}


def write_tiny_recipe(variant: str, directory: Path, dataset: Path, teacher: Path) -> tuple[Path, list[str]]:
    """(recipe file, overrides) of a variant, its output_dir under `directory`."""
    tiny = TINY_METHODS[VARIANTS[variant]]
    path = directory / f"{variant}.yaml"
    path.write_text(tiny.recipe.format(output_dir=directory / variant, dataset=dataset, teacher=teacher))
    return path, list(tiny.variants[variant])
