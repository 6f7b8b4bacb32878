"""Optimizers over the model's parameter groups, the per-step lr / weight-decay assignment, gradient clipping.

The model says how its parameters are grouped (`SSLPreTrainedModel.parameter_groups`: no weight decay on biases and
norms, a predictor at a constant lr, ...); the loop's schedules set each group's lr and weight decay every step.
"""
import torch

from modeling.pretraining import SSLPreTrainedModel

from .recipe import PretrainingRecipe, RecipeError

GROUP_FLAGS = ("name", "apply_weight_decay", "lars_adaptation", "constant_lr")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as in the MoCo v3 / BYOL code.

    Per parameter p with gradient g, in a group with `lars_adaptation`:
        u = g + weight_decay * p;   u *= trust_coefficient * ||p|| / ||u||   (unless ||p|| or ||u|| is 0)
    in a group without it (biases, norms) u = g + weight_decay * p, unscaled (their weight decay is 0 anyway);
        mu = momentum * mu + u;     p -= lr * mu
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient,
                        lars_adaptation=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars_adaptation"]:
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * param_norm / update_norm
                    update = update.mul(torch.where((param_norm > 0) & (update_norm > 0), ratio,
                                                    torch.ones_like(ratio)))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                mu = state["momentum_buffer"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def checked_parameter_groups(model: SSLPreTrainedModel) -> list[dict]:
    """The model's parameter groups, checked to hold every trainable parameter exactly once (and nothing frozen)."""
    groups = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for group in groups:
        missing = [flag for flag in GROUP_FLAGS if flag not in group]
        if missing:
            raise RecipeError(f"{type(model).__name__}.parameter_groups(): group {group.get('name')!r} lacks "
                              f"{missing} (make groups with modeling.pretraining.parameter_group)")
        for p in group["params"]:
            if id(p) in seen:
                raise RecipeError(f"{type(model).__name__}.parameter_groups(): {names.get(id(p), 'a parameter')} is "
                                  f"in groups {seen[id(p)]!r} and {group['name']!r}")
            if not p.requires_grad:
                raise RecipeError(f"{type(model).__name__}.parameter_groups(): {names.get(id(p), 'a parameter')} "
                                  f"(group {group['name']!r}) is frozen")
            seen[id(p)] = group["name"]
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if left_out:
        raise RecipeError(f"{type(model).__name__}.parameter_groups() leaves out trainable parameters: "
                          f"{', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''}")
    return [g for g in groups if g["params"]]


def build_optimizer(model: SSLPreTrainedModel, recipe: PretrainingRecipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over the model's parameter groups (lr and weight decay are set every step)."""
    groups = checked_parameter_groups(model)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(recipe.adam_beta1, recipe.adam_beta2))
    if recipe.optimizer == "lars":
        return LARS(groups, lr=recipe.learning_rate, momentum=recipe.sgd_momentum,
                    trust_coefficient=recipe.lars_trust_coefficient)
    return torch.optim.SGD(groups, lr=recipe.learning_rate, momentum=recipe.sgd_momentum)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, peak_lr: float, weight_decay: float) -> None:
    """Set every group's lr (the scheduled one, or the peak lr for a `constant_lr` group) and weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = peak_lr if group["constant_lr"] else lr
        group["weight_decay"] = weight_decay if group["apply_weight_decay"] else 0.0


def clip_gradients(parameters, max_norm: float, per_parameter: bool) -> None:
    """Clip the global gradient norm to `max_norm`, or (DINO) each parameter's gradient norm separately."""
    params = [p for p in parameters if p.grad is not None]
    if per_parameter:
        for p in params:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
