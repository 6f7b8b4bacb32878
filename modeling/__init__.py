"""hf-ssl model code: depends on torch and transformers only.

Importing this package registers every method with `AutoConfig` / `AutoModel`, so that
`AutoModel.from_pretrained(OUTPUT_DIR / "pretraining")` rebuilds the `XForPreTraining` model.
"""
from dataclasses import dataclass

from transformers import AutoConfig, AutoModel

from .cpc import CpcConfig, CpcForPreTraining
from .dino import DinoConfig, DinoForPreTraining
from .disco import DiscoConfig, DiscoForPreTraining
from .fast_moco import FastMocoConfig, FastMocoForPreTraining
from .moco import MocoConfig, MocoForPreTraining
from .relic import RelicConfig, RelicForPreTraining


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    model_class: type
    views: str  # the named view recipe in hf_ssl.augment
    paper: str


# The method registry: adding a method is one folder under modeling/ plus one line here.
METHODS: dict[str, Method] = {
    "dino": Method("dino", DinoConfig, DinoForPreTraining, "multicrop",
                   "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021"),
    "moco": Method("moco", MocoConfig, MocoForPreTraining, "two_views",
                   "Chen et al., Improved Baselines with Momentum Contrastive Learning, 2020 (v2); Chen, Xie & He, "
                   "An Empirical Study of Training Self-Supervised Vision Transformers, ICCV 2021 (v3)"),
    "disco": Method("disco", DiscoConfig, DiscoForPreTraining, "two_views",
                    "Gao et al., DisCo: Remedy Self-supervised Learning on Lightweight Models with Distilled "
                    "Contrastive Learning, ECCV 2022"),
    "fast_moco": Method("fast_moco", FastMocoConfig, FastMocoForPreTraining, "grid_views",
                        "Ci et al., Fast-MoCo: Boost Momentum-based Contrastive Learning with Combinatorial Patches, "
                        "ECCV 2022"),
    "relic": Method("relic", RelicConfig, RelicForPreTraining, "relic_views",
                    "Tomasev et al., Pushing the limits of self-supervised ResNets: Can we outperform supervised "
                    "learning without labels on ImageNet?, arXiv 2201.05119, 2022 (RELICv2)"),
    "cpc": Method("cpc", CpcConfig, CpcForPreTraining, "patch_grid",
                  "Hénaff et al., Data-Efficient Image Recognition with Contrastive Predictive Coding, ICML 2020"),
}

for _method in METHODS.values():
    AutoConfig.register(_method.config_class.model_type, _method.config_class, exist_ok=True)
    AutoModel.register(_method.config_class, _method.model_class, exist_ok=True)

__all__ = ["METHODS", "Method", "CpcConfig", "CpcForPreTraining", "DinoConfig", "DinoForPreTraining", "DiscoConfig",
           "DiscoForPreTraining", "FastMocoConfig", "FastMocoForPreTraining", "MocoConfig", "MocoForPreTraining",
           "RelicConfig", "RelicForPreTraining"]
