"""Adversarial training (the paper's section 2.3), member by member.

Member m minimises loss(x) + loss(x') with x' = x + eps * sign(grad_x loss_m(x)), eps per input
dimension being `adversarial_eps` times its range. The input gradient comes from autograd.grad,
so no parameter's .grad is touched, and summing member losses keeps each member's gradient its
own. `perturbation="random"` is the paper's control: a random sign instead of the gradient's,
drawn from (member seed, step).
"""

from __future__ import annotations

import torch

from .members import member_seed


def member_losses(ensemble, xs: torch.Tensor, ys: torch.Tensor, step: int | None = None) -> torch.Tensor:
    """Each member's loss (M,) on its standardised inputs xs (M, B, D), plus its adversarial one."""
    loss, members = ensemble.head.loss, ensemble.members
    if not (ensemble.use_adversarial_training and ensemble.adversarial_eps > 0):
        return loss(members(xs), ys)
    if ensemble.perturbation == "random":
        x_adv = xs + ensemble.adversarial_step * random_signs(ensemble.member_seeds, xs.shape, step, xs.device)
        return loss(members(xs), ys) + loss(members(x_adv), ys)
    xs = xs.detach().clone().requires_grad_(True)
    clean = loss(members(xs), ys)
    (grad_x,) = torch.autograd.grad(clean.sum(), xs, retain_graph=True)
    x_adv = (xs + ensemble.adversarial_step * grad_x.sign()).detach()
    return clean + loss(members(x_adv), ys)


def random_signs(member_seeds: list[int], shape, step: int | None, device) -> torch.Tensor:
    """(M, B, D) random +/-1, member m's from (its seed, step) when the step is known."""
    if step is None:
        return torch.randint(0, 2, shape, device=device) * 2.0 - 1.0
    signs = [torch.randint(0, 2, shape[1:], generator=torch.Generator().manual_seed(
             member_seed(s, step, attempt=1))) for s in member_seeds]  # once per member per step
    return torch.stack(signs).to(device) * 2.0 - 1.0
