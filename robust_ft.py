"""Robust training and robust fine-tuning for CIFAR-sized images, in one readable module.

Reading order: the methods first, in the order a reader learns them (each builds on the one
before: the attack serves every method, CURE extends TRADES, RiFT starts from their models), then
what they run on, then an appendix of support code that the methods call but a reader can skip.
  1. Attacks      one PGD routine with CE, CW-margin and TRADES-KL objectives
  2. Training     natural training, Madry AT, TRADES, the SGD schedule and the epoch loop
  3. CURE         RGP update mask (Eq. 6), revision model (Eq. 7), consistency loss (Eq. 8), the step;
                  the official code's variant of the mask
  4. RiFT         module robust criticality, module fine-tuning, weight interpolation, OOD accuracy
  5. Evaluation   clean / PGD / CW / AutoAttack accuracy, NRR (Eq. 9)
  6. Models       ResNet-18/34/50/101, PreAct ResNet-18, WRN-34-10 (CIFAR variants, inputs in [0, 1])
  7. Data         CIFAR-10/100, SVHN, Tiny-ImageNet, ImageFolder roots and a synthetic set, on the device
  8. Analyses     CURE's analyses: CKA of clean vs adversarial features, minimum perturbation, the
                  layer-wise freezing study, gradient magnitudes, entries updated per phase
  Appendix (not needed to follow the methods):
  A. Checkpoints and RNG state   atomic writes, exact resume
  B. Data parallel               the collectives N processes (torchrun) use to compute what one computes
  C. AutoAttack                  adapters for the official package and pyautoattack
  D. CIFAR-10-C                  the corruption generators and the CIFAR-10/100-C, Tiny-ImageNet-C loaders
  E. RobustBench                 models from its zoo, for RiFT and evaluation

Equation numbers refer to the CURE paper (Conserve-Update-Revise, "CURE"); RiFT refers to
"Improving Generalization of Adversarial Training via Robust Critical Fine-Tuning" (ICCV 2023).
Every function takes explicit arguments; nothing here reads a global or parses a command line
(`run.py` does that). The device always comes from the inputs. The one shared state is
torch.distributed's default process group, used by appendix B's collectives only when a function
is given world_size > 1 (torchrun and `run.py` set the group up).
"""
import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import random
import sys
import types
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F


# =============================================================================
# 1. Attacks: one PGD routine (Madry et al. 2018) for training, evaluation, TRADES, CURE and RiFT
# =============================================================================

ATTACK_LOSSES = ("ce", "cw", "kl")


def cw_margin(logits, y):
    """CW margin per example: max_{j != y} z_j - z_y (positive = misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - z_y


@contextlib.contextmanager
def eval_mode(model):
    """The block runs with `model` in eval mode (BatchNorm on its running statistics); the mode it
    had is restored afterwards, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10, loss="ce", random_start=True, generator=None):
    """L-inf PGD: x^{t+1} = clip_[0,1](Proj_eps(x^t + step * sign(grad_x L(x^t)))).

    loss: "ce" cross-entropy, "cw" margin max_{j != y} z_j - z_y, "kl" the TRADES inner
    maximisation KL(p(x) || p(x')) started at x + 0.001 * N(0, 1) (Eq. 4). The model is put in
    eval mode (BatchNorm uses running statistics) and restored; parameters get no gradient.
    The random start comes from `generator` (on x's device), or from torch's global generator.
    `eps` and `step_size` may also be (B,) tensors, one radius and step per example (used by
    `minimum_perturbation`).
    """
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {list(ATTACK_LOSSES)}")
    if bool((torch.as_tensor(eps) < 0).any()):
        raise ValueError(f"eps={eps!r} must be >= 0")
    per_example = torch.is_tensor(eps)
    if per_example:                                   # (B,) -> (B, 1, 1, 1), to broadcast over images
        eps = eps.to(x.device, x.dtype).view(-1, *(1,) * (x.dim() - 1))
    if torch.is_tensor(step_size):
        step_size = step_size.to(x.device, x.dtype).view(-1, *(1,) * (x.dim() - 1))
    with eval_mode(model), torch.enable_grad():
        if loss == "kl":
            with torch.no_grad():
                p_nat = F.softmax(model(x), dim=1)
            x_adv = x + 0.001 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        elif random_start and per_example:
            x_adv = x + torch.empty_like(x).uniform_(-1, 1, generator=generator) * eps
        elif random_start:
            x_adv = x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        else:
            x_adv = x.clone()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            if loss == "ce":
                objective = F.cross_entropy(logits, y, reduction="sum")
            elif loss == "cw":
                objective = cw_margin(logits, y).sum()
            else:
                objective = F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")
            grad, = torch.autograd.grad(objective, [x_adv])   # never touches parameter .grad
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


# =============================================================================
# 2. Adversarial training: natural, Madry AT, TRADES; SGD with the papers' step schedule
# =============================================================================

def kl_batchmean(logits_p, logits_q):
    """KL(p || q) = (1/B) sum_i sum_c p_ic (log p_ic - log q_ic), p = softmax(logits_p), q = softmax(logits_q):
    TRADES' and CURE's robust term (Eq. 5) and CURE's consistency loss (Eq. 8)."""
    return F.kl_div(F.log_softmax(logits_q, dim=1), F.softmax(logits_p, dim=1), reduction="batchmean")


def trades_loss(logits_nat, logits_adv, y, beta=6.0):
    """TRADES: CE(f(x), y) + beta * (1/B) * sum_i KL(p(x_i) || p(x_adv_i))  (Zhang et al. 2019)."""
    return F.cross_entropy(logits_nat, y) + beta * kl_batchmean(logits_nat, logits_adv)


def sgd_update(model, optimizer, loss, average=None):
    """Backward `loss`, then one optimiser step. `average` (data parallel, see appendix B) is called
    on the gradients first, and replaces them by their mean over the ranks."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if average is not None:
        average([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    return loss.detach()


def natural_step(model, optimizer, x, y, average=None):
    """One SGD step on CE(f(x), y). Returns the detached loss (no host sync)."""
    return sgd_update(model, optimizer, F.cross_entropy(model(x), y), average)


def at_step(model, optimizer, x, y, eps=8 / 255, step_size=2 / 255, steps=10, average=None):
    """Madry AT: one SGD step on CE(f(x_adv), y), x_adv = PGD-`steps` on CE."""
    x_adv = pgd(model, x, y, eps, step_size, steps, loss="ce")
    return natural_step(model, optimizer, x_adv, y, average)


def trades_step(model, optimizer, x, y, eps=8 / 255, step_size=2 / 255, steps=10, beta=6.0, average=None):
    """TRADES: one SGD step on `trades_loss`, x_adv from the KL inner maximisation."""
    x_adv = pgd(model, x, y, eps, step_size, steps, loss="kl")
    return sgd_update(model, optimizer, trades_loss(model(x), model(x_adv), y, beta), average)


def make_optimizer(model, lr, weight_decay, momentum=0.9):
    """SGD with momentum 0.9 on every trainable parameter (weight decay on all, as the papers)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                           momentum=momentum, weight_decay=weight_decay)


def lr_milestones(epochs, fractions=(0.5, 0.75)):
    """The epochs after which lr drops by 10 in a run of `epochs`: each fraction of the run, rounded
    half up, kept only inside the run and after the previous drop, so no two drops share an epoch
    (3 epochs: one drop, at epoch 2). 200 epochs give (100, 150), the official CURE schedule
    (NeurAI-Lab/CURE `utilities/args.py`) and Rice et al.'s."""
    drops = []
    for f in fractions:
        e = math.floor(f * epochs + 0.5)
        if 0 < e < epochs and (not drops or e > drops[-1]):
            drops.append(e)
    return tuple(drops)


def step_lr(base_lr, epoch, milestones=(100, 150)):
    """lr at (0-based) `epoch`: base_lr / 10 for every milestone epoch reached (a piecewise-constant
    schedule; the default is the papers' 200-epoch run, see `lr_milestones` for other lengths)."""
    return base_lr * 0.1 ** sum(epoch >= m for m in milestones)


def train_epoch(model, optimizer, train_step, split, batch_size, lr, generator, progress=None, rank=0,
                world_size=1):
    """Run `train_step(model, optimizer, x, y)` over one shuffled, augmented epoch in train mode at
    learning rate `lr`. Returns the mean loss (see `run_epoch`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    return run_epoch(model, optimizer, train_step, split, batch_size, generator, progress, rank, world_size)


def run_epoch(model, optimizer, train_step, split, batch_size, generator, progress=None, rank=0, world_size=1):
    """`train_step(model, optimizer, x, y)` on every shuffled, augmented batch of one epoch, the model in
    whatever mode it is; `progress(i, n)` after each. Returns the mean loss.

    Data parallel: this rank's slice of each global batch (see `batches`); the loss is the mean
    over the ranks too (one all-reduce per epoch).
    """
    total, count = None, 0
    n_batches = max(1, len(split) // batch_size)
    for i, (x, y) in enumerate(batches(split, batch_size, generator, train=True, rank=rank, world_size=world_size)):
        loss = train_step(model, optimizer, x, y)
        total = loss if total is None else total + loss   # summed on the device: no sync per step
        count += 1
        if progress is not None:
            progress(i + 1, n_batches)
    if total is None:
        return float("nan")
    return float(mean_over_ranks(total, world_size)) / count


# =============================================================================
# 3. CURE (Algorithm 1): L_adv (Eq. 5) plus L_CR (Eq. 8), the RGP update mask (Eq. 6), the revision
#    model (Eq. 7). `cure_step` first, then its parts in the order it calls them, the mask's helpers,
#    the revision model and its schedule; the official code's variant in one block at the end.
# =============================================================================


CURE_VARIANTS = ("paper", "official")


@dataclass(frozen=True)
class CureConfig:
    """CURE hyperparameters; defaults are Table 9 for ResNet-18 on CIFAR-10, beta the official code's."""
    percentile: float = 30.0   # p: share of each weight tensor's entries kept frozen per step (Table 9)
    alpha: float = 0.1         # weight of the natural gradient in the RGP score, Eq. 6 (Table 9)
    gamma: float = 1.0         # weight of the consistency loss L_CR, Eq. 8 (Table 9)
    # Weight of the KL term in L_adv (Eq. 5). Eq. 5 as printed has weight 1; every official run used
    # 5: NeurAI-Lab/CURE `utilities/args.py` argument trades_beta (default 5), passed as
    # cure_loss_dual's beta by `utilities/train.py` on every path. With weight 1, CURE keeps more
    # clean accuracy but loses much of the robustness (the README's ablation).
    beta: float = 5.0
    rate: float = 0.2          # revision rate r (Table 9); the paper variant decays it, see `revision_rate`
    decay: float = 0.999       # revision decay d (Table 9); see `CureSchedule.for_run` for the d a run uses
    exclude: tuple = ()        # masked-tensor names to leave unmasked (e.g. the classifier)
    # "paper": Eq. 6's score and the exact rank-k rule on every weight, eval-mode revision model with
    # r_t decaying. "official": the official code's rgp_soft mask (`official_rgp_mask_`) and its
    # train-mode, parameters-only revision model at the constant rate r.
    variant: str = "paper"

    def __post_init__(self):
        if self.variant not in CURE_VARIANTS:
            raise ValueError(f"unknown CURE variant {self.variant!r}; choose one of {list(CURE_VARIANTS)}")


CURE_DEFAULTS = {  # (model, dataset) -> (percentile, alpha, gamma), Table 9
    ("resnet18", "cifar10"): (30, 0.1, 1.0),
    ("resnet18", "cifar100"): (30, 0.1, 1.0),
    ("resnet18", "svhn"): (30, 0.2, 1.0),
    ("wrn34_10", "cifar10"): (50, 0.3, 0.5),
    ("wrn34_10", "cifar100"): (50, 0.3, 0.5),
    ("preact_resnet18", "cifar10"): (20, 0.2, 1.0),
}


def cure_defaults(model_name, dataset):
    """Table 9's CureConfig for (model, dataset); datasets it does not list use CIFAR-10's row."""
    key = (model_name, dataset if (model_name, dataset) in CURE_DEFAULTS else "cifar10")
    p, a, g = CURE_DEFAULTS.get(key, CURE_DEFAULTS[("resnet18", "cifar10")])
    return CureConfig(percentile=p, alpha=a, gamma=g)


def cure_step(model, optimizer, x, y, revision, cfg, schedule, coin,
              eps=8 / 255, step_size=2 / 255, steps=10, mask_fn=None, updated=None, average=None):
    """One CURE step (Algorithm 1): attack, gradients, RGP mask, update and revision.

    x_adv from the KL inner maximisation (Eq. 4, `steps` of `step_size` in the L-inf ball of radius
    `eps`); the revision model's targets; g, g_nat and g_score, the score's second gradient
    (`cure_gradients`, or `official_cure_gradients`); the mask (`cure_mask_`, with `mask_fn`,
    `updated` and `average` as there); SGD and Eq. 7 (`cure_update_`, which advances `schedule`;
    `coin` draws the revision). Returns the detached loss L (no host sync). Here alpha is CURE's
    (cfg.alpha, Eq. 6's weight of the natural gradient), not RiFT's interpolation weight.
    """
    x_adv = pgd(model, x, y, eps, step_size, steps, loss="kl")                           # Eq. 4
    rev_nat, rev_adv = revision.targets(x, x_adv)
    gradients = official_cure_gradients if cfg.variant == "official" else cure_gradients
    g, g_nat, g_score, loss = gradients(model, x, x_adv, y, rev_nat, rev_adv, cfg)       # Eqs. 5, 8
    cure_mask_(model, g, g_nat, g_score, cfg, mask_fn, updated, average)                 # Eq. 6, Alg. 1 l. 20
    cure_update_(model, optimizer, g, revision, cfg, schedule, coin)                     # Eq. 7
    return loss


def cure_gradients(model, x, x_adv, y, rev_nat, rev_adv, cfg):
    """The three gradients of one CURE step from one forward graph, with three backward passes.

    Returns (g, g_nat, g_score, L) per trainable parameter: g = dL/dtheta with
    L = CE(f(x), y) + beta KL(p(x) || p(x_adv)) + gamma L_CR (Eqs. 5, 8), g_nat = dCE(f(x), y)/dtheta
    and g_score = dCE(f(x_adv), y)/dtheta, the adversarial gradient of Eq. 6. L is CE(f(x), y) plus
    the rest, so g = g_nat + d(rest)/dtheta: no fourth pass for L itself.
    """
    params, ce_nat, ce_adv, kl, l_cr = cure_losses(model, x, x_adv, y, rev_nat, rev_adv)
    rest = cfg.beta * kl + cfg.gamma * l_cr
    g_nat = torch.autograd.grad(ce_nat, params, retain_graph=True)
    g_score = torch.autograd.grad(ce_adv, params, retain_graph=True)
    g_rest = torch.autograd.grad(rest, params)
    return torch._foreach_add(g_nat, g_rest), g_nat, g_score, (ce_nat + rest).detach()


def cure_losses(model, x, x_adv, y, rev_nat, rev_adv):
    """The trainable parameters and the terms CURE's gradients are taken of, from one forward pass
    of each batch: CE(f(x), y), CE(f(x_adv), y), KL(p(x) || p(x_adv)) (Eq. 5) and L_CR (Eq. 8)."""
    params = [p for p in model.parameters() if p.requires_grad]
    logits_nat, logits_adv = model(x), model(x_adv)
    l_cr = consistency_loss(logits_nat, rev_nat) + consistency_loss(logits_adv, rev_adv)    # Eq. 8
    return (params, F.cross_entropy(logits_nat, y), F.cross_entropy(logits_adv, y),
            kl_batchmean(logits_nat, logits_adv), l_cr)


def consistency_loss(logits, logits_rev):
    """KL(p_rev || p), batch mean; Eq. 8 is its sum over the natural and the adversarial batch."""
    return kl_batchmean(logits_rev, logits)


def cure_mask_(model, g, g_nat, g_score, cfg, mask_fn=None, updated=None, average=None):
    """The RGP mask (Eq. 6, Alg. 1 line 20) on g, in place, on the tensors `cure_masked` names:
    `mask_fn` (default `rgp_mask_`, or the fused kernels) for the paper variant, `official_mask_`
    for the official one.

    Data parallel: `average` first replaces g, and g_nat and g_score of the masked tensors, by
    their means over the ranks (3x the plain volume), so every rank computes the same mask. If
    `updated` (a dict) is given, each masked tensor's count of updated entries is added to it
    on the device (Figure 6b).
    """
    sel = cure_masked(model, cfg)
    if average is not None:
        average([*g, *(g_nat[i] for _, i in sel), *(g_score[i] for _, i in sel)])
    mask = official_mask_ if cfg.variant == "official" else (mask_fn or rgp_mask_)
    mask([g[i] for _, i in sel], [g_nat[i] for _, i in sel], [g_score[i] for _, i in sel],
         cfg.alpha, cfg.percentile)
    if updated is not None:
        with torch.no_grad():
            for name, i in sel:
                updated[name] = updated.get(name, 0) + (g[i] != 0).sum()


def cure_masked(model, cfg):
    """(name, index into the trainable parameters) of the tensors cfg's mask applies to: every
    weight with ndim >= 2 outside cfg.exclude (paper, `masked_parameters`), or
    `official_masked_names` (official)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if cfg.variant == "official":
        names = official_masked_names(trainable)
    else:
        names = [n for n, _ in masked_parameters(model, cfg.exclude)]
    index = {n: i for i, n in enumerate(trainable)}
    return [(n, index[n]) for n in names if n in index]


def masked_parameters(model, exclude=()):
    """The (name, parameter) pairs the RGP mask applies to: every weight with ndim >= 2 (the conv and
    linear weights; biases and normalisation parameters never)."""
    return [(n, p) for n, p in model.named_parameters()
            if p.ndim >= 2 and not any(n == e or n.startswith(e + ".") for e in exclude)]


def cure_update_(model, optimizer, g, revision, cfg, schedule, coin):
    """One optimiser step on the masked g, then the revision (Eq. 7) with probability r_t at
    step t; advances `schedule` by one step. `coin`, a torch.Generator, draws the revision (on
    data parallel ranks it must be seeded alike, so every rank revises together)."""
    for p, gi in zip([p for p in model.parameters() if p.requires_grad], g):
        p.grad = gi
    optimizer.step()
    revision.maybe_update_(model, schedule.decay_now(), schedule.rate(cfg), coin)
    schedule.t += 1


# --- The RGP mask (Eq. 6): the exact rank-k rule and its helpers ---

@torch.no_grad()
def rgp_mask_(grads, grads_nat, grads_score, alpha, percentile):
    """RGP update mask (Eq. 6, Alg. 1 line 20): zero grads[i] where score < its rank-k score.

    Per tensor with n elements: k = floor(p * n / 100); k = 0 masks nothing, k = n masks all;
    otherwise tau = the (k+1)-th smallest score (NaN largest) and every entry with score < tau is
    zeroed (strict: ties at tau are kept). In place, no host synchronisation per tensor.
    """
    check_rgp_args(grads, grads_nat, grads_score, alpha, percentile)
    for g, gn, gs in zip(grads, grads_nat, grads_score):
        n = g.numel()
        k = rgp_k(n, percentile)
        if k == 0:
            continue
        if k == n:
            g.zero_()
            continue
        key = score_key(rgp_score(gn, gs, alpha)).flatten()
        threshold = key.kthvalue(k + 1).values        # 0-d device tensor: no .item(), no sync
        g.masked_fill_((key < threshold).view(g.shape), 0)


def rgp_score(g_nat, g_score, alpha):
    """Eq. 6 per element: s = a * |g_nat| + b * |g_score| in float32, each op rounded (no FMA)."""
    a, b = rgp_coefficients(alpha)
    return g_nat.float().abs().mul_(a).add_(g_score.float().abs().mul_(b))


def rgp_coefficients(alpha):
    """(a, b) = (float32(alpha), float32(1 - alpha)), the subtraction done in double, as Python does."""
    a = float(torch.tensor(alpha, dtype=torch.float32))
    b = float(torch.tensor(1.0 - alpha, dtype=torch.float32))
    return a, b


def score_key(score):
    """int32 order key of a non-negative float32 score; NaN maps above +inf (so it is never masked)."""
    key = score.view(torch.int32)
    return torch.where(torch.isnan(score), torch.full_like(key, 0x7FFFFFFF), key)


def rgp_k(n, percentile):
    """k = floor(p * n / 100): how many entries of an n-element tensor the rule masks (`rgp_mask_`)."""
    return math.floor(percentile * n / 100)


def check_rgp_args(grads, grads_nat, grads_score, alpha, percentile):
    """Validate the arguments of `rgp_mask_` (shared with `kernels.fused_rgp_mask_`)."""
    if not (len(grads) == len(grads_nat) == len(grads_score)):
        raise ValueError(f"grads, grads_nat and grads_score must have the same length, "
                         f"got {len(grads)}, {len(grads_nat)}, {len(grads_score)}")
    for i, (g, gn, gs) in enumerate(zip(grads, grads_nat, grads_score)):
        if not (g.shape == gn.shape == gs.shape):
            raise ValueError(f"tensor {i}: shapes differ: grads {tuple(g.shape)}, "
                             f"grads_nat {tuple(gn.shape)}, grads_score {tuple(gs.shape)}")
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha={alpha!r} is outside the allowed range [0, 1]")
    if not (0.0 <= percentile <= 100.0):
        raise ValueError(f"percentile={percentile!r} is outside the allowed range [0, 100]")


# --- The revision model (Eq. 7) and the schedule of its rate r_t and decay d_t ---

class Revision:
    """The revision model of Eq. 7: a stochastic momentum (EMA) copy of the training model.

    train_mode=False (the paper's reading): the copy gives its targets in eval mode, and its
    parameters and floating-point buffers are averaged. train_mode=True (the official code,
    `utilities/train.py`): the copy stays in train mode, so its targets use the batch's statistics
    and its forwards update its own BatchNorm statistics, and only its parameters are averaged.
    """

    def __init__(self, model, train_mode=False):
        self.model = copy.deepcopy(model).train(train_mode)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.train_mode = train_mode
        self.updates = 0

    @torch.no_grad()
    def targets(self, x, x_adv):
        """(logits_rev(x), logits_rev(x_adv)), without gradient, in the copy's own mode."""
        return self.model(x), self.model(x_adv)

    @torch.no_grad()
    def update_(self, model, d):
        """Eq. 7: theta_rev <- d * theta_rev + (1 - d) * theta.

        In eval mode floating-point buffers (BatchNorm statistics) are averaged too and integer
        buffers copied; in train mode the buffers are the copy's own.
        """
        if self.train_mode:
            rev = [p for p in self.model.parameters()]
            cur = [p.detach() for p in model.parameters()]
        else:
            rev_state, cur_state = self.model.state_dict(), model.state_dict()
            floats = [k for k, v in rev_state.items() if v.is_floating_point()]
            rev, cur = [rev_state[k] for k in floats], [cur_state[k] for k in floats]
            for k, v in rev_state.items():
                if not v.is_floating_point():
                    v.copy_(cur_state[k])
        torch._foreach_mul_(rev, d)
        torch._foreach_add_(rev, cur, alpha=1.0 - d)
        self.updates += 1

    def maybe_update_(self, model, d, rate, coin):
        """With probability `rate`, Eq. 7 with decay d (the draw is on the host: no device sync)."""
        if torch.rand((), generator=coin).item() < rate:
            self.update_(model, d)


def cure_revision(model, cfg):
    """A fresh revision model for `cfg.variant` (the official one stays in train mode)."""
    return Revision(model, train_mode=cfg.variant == "official")


@dataclass
class CureSchedule:
    """Where a CURE run is: its step counter t, its length S and the revision decay d it uses.

    The one place that holds the schedule: r_t (`rate`) and d_t (`decay_now`) both read t, and
    `cure_step` advances it. A checkpoint saves `t`; the rest follows from the run's settings.
    """
    total_steps: int          # S, the CURE steps of the run: r_t reaches r/10 at the last one
    run_decay: float          # the d this run uses (`for_run`), before the warm-up of `decay_now`
    t: int = 0                # steps taken so far

    @classmethod
    def for_run(cls, cfg, total_steps):
        """The schedule of a run of `total_steps` CURE steps: the official variant uses cfg's d as
        its code does, whatever the run's length; the paper variant `revision_decay`'s d."""
        if cfg.variant == "official":
            return cls(total_steps, cfg.decay)
        return cls(total_steps, revision_decay(cfg.decay, cfg.rate, total_steps))

    def rate(self, cfg):
        """r_t now (`cure_rate`: decaying for the paper variant, constant for the official one)."""
        return cure_rate(cfg, self.t / max(1, self.total_steps))

    def decay_now(self):
        """d_t = min(d, 1 - 1/(t + 2)), the official code's mean-teacher warm-up (`utilities/train.py`,
        `update_ema_model_variables`): it counts batches from 1 and increments before revising, so
        the update after step t (0-based) sees t + 1 and the first one averages half and half."""
        return min(self.run_decay, 1.0 - 1.0 / (self.t + 2))


def cure_rate(cfg, progress):
    """The revision probability at `progress` (0 to 1) of the run: r_t for the paper variant; the
    official code's constant r (its ema_dynamic option, off by default, is not reproduced)."""
    return cfg.rate if cfg.variant == "official" else revision_rate(cfg.rate, progress)


def revision_rate(rate, progress):
    """r_t: linear decay from r at the start (progress 0) to r/10 at the end (progress 1).

    This project's reading of the paper, which says only that r is "gradually decayed" (Sec. 4)
    and gives no formula; the official code keeps r constant."""
    return rate * (1.0 - 0.9 * min(max(progress, 0.0), 1.0))


PAPER_STEPS = 200 * 391   # 200 epochs x 391 batches of 128 CIFAR images: the paper's CURE run
DECAY_FLOOR = 0.5         # the smallest d a paper-variant revision uses: the official first update's


def revision_decay(decay, rate, total_steps, floor=DECAY_FLOOR):
    """The paper variant's d for a run of S steps (this project's rule, not the paper's or the
    official code's): the horizon 1/(1 - d) kept at the paper run's share of the revisions, floored.

    The paper's d = 0.999 is a horizon of 1,000 updates out of ~8,600 expected revisions in 200
    epochs, about the last eighth of the run. A short run keeps that share, so its revision model
    still follows the training model instead of staying at the natural model it started from:
    H = (1/(1 - d)) * U(run) / U(paper), d_used = min(d, max(floor, 1 - 1/H)). The floor keeps
    every revision an average (d > 0) in runs too short for one horizon.
    """
    share = (1.0 / (1.0 - decay)) / expected_revisions(rate, PAPER_STEPS)
    horizon = share * expected_revisions(rate, total_steps)
    scaled = 1.0 - 1.0 / horizon if horizon > 1.0 else 0.0
    return min(decay, max(floor, scaled))


def expected_revisions(rate, total_steps):
    """Expected number of revision updates when r_t falls linearly from r to r/10: 0.55 * r * S."""
    return 0.55 * rate * total_steps


# --- The official code's variant (NeurAI-Lab/CURE, `--cure-variant official`): its loss split, its
# --- rgp_soft mask on the conv1 tensors, its train-mode revision model at a constant rate ---

def official_cure_gradients(model, x, x_adv, y, rev_nat, rev_adv, cfg):
    """`cure_gradients` as the official code splits the loss (`utilities/train.py`): g_score is
    g_kl = dKL(p(x) || p(x_adv))/dtheta, not the adversarial CE gradient, and
    g = g_nat + beta g_kl + gamma dL_CR/dtheta. Returns (g, g_nat, g_score, L)."""
    params, ce_nat, _, kl, l_cr = cure_losses(model, x, x_adv, y, rev_nat, rev_adv)
    g_nat = torch.autograd.grad(ce_nat, params, retain_graph=True)
    g_score = torch.autograd.grad(kl, params, retain_graph=True)
    g_cr = torch.autograd.grad(cfg.gamma * l_cr, params)
    g = torch._foreach_add(torch._foreach_add(g_nat, g_score, alpha=cfg.beta), g_cr)
    return g, g_nat, g_score, (ce_nat + cfg.beta * kl + cfg.gamma * l_cr).detach()


def official_masked_names(names):
    """The tensors the official rgp_soft mask touches: every parameter whose qualified name contains
    "conv1", except the first parameter (NeurAI-Lab/CURE `utilities/reinit_util.py`, `RGP.fuse_grads`:
    `l > 0 and 'conv1' in layer_names[l]`). For ResNet-18: the 8 `layerX.Y.conv1.weight` tensors."""
    return [n for i, n in enumerate(names) if i > 0 and "conv1" in n]


@torch.no_grad()
def official_mask_(grads, grads_nat, grads_score, alpha, percentile):
    """The official rgp_soft rule on every tensor given: zero g where s < percentile_p(s), with
    s = alpha * g_nat + (1 - alpha) * g_score SIGNED (no absolute values) and the threshold NumPy's
    interpolated percentile (`official_percentile`). Same arguments as `rgp_mask_`."""
    check_rgp_args(grads, grads_nat, grads_score, alpha, percentile)
    a, b = rgp_coefficients(alpha)
    for g, gn, gs in zip(grads, grads_nat, grads_score):
        score = gn.float().mul(a).add_(gs.float().mul(b))          # float32, no FMA
        g.masked_fill_(score.double() < official_percentile(score, percentile), 0)


def official_percentile(score, percentile):
    """`np.percentile(score, p)` (linear interpolation, NaN if any entry is NaN), in float64 on the
    score's device: tau = v[i] + (v[i+1] - v[i]) * f at the virtual index (n - 1) p / 100 = i + f of the
    sorted values v (for f >= 0.5 NumPy computes v[i+1] - (v[i+1] - v[i]) * (1 - f); so here)."""
    v = score.flatten().sort().values                      # torch.sort puts NaN last, as NumPy does
    n = v.numel()
    index = (n - 1) * (percentile / 100)
    lo = min(math.floor(index), n - 1)
    hi, f = min(lo + 1, n - 1), index - lo
    a, b = v[lo].double(), v[hi].double()
    tau = b - (b - a) * (1 - f) if f >= 0.5 else a + (b - a) * f
    return torch.where(torch.isnan(v[-1]), v[-1].double(), tau)   # 0-d device tensor: no sync


@torch.no_grad()
def official_rgp_mask_(named_grads, named_grads_nat, named_grads_score, alpha, percentile):
    """The official code's RGP mask (its reinit_mode `rgp_soft`) on a whole model's gradients.

    g_score is g_kl, the gradient of the KL term of Eq. 5 (not of CE(f(x_adv), y)); only the
    tensors named by `official_masked_names` are masked (`official_mask_`), p in percent. The lists
    hold (qualified_name, tensor) pairs in `model.named_parameters()` order; the first list is
    masked in place and the masked names are returned. Plain PyTorch only (no fused kernel); one sort per
    masked tensor.
    """
    names = [n for n, _ in named_grads]
    if [n for n, _ in named_grads_nat] != names or [n for n, _ in named_grads_score] != names:
        raise ValueError("named_grads, named_grads_nat and named_grads_score must name the same tensors in "
                         "the same order")
    grads, grads_nat, grads_score = (dict(lst) for lst in (named_grads, named_grads_nat, named_grads_score))
    masked = official_masked_names(names)
    official_mask_([grads[n] for n in masked], [grads_nat[n] for n in masked], [grads_score[n] for n in masked],
                   alpha, percentile)
    return masked


# =============================================================================
# 4. RiFT: module robust criticality (Def. 3.1, Alg. 1), one-module fine-tuning, interpolation, OOD
# =============================================================================

RIFT_ALPHAS = tuple(i / 10 for i in range(11))   # {0, 0.1, ..., 1} (Sec. 3.3); i / 10 is exact, 0.1 * i is not


def rift_modules(model):
    """Qualified names of the modules RiFT ranks and fine-tunes: every nn.Conv2d and nn.Linear."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def rift_module(model, name):
    """The Conv2d/Linear module called exactly `name`; a ValueError lists the valid names."""
    valid = rift_modules(model)
    if name not in valid:
        raise ValueError(f"unknown module {name!r}; RiFT modules (Conv2d/Linear) are {valid}")
    return dict(model.named_modules())[name]


def robust_loss(model, x_adv, y, batch_size=512):
    """L_rob = (1/N) sum_i CE(f(x_adv_i), y_i) over the fixed adversarial set (Def. 3.1)."""
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    with torch.no_grad():
        for xb, yb in zip(x_adv.split(batch_size), y.split(batch_size)):
            total += F.cross_entropy(model(xb).float(), yb, reduction="sum").double()
    return (total / len(y)).item()


def robust_loss_grad(model, weight, x_adv, y, batch_size=512):
    """dL_rob/dw for one weight tensor, summed over batches (the full-set gradient, not a batch's)."""
    grad = torch.zeros_like(weight)
    with torch.enable_grad():
        for xb, yb in zip(x_adv.split(batch_size), y.split(batch_size)):
            loss = F.cross_entropy(model(xb).float(), yb, reduction="sum") / len(y)
            grad += torch.autograd.grad(loss, [weight])[0]      # never touches parameter .grad
    return grad


def _set_weight(weight, w0, dw):
    """w <- w0 + dw in place, outside autograd."""
    with torch.no_grad():
        weight.copy_(w0 + dw)


def _paper_ascent(model, weight, w0, bound, x_adv, y, steps, lr, batch_size):
    """Alg. 1: at most T ascent steps on dw; once ||dw|| > bound, project onto the ball and stop.

    lr=None takes normalised steps dw += (2 * bound / T) * g / ||g||: the same relative size for
    every module whatever its gradient scale, reaching the boundary (where the maximum of a locally
    linear or convex loss lies) after about T/2 aligned steps, so the projection is taken for real
    and the remaining steps are slack for curvature. A number takes plain steps dw += lr * g.
    """
    dw = torch.zeros_like(w0)
    step = 2.0 * bound / steps
    for _ in range(steps):
        _set_weight(weight, w0, dw)
        g = robust_loss_grad(model, weight, x_adv, y, batch_size)
        if lr is None:
            g_norm = torch.linalg.vector_norm(g)
            if g_norm == 0:          # L_rob does not depend on w here: no ascent direction
                break
            dw = dw + (step / g_norm) * g
        else:
            dw = dw + lr * g
        norm = torch.linalg.vector_norm(dw)
        if norm > bound:
            dw = dw * (bound / norm)
            break
    return dw


def _official_ascent(model, weight, w0, bound, x_adv, y, epochs, lr, batch_size, generator):
    """Official code: `epochs` passes of plain SGD ascent (lr 1, shuffled batches of 512), a
    projection once per pass, and the largest full-set L_rob seen after a pass. Returns (L, dw)."""
    dw, best, best_dw = torch.zeros_like(w0), -math.inf, torch.zeros_like(w0)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(y.device)
        for idx in order.split(batch_size):
            _set_weight(weight, w0, dw)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x_adv[idx]).float(), y[idx])        # batch mean, as SGD
                dw = dw + lr * torch.autograd.grad(loss, [weight])[0]
        norm = torch.linalg.vector_norm(dw)
        if norm > bound:
            dw = dw * (bound / norm)
        _set_weight(weight, w0, dw)
        loss = robust_loss(model, x_adv, y, batch_size)
        if loss > best:
            best, best_dw = loss, dw
    return best, best_dw


def mrc_perturbation(model, name, x_adv, y, radius=0.1, steps=10, lr=None, variant="paper", batch_size=512,
                     generator=None, base_loss=None):
    """MRC(M) = max_{||dw||_2 <= radius ||w||_2} L_rob(w + dw) - L_rob(w) (Def. 3.1, where RiFT calls
    the relative radius epsilon), by Alg. 1.

    Returns (mrc, dw) with mrc = L_rob(w + dw) - L_rob(w) for the dw found. variant "paper": see
    `_paper_ascent`; "official": see `_official_ascent` (lr None = 1.0, `steps` = passes, batches of
    `batch_size`, shuffled with `generator`). The model runs in eval mode (BatchNorm uses and keeps
    its running statistics); only the module's weight moves and is restored bit for bit afterwards.
    `base_loss` is L_rob(w) when already known (it is the same for every module).
    """
    if variant not in ("paper", "official"):
        raise ValueError(f"unknown MRC variant {variant!r}; choose one of ['paper', 'official']")
    if not (radius >= 0 and steps >= 1):
        raise ValueError(f"radius={radius!r} must be >= 0 and steps={steps!r} >= 1")
    weight = rift_module(model, name).weight
    w0 = weight.detach().clone()
    bound = radius * torch.linalg.vector_norm(w0).item()          # ||dw||_2 <= bound
    needed_grad = weight.requires_grad
    weight.requires_grad_(True)
    with eval_mode(model):
        try:
            if base_loss is None:
                base_loss = robust_loss(model, x_adv, y, batch_size)
            if variant == "paper":
                dw = _paper_ascent(model, weight, w0, bound, x_adv, y, steps, lr, batch_size)
                _set_weight(weight, w0, dw)
                final = robust_loss(model, x_adv, y, batch_size)
            else:
                lr = 1.0 if lr is None else lr           # official: torch.optim.SGD(lr=1) on -CE
                final, dw = _official_ascent(model, weight, w0, bound, x_adv, y, steps, lr, batch_size, generator)
        finally:
            with torch.no_grad():
                weight.copy_(w0)                         # the exact saved tensor: bit-identical restore
            weight.requires_grad_(needed_grad)
    return final - base_loss, dw


def module_robust_criticality(model, x_adv, y, radius=0.1, steps=10, lr=None, variant="paper", batch_size=512,
                              modules=None, progress=None, generator=None):
    """MRC (Def. 3.1) of every Conv2d/Linear module (or of `modules`), on fixed (x_adv, y).

    The relative radius 0.1 (RiFT's epsilon) and T = 10 steps (RiFT, Sec. 3.2 and Alg. 1); batch_size
    512 is the official MRC loader's. x_adv is made once by the caller (`rift_adversarial_set`: PGD-10, CE, on training
    images). Returns {qualified name: MRC}; the model's state is unchanged and no .grad is left.
    `progress(i, n)` is called after each module.
    """
    valid = rift_modules(model)
    names = valid if modules is None else list(modules)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown module(s) {unknown}; RiFT modules (Conv2d/Linear) are {valid}")
    with eval_mode(model):
        base = robust_loss(model, x_adv, y, batch_size)
        mrc = {}
        for i, name in enumerate(names):
            mrc[name] = mrc_perturbation(model, name, x_adv, y, radius, steps, lr, variant, batch_size,
                                         generator, base_loss=base)[0]
            if progress is not None:
                progress(i + 1, len(names))
    return mrc


def non_robust_critical_module(mrc):
    """The non-robust-critical module: the one with the lowest MRC (Sec. 3.2); ties go to the first."""
    if not mrc:
        raise ValueError("empty MRC table")
    return min(mrc, key=mrc.get)


def finetune_module(model, name, split, epochs=10, lr=1e-3, weight_decay=5e-4, batch_size=128, generator=None,
                    progress=None, rank=0, world_size=1, average=None):
    """RiFT step 2: fine-tune only module `name` on clean training data; returns per-epoch mean loss.

    SGD, momentum 0.9, weight decay 5e-4, lr 1e-3 / 10 from epoch epochs // 2 on (RiFT, Sec. 4;
    the official MultiStepLR([epochs // 2])). Every other parameter is frozen and the model stays in
    eval mode, so no BatchNorm statistic moves (the official code fine-tunes in train mode):
    afterwards only the module's own tensors differ. requires_grad flags and mode are restored,
    no .grad is left. `progress(i, n)` counts batches over the whole run. Data parallel: as
    `run_epoch` (this rank's slice of each batch), with `average` for the gradients.
    """
    own = {id(p) for p in rift_module(model, name).parameters()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    milestones = (epochs // 2,) if epochs >= 2 else ()   # a 1-epoch run keeps lr
    losses = []
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
        with eval_mode(model):
            optimizer = make_optimizer(model, lr, weight_decay)
            for epoch in range(epochs):
                for group in optimizer.param_groups:
                    group["lr"] = step_lr(lr, epoch, milestones)
                overall = None if progress is None else (lambda i, n, e=epoch: progress(e * n + i, epochs * n))
                losses.append(run_epoch(model, optimizer, lambda m, o, x, y: natural_step(m, o, x, y, average),
                                        split, batch_size, generator, overall, rank, world_size))   # in eval mode
            optimizer.zero_grad(set_to_none=True)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return losses


def interpolate(state_a, state_b, alpha):
    """theta(alpha) = (1 - alpha) * theta_a + alpha * theta_b for floating entries (Sec. 3.3).

    Other entries (BatchNorm's num_batches_tracked) are copied from state_a. alpha = 0 and 1
    return copies of the endpoints exactly (the formula alone would give nan for inf entries).
    """
    if not (0.0 <= alpha <= 1.0):   # also rejects NaN
        raise ValueError(f"alpha={alpha!r} is outside the allowed range [0, 1]")
    if state_a.keys() != state_b.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(set(state_a) ^ set(state_b))[:3]}")
    out = {}
    for k, a in state_a.items():
        b = state_b[k]
        if not a.is_floating_point() or alpha == 0:
            out[k] = a.detach().clone()
        elif alpha == 1:
            out[k] = b.detach().clone()
        else:
            out[k] = (1 - alpha) * a.detach() + alpha * b.detach()
    return out


SELECT_SLACK = 1e-6   # points: absorbs float32 rounding in accuracies (1 of 1,000 examples is exactly 0.1)


def select_alpha(table, tolerance=0.1):
    """The paper's rule (Sec. 3.3): largest clean-accuracy gain over alpha = 0 whose PGD-10 accuracy
    drops by at most `tolerance` points; 0.0 when no alpha gains. Rows: {"alpha", "clean", "pgd10"}
    in percent. Ties in clean accuracy go to the higher PGD-10 accuracy, then the smaller alpha
    (the one nearer the adversarially trained weights)."""
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0")
    start = [r for r in table if r["alpha"] == 0]
    if not start:
        raise ValueError("the table needs the alpha = 0 row (the adversarially trained start)")
    clean0, pgd0 = start[0]["clean"], start[0]["pgd10"]
    allowed = [r for r in table
               if r["clean"] > clean0 and r["pgd10"] >= pgd0 - tolerance - SELECT_SLACK]
    if not allowed:
        return 0.0
    best = max(allowed, key=lambda r: (r["clean"], r["pgd10"], -r["alpha"]))
    return float(best["alpha"])


def rift_adversarial_set(model, split, size, eps=8 / 255, step_size=2 / 255, steps=10, batch_size=128, seed=0):
    """The fixed adversarial examples L_rob is measured on (Def. 3.1): PGD-10 (CE) of the first
    `size` images of `split` (training images, never the test split), made once from `model`.
    Returns (x_adv, y); the random starts come from `seed`."""
    x, y = next(batches(split.subset(slice(0, size)), size))
    gen = torch.Generator(x.device).manual_seed(seed)
    x_adv = torch.cat([pgd(model, xb, yb, eps, step_size, steps, generator=gen)
                       for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
    return x_adv, y


def rift_mrc(model, split, size, eps=8 / 255, step_size=2 / 255, mrc_radius=0.1, mrc_steps=10, variant="paper",
             batch_size=128, seed=0, progress=None):
    """RiFT step 1: MRC of every Conv2d/Linear module on `rift_adversarial_set` (`size` training
    images), lowest (the non-robust-critical module) first. `progress(i, n)` after each module."""
    x_adv, y = rift_adversarial_set(model, split, size, eps, step_size, 10, batch_size, seed)
    mrc = module_robust_criticality(model, x_adv, y, mrc_radius, mrc_steps, variant=variant, progress=progress,
                                    generator=torch.Generator().manual_seed(seed))
    return dict(sorted(mrc.items(), key=lambda kv: kv[1]))


@dataclass
class RiftResult:
    """What `rift` found: the module it fine-tuned, the tables behind the choices, the weights."""
    module: str        # the non-robust-critical module (or the one given)
    mrc: dict          # {module: MRC}, lowest first ({} when the module was given)
    alphas: list       # [{"alpha", "clean", "pgd10", "top_class_share"}] on the validation split
    alpha: float       # the selected interpolation factor
    state: dict        # theta(alpha), the selected model's state_dict


def rift(model, train_split, val_split, module=None, eps=8 / 255, step_size=2 / 255, mrc_size=1000,
         mrc_radius=0.1, mrc_steps=10, mrc_variant="paper", epochs=10, lr=1e-3, weight_decay=5e-4,
         batch_size=128, tolerance=0.1, seed=0, progress=None, rank=0, world_size=1):
    """RiFT (Zhu et al., ICCV 2023) on an adversarially trained `model`, which is left unchanged.

    1. MRC (Def. 3.1, Alg. 1) of every Conv2d/Linear module on `rift_adversarial_set` (`mrc_size`
       training images, PGD-10); the lowest is the non-robust-critical module (skipped when
       `module` is given).
    2. Fine-tune that module alone on clean training data (`finetune_module`: SGD, lr 1e-3 / 10
       at half-time, weight decay 5e-4, 10 epochs in the paper).
    3. theta(a) = (1 - a) theta_AT + a theta_FT for a in {0, 0.1, ..., 1} (`interpolate`); on
       `val_split` pick the largest clean gain whose PGD-10 accuracy drops by at most `tolerance`
       points (`select_alpha`).
    `progress(stage, i, n)` reports "MRC" and "fine-tune". Data parallel: every rank computes the
    MRC table and rank 0's choice is kept (broadcast); fine-tuning and the alpha sweep are sharded.
    Two radii: `eps` is the attacks' L-inf radius (8/255), `mrc_radius` MRC's relative L2 radius
    (RiFT's epsilon in Def. 3.1). alpha is RiFT's interpolation weight, not CURE's (Eq. 6).
    """
    if module is None:
        report = None if progress is None else (lambda i, n: progress("MRC", i, n))
        mrc = rift_mrc(model, train_split, mrc_size, eps, step_size, mrc_radius, mrc_steps, mrc_variant, batch_size,
                       seed, report)
        names = list(mrc)
        choice = torch.tensor([names.index(non_robust_critical_module(mrc))], device=train_split.y.device)
        broadcast_([choice], world_size)                   # one module on every rank: rank 0's
        module = names[int(choice)]
    else:
        rift_module(model, module)                         # a ValueError lists the valid names
        mrc = {}
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tuned = copy.deepcopy(model)
    report = None if progress is None else (lambda i, n: progress("fine-tune", i, n))
    finetune_module(tuned, module, train_split, epochs, lr, weight_decay, batch_size,
                    torch.Generator().manual_seed(seed), report, rank, world_size,
                    average=None if world_size == 1 else lambda grads: all_reduce_mean_(grads, world_size))
    probe, table = copy.deepcopy(model), []
    for alpha in RIFT_ALPHAS:                              # selection on the validation split, never test
        probe.load_state_dict(interpolate(start, tuned.state_dict(), alpha))
        v = evaluate(probe, val_split, ["pgd10"], eps, seed=seed, rank=rank, world_size=world_size)   # Sec. 5.1
        table.append(dict(alpha=alpha, clean=v["clean"], pgd10=v["pgd10"], top_class_share=v["top_class_share"]))
    alpha = select_alpha(table, tolerance)
    return RiftResult(module, mrc, table, alpha, interpolate(start, tuned.state_dict(), alpha))


# OOD accuracy (RiFT Sec. 5.1): CIFAR-10-C style corruptions (Hendrycks & Dietterich 2019), generated
# in appendix D or read from the published files: the fifteen test corruptions (CURE Fig. 9) and
# three of the four held-out validation corruptions ("extras"). All are generated but frost (below).
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "saturate")     # the extras generated here
FILE_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS + ("spatter",)       # the nineteen the published files hold
CORRUPTION_GROUPS = {   # CURE Appendix D.2 and Fig. 7: seventeen corruptions in four groups
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
# frost overlays photographs of frost (shipped with the CIFAR-10-C generator, not redistributable here):
# it is read from the files, never generated. Generated by default: CURE's seventeen but frost.
FILE_ONLY_CORRUPTIONS = ("frost",)
GENERATED_CORRUPTIONS = tuple(n for group in CORRUPTION_GROUPS.values() for n in group if n != "frost")


def corruption_groups(accuracy):
    """The mean accuracy of each group (noise, blur, weather, digital) over its corruptions in
    `accuracy` ({name: percent}); groups with none of theirs in it are left out."""
    out = {}
    for group, names in CORRUPTION_GROUPS.items():
        found = [accuracy[n] for n in names if n in accuracy]
        if found:
            out[group] = sum(found) / len(found)
    return out


def corruption_accuracy(model, split, names=None, severities=(1, 2, 3, 4, 5), batch_size=256, seed=0,
                        files=None):
    """Clean accuracy (percent) under corruptions: per corruption the mean over severities, "mean"
    over the corruptions, "groups" (`corruption_groups`), "severity" {name: {severity: accuracy}},
    and "n", the images behind each corruption's accuracy (all severities together).

    Without `files`, the corruptions of `split` are generated (seeded by `seed`, see
    `corruption_generator`; `names` default to GENERATED_CORRUPTIONS). With `files` (from
    `load_corrupted`: CIFAR-10-C, CIFAR-100-C or Tiny-ImageNet-C), its images are evaluated instead,
    moved to `split`'s device, at the severities loaded (`names` default to those loaded).
    """
    if files is None:
        names = list(GENERATED_CORRUPTIONS if names is None else names)
        unknown = [n for n in names if n not in _CORRUPTION_FNS]
        if unknown:
            raise ValueError(f"corruption(s) {unknown} cannot be generated (frost only from the CIFAR-10-C "
                             f"files); choose from {list(_CORRUPTION_FNS)}")
    else:
        names = [n for n in FILE_CORRUPTIONS if n in files] if names is None else list(names)
        missing = [n for n in names if n not in files]
        if missing:
            raise ValueError(f"corruption(s) {missing} not loaded; the files hold {sorted(files)}")

    def images(name, s):            # one (corruption, severity) at a time: the test split's size in memory
        if files is None:
            return corrupt_split(split, name, s, batch_size, corruption_generator(seed, name, s))
        return files[name][s].to(split.x.device)

    by_severity, counts = {}, {}
    for name in names:
        by_severity[name] = {}
        for s in (severities if files is None else files[name]):
            part = images(name, s)
            by_severity[name][s] = evaluate(model, part, attacks=(), batch_size=batch_size)["clean"]
            counts[name] = counts.get(name, 0) + len(part)
    result = {name: sum(accs.values()) / len(accs) for name, accs in by_severity.items()}
    result["mean"] = sum(result[name] for name in names) / len(names)
    result["groups"] = corruption_groups(result)
    result["severity"] = by_severity
    result["n"] = min(counts.values())
    return result


# =============================================================================
# 5. Evaluation: clean, PGD-20, PGD-100, CW-inf and AutoAttack accuracy; NRR (Eq. 9)
# =============================================================================

EVAL_ATTACKS = {  # name -> PGD arguments (step 2/255 unless given, random start; CW = PGD on the margin)
    "pgd10": dict(steps=10, loss="ce"),
    "pgd20": dict(steps=20, loss="ce"),
    "pgd100": dict(steps=100, loss="ce"),
    "cw": dict(steps=20, loss="cw"),
    # The official CURE evaluation (NeurAI-Lab/CURE `utilities/adv_utils.py`, as TRADES' official
    # one): 20 steps of 0.003, whatever eps. Its CW clamps the margin at a confidence of 50 logits,
    # which only stops moving examples already misclassified by that much.
    "pgd20_official": dict(steps=20, loss="ce", step_size=0.003),
    "cw_official": dict(steps=20, loss="cw", step_size=0.003),
}


def check_adversarial(x_adv, x, eps):
    """RobustBench's sanity checks: inside the eps-ball (with float slack), in [0, 1], no NaN."""
    assert not torch.isnan(x_adv).any(), "adversarial examples contain NaN"
    assert (x_adv - x).abs().max() <= eps + 1e-6, "adversarial examples leave the eps-ball"
    assert x_adv.min() >= 0 and x_adv.max() <= 1, "adversarial examples leave [0, 1]"


def percent(count, n):
    """100 * count / n from integers: 94.0, not float32's 93.99999976158142."""
    return 100 * int(count) / n if n else float("nan")


def batch_generator(seed, index, device):
    """The generator of the random start for batch `index`: the same whichever rank attacks it."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + index)


def evaluate(model, split, attacks=("pgd20",), eps=8 / 255, step_size=2 / 255, batch_size=256,
             autoattack=False, aa_size=None, aa_state_path=None, seed=0, progress=None, on_result=None,
             rank=0, world_size=1):
    """Accuracy in percent on `split`: "clean", one entry per attack, and "worst", the per-example
    worst case over every attack that covered the whole split; "top_class_share", the percentage
    of the clean predictions that fall on the most predicted class (see `collapsed`).

    `attacks` are names from EVAL_ATTACKS; each runs over the whole split before the next, and
    `on_result(result)` is called with the result so far after each, so a caller can save it.
    AutoAttack (standard, L-inf; see `autoattack_correct`, `aa_state_path` resumes it) runs last,
    on the first `aa_size` examples (all if None): "autoattack", with "n_autoattack" images. An
    attack that raises is recorded in "failed" ({name: "Type: message"}) and the others still run;
    "worst" then covers the attacks that finished. Accuracies are 100 * count / n from the
    integer "counts"; "n" is the split's size. The PGD random starts come from `batch_generator`
    (seed, batch index), so two models evaluated with one seed get the same starts.
    Data parallel: rank r attacks batches r, r + N, ...; the per-example flags are gathered after
    each attack, so every rank returns what one process returns.
    """
    unknown = [a for a in attacks if a not in EVAL_ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {sorted(EVAL_ATTACKS)}")
    if aa_size is not None and aa_size < 1:
        raise ValueError(f"aa_size={aa_size!r} must be >= 1 (or None for the whole split)")
    check_rank(rank, world_size)
    n = len(split)
    result, per_example = {"n": n, "counts": {}}, {}
    total = len(range(rank, math.ceil(n / batch_size), world_size)) * (1 + len(attacks))   # this rank's
    done = 0

    def correct_under(name):
        """Per-example correctness on the clean images, under one PGD attack, or under AutoAttack."""
        if name == "autoattack":
            part = split if aa_size is None or aa_size >= n else split.subset(slice(0, aa_size))
            x_all, y_all = next(batches(part, len(part)))
            return autoattack_correct(model, x_all, y_all, eps, batch_size, seed, aa_state_path, rank, world_size)

        def attack_mine(out):
            nonlocal done
            for i, (x, y) in enumerate(batches(split, batch_size)):
                if i % world_size != rank:
                    continue                        # another rank's batch
                if name != "clean":
                    x_adv = pgd(model, x, y, eps, generator=batch_generator(seed, i, x.device),
                                **{"step_size": step_size, **EVAL_ATTACKS[name]})
                    check_adversarial(x_adv, x, eps)
                    x = x_adv
                with torch.no_grad():
                    pred = model(x).argmax(1)          # the clean pass keeps the predictions themselves
                    out[i * batch_size:i * batch_size + len(y)] = pred if name == "clean" else pred == y
                done += 1
                if progress is not None:
                    progress(done, total)

        out = gather_shards(attack_mine, n, world_size, split.y.device)
        if name == "clean":
            result["top_class_share"] = percent(torch.bincount(out).max(), n) if n else float("nan")
            return out == split.y
        return out.bool()

    with eval_mode(model):
        for name in ("clean", *attacks, *(("autoattack",) if autoattack else ())):
            try:
                correct = per_example[name] = correct_under(name)
            except Exception as e:                  # keep what finished; name what failed
                result.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
            else:
                m = len(correct)
                result["counts"][name] = int(correct.sum())
                result[name] = percent(correct.sum(), m)
                if name != "clean" and m == n:     # the worst case over attacks of the whole split
                    worst = torch.stack([v for k, v in per_example.items() if k != "clean" and len(v) == n])
                    result["worst"] = percent(worst.all(0).sum(), n)
                if name == "autoattack":
                    result["n_autoattack"] = m
                    if m < n and "clean" in per_example:    # for NRR against AA on the same images
                        result["clean_autoattack"] = percent(per_example["clean"][:m].sum(), m)
            if on_result is not None:
                on_result(result)
    return result


def collapsed(result, num_classes, max_share=50.0, margin=5.0):
    """Whether an `evaluate` result shows a collapsed model: one class takes more than `max_share`
    percent of the clean predictions, or clean accuracy is within `margin` points of chance
    (100 / num_classes). A fine-tune that collapses has unlearned what it started from (for
    example a KL term minimised by flat logits at too large a learning rate)."""
    return result["top_class_share"] > max_share or result["clean"] <= 100.0 / num_classes + margin


def nrr(nat, rob):
    """Natural-Robustness Ratio (Eq. 9): the harmonic mean 2 * Nat * Rob / (Nat + Rob)."""
    return 0.0 if nat + rob == 0 else 2.0 * nat * rob / (nat + rob)


# =============================================================================
# 6. Models (CIFAR variants: 3x3 stem, no max-pool; inputs in [0, 1], normalised inside)
# =============================================================================

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std with per-channel buffers, so attacks and eps live in pixel space."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv-bn-relu-conv-bn + shortcut."""
    expansion = 1                                    # output channels = expansion * c_out

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # projection shortcut: 1x1 conv + BN
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block (He et al. 2016), for ResNet-50/101: 1x1 conv to c_out, 3x3 conv with
    the stride, 1x1 conv to 4 c_out (each followed by BN, ReLU but the last) + shortcut."""
    expansion = 4

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        c_wide = self.expansion * c_out
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv3x3(c_out, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv3, self.bn3 = nn.Conv2d(c_out, c_wide, 1, bias=False), nn.BatchNorm2d(c_wide)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_wide:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_wide, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_wide))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016b): bn-relu-conv-bn-relu-conv + shortcut."""
    expansion = 1

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), conv3x3(c_out, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # projection shortcut: 1x1 conv only, as in Rice et al.
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if len(self.shortcut) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


RESNET_STAGES = {   # depth -> (block, blocks per stage), He et al. 2016, Table 1
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """CIFAR ResNet-18/34/50/101: four stages of blocks at strides 1, 2, 2, 2; `width` is the first
    stage's channel count (64 in the papers); `preact` (depth 18 only) gives PreAct ResNet-18."""

    def __init__(self, num_classes=10, width=64, depth=18, preact=False, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        block, counts = RESNET_STAGES[depth]
        if preact:
            block = PreActBlock
        self.preact = preact
        self.normalize = Normalize(mean, std)
        self.conv1 = conv3x3(3, width)
        if not preact:
            self.bn1 = nn.BatchNorm2d(width)
        c_in = width
        for i, (count, stride) in enumerate(zip(counts, [1, 2, 2, 2])):
            c_out = width * 2 ** i
            blocks = [block(c_in if j == 0 else block.expansion * c_out, c_out, stride if j == 0 else 1)
                      for j in range(count)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = block.expansion * c_out
        if preact:
            self.bn = nn.BatchNorm2d(c_in)  # final BN-ReLU before pooling (Rice et al. 2020)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):                                     # x: (B, 3, H, W) in [0, 1]
        out = self.conv1(self.normalize(x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)        # (B, 8 * width * expansion)
        return self.linear(out)                               # logits (B, num_classes)


class WideBlock(nn.Module):
    """WRN block (Zagoruyko & Komodakis 2016, TRADES layout): bn-relu-conv-bn-relu-conv."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), conv3x3(c_out, c_out)
        self.equal_in_out = c_in == c_out and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal_in_out else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideStage(nn.Module):
    """`blocks` WRN blocks; the wrapper gives the `blockN.layer.<i>` names RiFT reports."""

    def __init__(self, blocks, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-34-10: depth 34 (5 blocks per stage); `width` is the first stage's channels (16 * 10)."""

    def __init__(self, num_classes=10, width=160, depth=34, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        blocks = (depth - 4) // 6
        self.normalize = Normalize(mean, std)
        self.conv1 = conv3x3(3, 16)
        self.block1 = WideStage(blocks, 16, width, 1)
        self.block2 = WideStage(blocks, width, 2 * width, 2)
        self.block3 = WideStage(blocks, 2 * width, 4 * width, 2)
        self.bn1 = nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1)
        return self.fc(out)


MODELS = {  # name -> (constructor, default width)
    "resnet18": (lambda **kw: ResNet(depth=18, **kw), 64),
    "preact_resnet18": (lambda **kw: ResNet(depth=18, preact=True, **kw), 64),
    "resnet34": (lambda **kw: ResNet(depth=34, **kw), 64),
    "resnet50": (lambda **kw: ResNet(depth=50, **kw), 64),     # CURE Table 6, with ResNet-18's settings
    "resnet101": (lambda **kw: ResNet(depth=101, **kw), 64),
    "wrn34_10": (lambda **kw: WideResNet(depth=34, **kw), 160),
}


def build_model(name, num_classes=10, width=None, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """A CIFAR model taking images in [0, 1]; `width` scales channels (None = the paper's)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    make, default_width = MODELS[name]
    width = default_width if width is None else width
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"width={width!r} must be a positive integer")
    return make(num_classes=num_classes, width=width, mean=mean, std=std)


def classifier_name(model):
    """Qualified name of the final Linear layer (`linear` or `fc`)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


# =============================================================================
# 7. Data: uint8 tensors on the training device, augmented in batches (no DataLoader)
# =============================================================================

@dataclass
class Split:
    """Images as uint8 (N, 3, H, W) and labels as int64 (N,), on one device."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self):
        return len(self.y)

    def to(self, device):
        return Split(self.x.to(device), self.y.to(device))

    def subset(self, index):
        return Split(self.x[index], self.y[index])


@dataclass
class Data:
    train: Split
    test: Split
    num_classes: int
    mean: tuple
    std: tuple


DATASETS = ("cifar10", "cifar100", "svhn", "tinyimagenet", "folder", "synthetic")


DATASET_STATS = {  # per-channel mean/std of the training images, used inside the model
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),   # ImageNet's, as RiFT's dataloader.py
}


def synthetic_data(num_train=2000, num_test=500, num_classes=10, size=32, seed=0):
    """A learnable, download-free image set: each class is a smooth random colour template.

    Images are template + per-image noise, shifted by up to 4 pixels and with random contrast,
    so a CNN has to learn the pattern; the template amplitude (about 0.2) is far above
    eps = 8/255, so robust features exist, yet a naturally trained model is fooled at that eps.
    """
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g) - 0.5, size=size + 4,
                              mode="bicubic", align_corners=False)       # (C, 3, size+4, size+4)

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        dx, dy = torch.randint(5, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(size))[:, None, :, None]           # (n, 1, size, 1)
        cols = (dx[:, None] + torch.arange(size))[:, None, None, :]           # (n, 1, 1, size)
        t = templates[y][torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        x = 0.5 + 0.4 * contrast * t + 0.12 * torch.randn(n, 3, size, size, generator=g)
        return Split((x.clamp(0, 1) * 255).round().to(torch.uint8), y)

    return Data(sample(num_train), sample(num_test), num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _to_split(images, labels):
    """uint8 NHWC numpy (or a list of PIL images) -> Split in NCHW."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack([np.asarray(i) for i in images])
                                              if isinstance(images, list) else images))
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return Split(x.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _image_folder_files(root):
    """ImageFolder layout root/<class>/<file>: the sorted class names, every file's path (class by
    class, in name order) and its label, the class's index."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(os.listdir(os.path.join(root, cls)))
        paths += [os.path.join(root, cls, f) for f in files]
        labels += [label] * len(files)
    return classes, paths, labels


def _decode(paths):
    """Every image file decoded once, as uint8 HWC RGB arrays (greyscale ones converted)."""
    from PIL import Image
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB")))   # some Tiny-ImageNet JPEGs are greyscale
    return images


def _read_image_folder(root):
    """ImageFolder layout root/<class>/<file>: decode every image once into uint8 NCHW."""
    classes, paths, labels = _image_folder_files(root)
    per_class = [labels.count(i) for i in range(len(classes))]
    return _to_split(_decode(paths), labels), classes, per_class


def folder_data(root, holdout_per_class=500):
    """ImageFolder root with train/ (and test/). Without test/, the last `holdout_per_class`
    images of every class (in file-name order) become the test split, the rest train."""
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"folder dataset: {train_dir!r} does not exist; expected ROOT/train/<class>/*")
    train, classes, per_class = _read_image_folder(train_dir)
    if os.path.isdir(test_dir):
        test = _read_image_folder(test_dir)[0]
    else:  # hold out the tail of each class: deterministic, class-balanced
        starts = np.cumsum([0] + per_class)
        is_test = torch.zeros(len(train), dtype=torch.bool)
        for s, n in zip(starts[:-1], per_class):
            is_test[s + n - min(holdout_per_class, n):s + n] = True
        train, test = train.subset(~is_test), train.subset(is_test)
    mean = tuple((train.x.float() / 255).mean(dim=(0, 2, 3)).tolist())
    std = tuple((train.x.float() / 255).std(dim=(0, 2, 3)).tolist())
    return Data(train, test, len(classes), mean, std)


def _tiny_imagenet_root(data_dir):
    """DIR itself or DIR/tiny-imagenet-200, whichever holds wnids.txt."""
    for root in (data_dir, os.path.join(data_dir, "tiny-imagenet-200")):
        if os.path.isfile(os.path.join(root, "wnids.txt")):
            return root
    raise FileNotFoundError(f"tinyimagenet: no wnids.txt in {os.path.abspath(data_dir)!r} or its tiny-imagenet-200/; "
                            f"pass the folder extracted from tiny-imagenet-200.zip (cs231n.stanford.edu)")


def tiny_imagenet_data(data_dir):
    """Tiny-ImageNet as distributed: 200 classes of 64x64 images, train/<wnid>/images/*.JPEG and the
    validation split val/images/*.JPEG labelled by val/val_annotations.txt (image, wnid, box), which
    is the test split here (the test images have no labels). Labels are the wnids in sorted order,
    as ImageFolder numbers train/. Reading val/ as an ImageFolder instead (RiFT's dataloader.py
    does) labels every validation image 0, since val/ holds one folder, images/."""
    root = _tiny_imagenet_root(data_dir)
    with open(os.path.join(root, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        folder = os.path.join(root, "train", w, "images")
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        if not files:
            raise FileNotFoundError(f"tinyimagenet: class {w} of wnids.txt has no images in {folder!r}")
        train_paths += [os.path.join(folder, name) for name in files]
        train_labels += [index[w]] * len(files)
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise FileNotFoundError(f"tinyimagenet: {annotations!r} not found (the validation labels)")
    test_paths, test_labels = [], []
    with open(annotations) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(f"tinyimagenet: {annotations!r} line {number}: expected 'FILE WNID ...' with a "
                                 f"wnid from wnids.txt, got {line.strip()!r}")
            path = os.path.join(root, "val", "images", fields[0])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tinyimagenet: {path!r}, listed on line {number} of {annotations!r}, "
                                        f"does not exist")
            test_paths.append(path)
            test_labels.append(index[fields[1]])
    mean, std = DATASET_STATS["tinyimagenet"]
    return Data(_to_split(_decode(train_paths), train_labels), _to_split(_decode(test_paths), test_labels),
                len(wnids), mean, std)


def torchvision_data(name, data_dir, download=True):
    """CIFAR-10, CIFAR-100 or SVHN through torchvision, decoded once into uint8 tensors."""
    import torchvision
    try:
        if name == "svhn":
            tr = torchvision.datasets.SVHN(data_dir, split="train", download=download)
            te = torchvision.datasets.SVHN(data_dir, split="test", download=download)
            train, test = Split(torch.from_numpy(tr.data), torch.from_numpy(tr.labels).long()), \
                Split(torch.from_numpy(te.data), torch.from_numpy(te.labels).long())
            num_classes = 10
        else:
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            tr, te = cls(data_dir, train=True, download=download), cls(data_dir, train=False, download=download)
            train, test = _to_split(tr.data, tr.targets), _to_split(te.data, te.targets)
            num_classes = len(tr.classes)
    except (RuntimeError, OSError) as e:  # no network, or a corrupt / missing local copy
        raise RuntimeError(
            f"could not load {name!r} from {os.path.abspath(data_dir)!r} ({e}). Download it on a machine "
            f"with internet access and pass the folder that holds it as data_dir "
            f"(torchvision's layout, e.g. DIR/cifar-10-batches-py), or use 'folder' or 'synthetic'.") from None
    mean, std = DATASET_STATS[name]
    return Data(train, test, num_classes, mean, std)


def load_data(name, data_dir="data", holdout_per_class=500, synthetic_size=(2000, 500), seed=0):
    """Load a dataset by name: one of DATASETS."""
    if name == "synthetic":
        return synthetic_data(*synthetic_size, seed=seed)
    if name == "folder":
        return folder_data(data_dir, holdout_per_class)
    if name == "tinyimagenet":
        return tiny_imagenet_data(data_dir)
    if name in ("cifar10", "cifar100", "svhn"):
        return torchvision_data(name, data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def split_validation(train, size, seed=0):
    """Carve a seeded random validation split of `size` images out of the training split."""
    if not 0 <= size < len(train):
        raise ValueError(f"validation size {size} must be in [0, {len(train)})")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[size:]), train.subset(order[:size])


def augment(x, generator, padding=None):
    """Random crop with `padding` pixels of zero padding and horizontal flip, for a uint8 batch (B, C, H, W).

    By default 4 pixels up to 32x32 (Madry et al., TRADES, CURE and RiFT on CIFAR), one eighth of the
    side above: 8 at Tiny-ImageNet's 64x64, as RiFT's loader (RandomCrop(64, padding=8)).
    """
    b, _, h, w = x.shape
    padding = max(4, max(h, w) // 8) if padding is None else padding
    padded = F.pad(x, (padding,) * 4)
    dy, dx = torch.randint(2 * padding + 1, (2, b), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]      # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]      # (B, 1, 1, W)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def batches(split, batch_size, generator=None, train=False, rank=0, world_size=1):
    """Yield (x, y) with x float in [0, 1]; with train=True shuffled, augmented and full batches only.

    Data parallel (train=True): every rank draws the same global batch of `batch_size` from the
    same `generator` and keeps rows [rank * b, (rank + 1) * b), b = batch_size / world_size, so N
    ranks together see exactly the batches one process sees.
    """
    check_rank(rank, world_size)
    if world_size > 1 and not train:
        raise ValueError("only training batches are split over ranks (`evaluate` shards whole batches)")
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be a multiple of world_size={world_size}")
    n = len(split)
    order = torch.randperm(n, generator=generator).to(split.y.device) if train else None
    stop = n - n % batch_size if train and n >= batch_size else n
    mine = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size] if train else slice(i, i + batch_size)
        x, y = split.x[idx], split.y[idx]
        if train:
            x = augment(x, generator)       # the whole batch: every rank consumes the same draws
            x, y = x[mine], y[mine]
        yield x.float().div_(255), y


# =============================================================================
# 8. Analyses (CURE Sections 3, 5 and 6, Appendices D-G): what the method is motivated and explained by
# =============================================================================

# --- Representation similarity: linear CKA of clean and adversarial features (Fig. 3, App. F.3) ---

def linear_cka(x, y):
    """CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), columns of X (n, p), Y (n, q) centred.

    Linear CKA of Kornblith et al., "Similarity of Neural Network Representations Revisited"
    (ICML 2019), Eq. 5 / their `feature_space_linear_cka` (biased HSIC; the 1/(n-1)^2 cancels).
    In float64. Equals <K, L>_F / (||K||_F ||L||_F) with K = X X^T, L = Y Y^T (centred), which is
    the form used when n is smaller than the feature count (cheaper, same value). In [0, 1];
    invariant to orthogonal transforms and isotropic scaling of either side, not to general
    invertible linear maps. NaN when either side is constant over the n rows (0 / 0).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need (n, p) and (n, q) matrices, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    if x.shape[0] < max(x.shape[1], y.shape[1]):      # Gram form: (n, n) products
        k, l = x @ x.T, y @ y.T
        return (k * l).sum() / (k.norm() * l.norm())
    return (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())


def hsic_unbiased(x, y):
    """HSIC_1(K, L) = [tr(K'L') + 1'K'1 1'L'1 / ((n-1)(n-2)) - 2/(n-2) 1'K'L'1] / (n(n-3)),
    K' = X X^T, L' = Y Y^T with zeroed diagonals (Song et al. 2012; Nguyen et al. 2021, Eq. 3).

    The unbiased linear HSIC of one minibatch of n >= 4 rows, in float64: the estimator the
    official CURE CKA script (`cka/utils/features.py` `calculate_hsic`) averages over minibatches.
    """
    n = x.shape[0]
    if n < 4 or y.shape[0] != n:
        raise ValueError(f"need the same n >= 4 rows in x and y, got {x.shape[0]} and {y.shape[0]}")
    k = x.double().flatten(1) @ x.double().flatten(1).T
    l = y.double().flatten(1) @ y.double().flatten(1).T
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    ones = k.new_ones(n)
    return ((k * l).sum() + k.sum() * l.sum() / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (ones @ k @ l @ ones)) / (n * (n - 3))


def block_names(model):
    """A ResNet's stem conv, its blocks (`layerX.Y`) and its classifier, in forward order."""
    blocks = [n for n, _ in model.named_modules() if n.count(".") == 1 and n.startswith("layer")]
    return ["conv1", *blocks, classifier_name(model)]


def layer_names(model):
    """Every Conv2d, BatchNorm2d and Linear module, in definition order: the official CKA script's
    "all" layers (it also hooks ReLU and pooling modules, which this code's ResNet-18 does functionally)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]


def block_features(model, x, names):
    """{name: output of module `name` on x, flattened to (n, -1)}, via forward hooks.

    The model runs in eval mode (restored afterwards) without gradient; the hooks are removed
    whatever happens. Hooked outputs are those of the modules themselves: "conv1" is the stem
    before its BatchNorm and ReLU, "layerX.Y" a BasicBlock after its final ReLU.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing}")
    out, handles = {}, []
    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(
                lambda m, inp, output, n=n: out.__setitem__(n, output.detach().flatten(1))))
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def cka_matrix(features_a, features_b):
    """[[CKA(A_i, B_j)]] = `linear_cka` of every pair of layers of two {name: (n, p)} feature dicts,
    on all n rows: the cross-layer map of Fig. 3, as {name_a: {name_b: float}}."""
    return {a: {b: float(linear_cka(fa, fb)) for b, fb in features_b.items()} for a, fa in features_a.items()}


def add_hsic_(sums, features_a, features_b):
    """Accumulate one minibatch's unbiased HSIC into `sums` (None at first): the cross terms
    HSIC_1(A_i, B_j) and the self terms HSIC_1(A_i, A_i), HSIC_1(B_j, B_j). Returns `sums`."""
    names_a, names_b = list(features_a), list(features_b)
    if sums is None:
        sums = dict(cross=np.zeros((len(names_a), len(names_b))), a=np.zeros(len(names_a)),
                    b=np.zeros(len(names_b)), names_a=names_a, names_b=names_b)
    for i, a in enumerate(names_a):
        sums["a"][i] += float(hsic_unbiased(features_a[a], features_a[a]))
        for j, b in enumerate(names_b):
            sums["cross"][i, j] += float(hsic_unbiased(features_a[a], features_b[b]))
    for j, b in enumerate(names_b):
        sums["b"][j] += float(hsic_unbiased(features_b[b], features_b[b]))
    return sums


def cka_from_hsic(sums):
    """Minibatch CKA_ij = mean_b HSIC_1(A_i, B_j) / sqrt(mean_b HSIC_1(A_i, A_i) mean_b HSIC_1(B_j, B_j))
    (Nguyen et al. 2021; the official CURE CKA script's estimator), from `add_hsic_`'s sums (the
    1 / batches of the means cancels). {name_a: {name_b: float}}."""
    cka = sums["cross"] / np.sqrt(np.outer(sums["a"], sums["b"]))
    return {a: {b: float(cka[i, j]) for j, b in enumerate(sums["names_b"])} for i, a in enumerate(sums["names_a"])}


def cka_clean_vs_adversarial(model, data, names, eps=8 / 255, step_size=2 / 255, steps=20, batch_size=256,
                             seed=0, cross=False, estimator="full"):
    """CKA(f_l(x), f_l(x_adv)) per layer l: how alike natural and adversarial representations are (Fig. 3).

    x_adv = PGD-`steps` on CE in the L-inf `eps` ball over the Split `data`, the random start of
    batch i from `batch_generator(seed, i, device)` (as `evaluate`). Returns {name: CKA} (the
    diagonal), or with cross=True the whole map {name_clean: {name_adv: CKA}} that Fig. 3 draws.
    estimator "full": exact linear CKA over every image (holds every feature in memory);
    "minibatch": unbiased HSIC summed batch by batch (constant memory; the official script's
    default), leaving out a last batch of fewer than 4 images, where HSIC_1 is undefined.
    """
    if estimator not in ("full", "minibatch"):
        raise ValueError(f"unknown estimator {estimator!r}; choose 'full' or 'minibatch'")
    clean, adv, sums = [], [], None
    for i, (x, y) in enumerate(batches(data, batch_size)):
        x_adv = pgd(model, x, y, eps, step_size, steps, loss="ce", generator=batch_generator(seed, i, x.device))
        features, features_adv = block_features(model, x, names), block_features(model, x_adv, names)
        if estimator == "full":
            clean.append(features)
            adv.append(features_adv)
        elif len(y) >= 4:
            sums = add_hsic_(sums, features, features_adv)
    if estimator == "full":
        matrix = cka_matrix({n: torch.cat([c[n] for c in clean]) for n in names},
                            {n: torch.cat([a[n] for a in adv]) for n in names})
    else:
        matrix = cka_from_hsic(sums)
    return matrix if cross else {n: matrix[n][n] for n in names}


# --- Minimum perturbation: the smallest L-inf eps at which PGD fools the model (Fig. 8, App. D.1) ---

def fooled(model, x, y, eps, steps, restarts, step_fraction, generator):
    """fooled_i = OR over `restarts` random starts of [argmax f(PGD_eps_i(x_i)) != y_i], step = step_fraction * eps_i."""
    out = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for _ in range(restarts):
        x_adv = pgd(model, x, y, eps, step_fraction * eps, steps, "ce", True, generator)
        with eval_mode(model), torch.no_grad():
            out |= model(x_adv).argmax(1) != y
    return out


def minimum_perturbation(model, x, y, eps_max, tol, steps, restarts, step_fraction, generator):
    """eps*_i = min {eps in [0, eps_max] : PGD_eps fools f on x_i}, by bisection to `tol` (Fig. 8).

    Per image, vectorised: every image still in play halves its own interval (lo, hi] in each of
    ceil(log2(eps_max / tol)) rounds, attacked at its midpoint by `fooled` (`restarts` random
    starts, `steps` steps of step_fraction * eps). Returns hi, float (n,) on x's device: an eps at
    which the attack succeeded, at most tol above the last eps at which it failed. Images
    misclassified clean get 0; images the attack never fools at eps_max get +inf. Assumes
    success is monotone in eps (true for a perfect attack; PGD's is only approximately so), and
    measures the attack as much as the model: a stronger attack can only lower the values.
    """
    if not (eps_max > 0 and tol > 0):
        raise ValueError(f"eps_max={eps_max!r} and tol={tol!r} must be > 0")
    with eval_mode(model), torch.no_grad():
        wrong = model(x).argmax(1) != y
    result = torch.full((len(y),), math.inf, dtype=torch.float64, device=x.device)
    result[wrong] = 0.0
    live = (~wrong).nonzero().squeeze(1)
    hi = torch.full((len(live),), float(eps_max), dtype=torch.float64, device=x.device)
    if len(live):
        ok = fooled(model, x[live], y[live], hi.to(x.dtype), steps, restarts, step_fraction, generator)
        live, hi = live[ok], hi[ok]
    lo = torch.zeros_like(hi)
    for _ in range(max(0, math.ceil(math.log2(eps_max / tol))) if len(live) else 0):
        mid = (lo + hi) / 2
        hit = fooled(model, x[live], y[live], mid.to(x.dtype), steps, restarts, step_fraction, generator)
        hi, lo = torch.where(hit, mid, hi), torch.where(hit, lo, mid)
    result[live] = hi
    return result.to(x.dtype)


# --- The layer-wise study: adversarial training of some blocks only (Sec. 3, Figs. 2, 4, App. G) ---

LAYERWISE_STEM = ("conv1", "bn1")    # ResNet-18's stem: trained in every U-b run of the official code


def layerwise_blocks(blocks, stem=True):
    """U-b -> the prefixes trained: digit i in 1..4 is `layer{i}`, 5 the classifier `linear` (App. G).

    "23" -> ("conv1", "bn1", "layer2", "layer3"): U-23 trains blocks 2 and 3 and keeps block 1,
    block 4 and "the final layer 5" (the classifier) frozen (App. G). The stem (conv1, bn1) is
    named nowhere in the paper; the official code (NeurAI-Lab/CURE `utilities/reinit_util.py`,
    `ReInit.freeze_layers`) never freezes it, so stem=True (the default) trains it too;
    stem=False freezes it (the literal reading of "the rest of the network frozen").
    """
    digits = str(blocks)
    if not digits or any(d not in "12345" for d in digits) or len(set(digits)) != len(digits):
        raise ValueError(f"blocks={blocks!r}: give distinct digits 1-4 (ResNet-18 blocks) and 5 (classifier)")
    chosen = tuple("linear" if d == "5" else f"layer{d}" for d in sorted(digits))
    return (LAYERWISE_STEM if stem else ()) + chosen


def _under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_all_but(model, trainable_prefixes):
    """requires_grad = [name starts with a prefix] for every parameter; returns the trainable names.

    A prefix matches whole name components ("layer1" is not "layer10"); one that matches no
    parameter is an error. The optimiser must then be built over the trainable parameters
    (`make_optimizer` does). BatchNorm running statistics are buffers: see `freeze_bn_`.
    """
    names = [n for n, _ in model.named_parameters()]
    unused = [p for p in trainable_prefixes if not any(_under(n, [p]) for n in names)]
    if unused:
        raise ValueError(f"prefixes {unused} match no parameter")
    for n, p in model.named_parameters():
        p.requires_grad_(_under(n, trainable_prefixes))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _force_eval(module, inputs):
    module.training = False


def freeze_bn_(model, trainable_prefixes):
    """Every BatchNorm outside the prefixes runs in eval mode: running statistics used, never updated.

    A forward pre-hook sets the module's `training` to False before each forward, so the freeze
    survives `model.train()` (which `train_epoch` calls, and `pgd`'s eval_mode restores).
    Returns the hook handles; `h.remove()` for each undoes it (the next model.train() then puts
    the modules back in train mode). Not the official layer-wise runs, whose frozen blocks' BN
    statistics keep adapting: an ablation for a strict freeze.
    """
    return [m.register_forward_pre_hook(_force_eval) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _under(n, trainable_prefixes)]


@torch.no_grad()
def reinitialize_(model, prefixes, generator=None):
    """The official re-initialisation of U-b's updated blocks (`ReInit.re_init_weights`, Fig. 2b).

    Conv weights under the prefixes: Kaiming uniform, fan_out, ReLU gain (bound sqrt(6 / fan_out));
    the classifier ("linear"): weight N(0, 0.01^2), bias 0. BatchNorm is left as trained
    (the official --reinit_bn is off by default). Fig. 11 is the same study without this call.
    """
    for n, m in model.named_modules():
        if not _under(n, prefixes):
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0.0, 0.01, generator=generator)
            m.bias.zero_()


# --- Gradient magnitudes (Fig. 6a) and the entries updated in each phase of training (Figs. 6b, 10) ---

def conv2_names(model):
    """The `layerX.Y.conv2.weight` parameters of a ResNet: each block's second convolution (Fig. 6a)."""
    return [n for n, _ in model.named_parameters() if n.startswith("layer") and n.endswith(".conv2.weight")]


def gradient_magnitudes(grads):
    """m_i = mean_j |g_ij| per tensor g_i, as one float32 (k,) tensor on the device (no host sync).

    A None gradient (a frozen tensor) counts 0. Fig. 6a plots it for each block's conv2, averaged
    over an epoch's steps (summed on the device, read once per epoch).
    """
    ref = next(g for g in grads if g is not None)
    out = torch.zeros(len(grads), dtype=torch.float32, device=ref.device)
    present = [i for i, g in enumerate(grads) if g is not None]
    norms = torch._foreach_norm([grads[i].float() for i in present], 1)
    out[present] = torch.stack(norms) / torch.tensor([grads[i].numel() for i in present], dtype=torch.float32,
                                                     device=ref.device)
    return out


def training_phase(epoch, epochs, phases=3):
    """The phase (0 = first third, 1 = middle, 2 = last) of 0-based `epoch` in a run of `epochs`."""
    return min(phases * epoch // epochs, phases - 1)


@torch.no_grad()
def count_updates_(counts, grads):
    """counts_i += [g_i != 0] entry-wise, in place on the device (int32): steps in which each entry
    was updated (the RGP mask kept its gradient). Reset (zero_) at each phase boundary."""
    for c, g in zip(counts, grads):
        c.add_(g != 0)
    return counts


def update_shares(counts_per_phase, steps_per_phase=None):
    """Per phase and masked tensor: updated = #{entries with count > 0} / n, never = #{count = 0} / n.

    counts_per_phase: {phase: {name: per-entry counts (or booleans)}}, from `count_updates_`.
    With steps_per_phase ({phase: steps}) also per_step = sum(counts) / (n * steps), the mean
    share updated per step (what `cure_mask_`'s `updated` gives). One host sync per phase.
    """
    out = {}
    for phase, counts in counts_per_phase.items():
        names = list(counts)
        ever = torch.stack([(counts[n] > 0).sum() for n in names]).tolist()
        total = torch.stack([counts[n].sum() for n in names]).tolist() if steps_per_phase else None
        out[phase] = {}
        for i, n in enumerate(names):
            numel = counts[n].numel()
            entry = {"updated": ever[i] / numel, "never": (numel - ever[i]) / numel}
            if steps_per_phase:
                entry["per_step"] = total[i] / (numel * steps_per_phase[phase])
            out[phase][n] = entry
    return out


###############################################################################
# APPENDIX: support code, not needed to follow the methods above.
# Checkpoints and RNG state, data-parallel collectives, the AutoAttack adapters, the CIFAR-10-C
# generator and the RobustBench zoo. The methods call into it; reading them does not need it.
###############################################################################


# =============================================================================
# A. Checkpoints and RNG state
# =============================================================================

def rng_state():
    """Every random number generator's state, so that a resumed run continues exactly."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path, write):
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`: a killed run
    leaves the old file or the new one, never half of one (os.replace is atomic on POSIX)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, **state):
    """torch.save `state` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_json(path, obj):
    """json.dump `obj` to `path` atomically (`atomic_write`), indented."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def load_state_dict_checked(model, state_dict, source="checkpoint", hint="check the architecture and its width"):
    """Load weights, turning an architecture mismatch into a one-line ValueError that ends with `hint`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else
                  f"shape of {wrong[0]}: {tuple(state_dict[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}")
        raise ValueError(f"{source} does not fit this model ({detail}); {hint}")
    model.load_state_dict(state_dict)


# =============================================================================
# B. Data parallel: N processes (torchrun) that compute what one process computes
# =============================================================================

# Every rank holds the whole model and draws the same global batch; it computes the gradients
# of its 1/N slice (`batches`), and the steps' `average` replaces them by the mean over the
# ranks before the update: the gradient of the global batch's mean loss (BatchNorm aside: each
# rank normalises with its slice's statistics). CURE averages its three gradients before the
# mask (`cure_step`). Evaluation shards whole batches and gathers per-example flags
# (`evaluate`). The functions below are the collectives; with world_size 1 they do nothing, so
# one process never touches torch.distributed.

def check_rank(rank, world_size):
    """A ValueError naming the values unless world_size >= 1 and 0 <= rank < world_size."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need an integer world_size >= 1 and "
                         f"0 <= rank < world_size")


def _check_group(world_size):
    """A ValueError unless torch.distributed's default group has `world_size` ranks (else the means
    would be divided by the wrong N)."""
    if world_size < 1 or dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size!r}, but the process group has {dist.get_world_size()} ranks")


def _flat_buckets(tensors):
    """The tensors grouped by dtype, each group with one flat (contiguous) copy of its entries."""
    groups = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return [(group, torch.cat([t.reshape(-1) for t in group])) for group in groups.values()]


def _unflatten_(group, flat):
    torch._foreach_copy_(group, [f.view(t.shape) for t, f in zip(group, flat.split([t.numel() for t in group]))])


def all_reduce_mean_(tensors, world_size):
    """t <- (1/N) sum_r t^(r), in place, for every tensor: one all-reduce per dtype of a flat bucket."""
    if world_size == 1:
        return
    _check_group(world_size)
    for group, flat in _flat_buckets(tensors):
        dist.all_reduce(flat)                 # the same bytes on every rank ...
        flat.div_(world_size)                 # ... and the same division: ranks stay bit-identical
        _unflatten_(group, flat)


def broadcast_(tensors, world_size, src=0):
    """t <- t^(src), in place, for every tensor: one broadcast per dtype of a flat bucket."""
    if world_size == 1:
        return
    _check_group(world_size)
    for group, flat in _flat_buckets(tensors):
        dist.broadcast(flat, src)
        _unflatten_(group, flat)


def gradient_averager(model, world_size):
    """The steps' `average` for `model` on `world_size` ranks (None for one): it replaces the
    gradients handed to it, and the model's floating buffers (BatchNorm statistics, so that every
    rank keeps the same ones), by their means over the ranks, in one all-reduce per dtype."""
    check_rank(0, world_size)
    if world_size == 1:
        return None
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return lambda tensors: all_reduce_mean_([*tensors, *buffers], world_size)


def mean_over_ranks(value, world_size):
    """The mean over the ranks of a 0-d tensor (a loss): a new tensor, the input untouched."""
    value = value.detach().clone()
    all_reduce_mean_([value], world_size)
    return value


def gather_shards(work, m, world_size, device):
    """Run `work(out)`, which fills this rank's entries of `out` (int32, (m,), zeros elsewhere),
    and sum `out` over the ranks: every rank gets every entry. An exception on one rank is raised
    on all of them (after the all-reduce, so no rank is left waiting in it)."""
    if world_size > 1:
        _check_group(world_size)
    out = torch.zeros(m + 1, dtype=torch.int32, device=device)   # the last entry counts failed ranks
    error = None
    try:
        work(out[:m])
    except Exception as e:
        if world_size == 1:
            raise
        error, out[m] = e, 1
    if world_size > 1:
        dist.all_reduce(out)
        if error is not None:
            raise error
        if out[m]:
            raise RuntimeError(f"{int(out[m])} other rank(s) failed here; see their messages")
    return out[:m]


# =============================================================================
# C. AutoAttack: the two packages' APIs, attack by attack, resumable
# =============================================================================

AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")   # Croce & Hein 2020, version "standard"


def autoattack_package():
    """Name of the importable AutoAttack package: "autoattack" (the official one, installed from
    GitHub) or "pyautoattack" (its PyPI release); None when neither imports."""
    for name in ("autoattack", "pyautoattack"):
        try:
            __import__(name)
            return name
        except ImportError:
            pass
    return None


def autoattack_available():
    """True when an AutoAttack package can be imported (see `autoattack_package`)."""
    return autoattack_package() is not None


def autoattack_one(model, x, y, eps, attack, seed=0, batch_size=256):
    """Adversarial examples of one attack of AutoAttack's standard L-inf ensemble.

    Drives whichever package imports through its own API (the two differ in keyword names and
    return values). The attack keeps its standard-version settings; inputs are made contiguous
    (pyautoattack's APGD-T calls .view on the input gradient) and the device is x's.
    """
    if attack not in AUTOATTACK_STANDARD:
        raise ValueError(f"unknown AutoAttack attack {attack!r}; choose one of {list(AUTOATTACK_STANDARD)}")
    package = autoattack_package()
    if package is None:
        raise ImportError("AutoAttack is not installed: pip install pyautoattack")
    x, y = x.contiguous(), y.contiguous()
    if package == "autoattack":
        from autoattack import AutoAttack
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, verbose=False,
                               device=x.device)
        adversary.attacks_to_run = [attack]
        return adversary.run_standard_evaluation(x, y, bs=batch_size)
    from pyautoattack import AutoAttack
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=x.device)
    adversary.attacks_to_run = [attack]
    return adversary.run_standard_evaluation(x, y, batch_size=batch_size)[0]


def autoattack_correct(model, x, y, eps, batch_size=256, seed=0, state_path=None, rank=0, world_size=1):
    """Per-example correctness (bool, (N,)) under AutoAttack, standard version, L-inf.

    The four attacks run in order, each only on the examples that every earlier one failed to
    fool, as AutoAttack's standard version does. With `state_path` the flags are saved (JSON,
    atomically) after every batch, and a call with the same path continues an interrupted run
    where it stopped. (pyautoattack 0.2.0's own `state_path` cannot resume: its restore branch
    leaves `y_adv` unbound.) The model must be in eval mode.
    Data parallel: the pending examples go in rounds of one batch per rank, and the flags are
    gathered after each round, so every batch is the one a single process would attack; every
    rank reads `state_path`, rank 0 alone writes it.
    """
    check_rank(rank, world_size)
    n, device = len(y), y.device
    fresh = dict(n=n, eps=eps, seed=seed, labels=y.tolist(), done=[], pending=None, flags=None)
    state = fresh
    if state_path is not None and os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if any(state.get(k) != fresh[k] for k in ("n", "eps", "seed", "labels")):
            raise ValueError(f"AutoAttack state {state_path!r} belongs to another evaluation "
                             f"(examples, eps or seed differ); delete it to start over")

    def save():
        if state_path is not None and rank == 0:
            save_json(state_path, state)

    def clean(out):                        # this rank's batches of the clean forward
        for i in range(rank, math.ceil(n / batch_size), world_size):
            part = slice(i * batch_size, (i + 1) * batch_size)
            with torch.no_grad():
                out[part] = model(x[part]).argmax(1) == y[part]

    if state["flags"] is None:
        state["flags"] = gather_shards(clean, n, world_size, device).bool().tolist()
        save()
    flags = torch.tensor(state["flags"], dtype=torch.bool, device=device)
    for attack in AUTOATTACK_STANDARD:
        if attack in state["done"]:
            continue
        if state["pending"] is None:       # this attack starts: every example still robust
            state["pending"] = flags.nonzero().flatten().tolist()
        while state["pending"]:
            chunk = state["pending"][:batch_size * world_size]     # one batch per rank

            def attack_mine(out):
                mine = slice(rank * batch_size, (rank + 1) * batch_size)
                idx = torch.tensor(chunk[mine], dtype=torch.long, device=device)
                if len(idx):
                    x_adv = autoattack_one(model, x[idx], y[idx], eps, attack, seed, batch_size)
                    check_adversarial(x_adv, x[idx], eps)
                    with torch.no_grad():
                        out[mine] = model(x_adv).argmax(1) == y[idx]

            still = gather_shards(attack_mine, len(chunk), world_size, device).bool()
            flags[torch.tensor(chunk, device=device)] &= still
            state["flags"], state["pending"] = flags.tolist(), state["pending"][len(chunk):]
            save()
        state["done"].append(attack)
        state["pending"] = None
        save()
    return flags


# =============================================================================
# D. CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019), generated in torch; the .npy files
# =============================================================================

# Severity parameters are those of the CIFAR-10-C generator, hendrycks/robustness
# ImageNet-C/create_c/make_cifar_c.py, severities 1..5, in pixels of a 32x32 image; at other sizes
# (Tiny-ImageNet's 64x64) they are used as they are, except elastic_transform's, which the generator
# writes as fractions of the side (make_tinyimagenet_c.py's own, stronger parameters are not used).
# Images are float (B, 3, H, W) in [0, 1]. Sixteen corruptions are generated; frost is not (see
# FILE_ONLY_CORRUPTIONS), nor spatter: both are read from the published files.

CORRUPTION_PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),    # std of the added N(0, c^2)
    "shot_noise": (500, 250, 100, 75, 50),                # photons per unit intensity: Poisson(x c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),      # share of values set to 0 or 1 (salt and pepper)
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),      # std of the multiplicative x + x N(0, c^2)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),  # (disk radius, alias sigma), px
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),           # sigma, px
    "fog": ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)),          # (haze, fractal decay)
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),            # added to the HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),              # factor on the distance from the channel mean
    "saturate": ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),       # HSV S -> S a + b
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),            # size factor of the box down- and up-scale
    "jpeg_compression": (80, 65, 58, 50, 40),             # JPEG quality
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    # (Gaussian sigma px, max shift d px, shuffle rounds); shifts are drawn from -d..d-1
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    # (ImageMagick radius px, sigma px); angle ~ U(-45, 45) degrees per image
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
    # zooms np.arange(1, c, 0.01), as float steps give them: 7, 12, 16, 21, 26 factors from 1.00
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    # (flake mean, flake std, zoom, threshold, motion radius px, motion sigma px, image weight)
    "elastic_transform": ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                          (0.1, 0.03, 0.03)),
    # (displacement scale alpha, its smoothing sigma, affine jitter), fractions of the side (x 32 px)
}


def _rand(shape, generator, device, normal=False):
    """Uniform [0, 1) or N(0, 1) numbers drawn on the generator's own device, then moved to `device`:
    a CPU generator gives the same corruption on CPU and GPU."""
    where = generator.device if generator is not None else torch.device("cpu")
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=where).to(device)


def _gaussian_noise(x, c, generator):
    return x + c * _rand(x.shape, generator, x.device, normal=True)


def _shot_noise(x, c, generator):
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.poisson((x * c).to(where), generator=generator).to(x.device) / c


def _impulse_noise(x, c, generator):
    """skimage random_noise(mode="s&p"): each value is hit with probability c, then salt or pepper 50/50."""
    hit, salt = _rand(x.shape, generator, x.device) < c, _rand(x.shape, generator, x.device) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _speckle_noise(x, c, generator):
    return x + x * c * _rand(x.shape, generator, x.device, normal=True)


def _filter(x, kernel, pad_mode):
    """Per-channel 2-D correlation of x (B, C, H, W) with a square odd kernel (k, k), same size out."""
    p, ch = kernel.shape[-1] // 2, x.shape[1]
    weight = kernel.to(x.device, x.dtype).expand(ch, 1, *kernel.shape)
    return F.conv2d(F.pad(x, (p, p, p, p), mode=pad_mode), weight, groups=ch)


def _gaussian_1d(sigma, radius):
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def defocus_kernel(radius, alias_sigma):
    """make_cifar_c's `disk`: pixels with x^2 + y^2 <= r^2, normalised, then a 3x3 Gaussian of
    `alias_sigma` (cv2.GaussianBlur) against aliasing. Cropped to its support (2 floor(r) + 3)^2."""
    s = int(radius) + 1
    t = torch.arange(-s, s + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    gauss = _gaussian_1d(alias_sigma, 1)
    return F.conv2d(disk[None, None], (gauss[:, None] * gauss[None, :])[None, None], padding=1)[0, 0].float()


def _defocus_blur(x, c, generator):
    return _filter(x, defocus_kernel(*c), "reflect")      # cv2.filter2D's default border is reflect-101


def _gaussian_blur(x, c, generator):
    """skimage.filters.gaussian: truncate 4 sigma, 'nearest' border; separable."""
    k = _gaussian_1d(c, int(4.0 * c + 0.5)).float()
    return _filter(x, k[:, None] * k[None, :], "replicate")


def plasma_fractal(batch, size, decay, generator=None, device="cpu"):
    """Diamond-square height maps (B, size, size) in [0, 1], size a power of two (make_cifar_c's
    `plasma_fractal`): midpoints are the mean of 4 neighbours (wrapping) plus uniform noise of
    amplitude w^2, w = 100 divided by `decay` per level (larger decay = smoother haze)."""
    m = torch.zeros(batch, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def noisy_mean(total):
        return total / 4 + wibble * wibble * (2 * _rand(total.shape, generator, "cpu").double() - 1)

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        square = corners + corners.roll(-1, 1)
        m[:, half::step, half::step] = noisy_mean(square + square.roll(-1, 2))          # square centres
        centres = m[:, half::step, half::step]
        m[:, ::step, half::step] = noisy_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, half::step, ::step] = noisy_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    m -= m.amin((1, 2), keepdim=True)
    return (m / m.amax((1, 2), keepdim=True)).float().to(device)


def _fog(x, c, generator):
    strength, decay = c
    b, _, h, w = x.shape
    size = 2 ** math.ceil(math.log2(max(h, w, 2)))           # diamond-square needs a power of two
    haze = plasma_fractal(b, size, decay, generator, x.device)[:, None, :h, :w]
    peak = x.amax((1, 2, 3), keepdim=True)                    # per image, before the haze
    return (x + strength * haze) * peak / (peak + strength)


def _brightness(x, c, generator):
    """HSV V -> clip(V + c): at fixed hue and saturation RGB scales with V, so rgb * V'/V (black
    pixels, S = 0, become grey V')."""
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x))


def _saturate(x, c, generator):
    """HSV S -> clip(S a + b) at fixed H, V: RGB = V - (S'/S) (V - rgb); a grey pixel (S = 0) has
    hue 0 in skimage, so it turns red: (V, V (1 - S'), V (1 - S'))."""
    a, b = c
    v, lo = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    delta = v - lo
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * a + b).clamp(0, 1)
    colour = v - (s_new * v / delta.clamp_min(1e-12)) * (v - x)      # S'/S = S' V / delta
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)
    return torch.where(delta > 0, colour, grey)


def _contrast(x, c, generator):
    mean = x.mean((2, 3), keepdim=True)                       # per image and channel
    return (x - mean) * c + mean


def box_resize_matrix(n_in, n_out):
    """PIL's Image.BOX resampling n_in -> n_out as an (n_out, n_in) matrix: output pixel j averages,
    with equal weights, the input pixels whose centres fall in its footprint (Pillow Resample.c)."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        centre = (j + 0.5) * scale
        for i in range(max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)):
            t = (i - centre + 0.5) / max(scale, 1.0)
            a[j, i] = 1.0 if -0.5 < t <= 0.5 else 0.0
    return a / a.sum(1, keepdim=True)


def _pixelate(x, c, generator):
    h, w = x.shape[-2:]
    sh, sw = max(int(h * c), 1), max(int(w * c), 1)
    rows = (box_resize_matrix(sh, h) @ box_resize_matrix(h, sh)).to(x.device, x.dtype)     # (H, H)
    cols = (box_resize_matrix(sw, w) @ box_resize_matrix(w, sw)).to(x.device, x.dtype)     # (W, W)
    return rows @ x @ cols.T


def _jpeg_compression(x, c, generator):
    """Save and reload every image as a quality-c JPEG with PIL, as make_cifar_c does (uint8, on the
    host; torchvision's encode_jpeg gives the same bytes but is deprecated since 0.29)."""
    import io
    from PIL import Image
    decoded = []
    for img in (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():  # (H, W, 3)
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, "JPEG", quality=int(c))
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


def glass_shuffle(x, rows, cols, max_delta):
    """One round of make_cifar_c's local shuffle, for all images at once: pixels (h, w), h and w from
    size - d down to d + 1, bottom-right first, each take the value the image holds at that moment
    at (rows[:, i, j], cols[:, i, j]) = (h, w) + its shift.

    The official line `x[h, w], x[h', w'] = x[h', w'], x[h, w]` reads as a swap, but on the numpy
    (3,) views of an (H, W, 3) image it copies x[h', w'] into x[h, w] and leaves x[h', w'] as it
    was, so CIFAR-10-C's glass blur copies; done here likewise, in the same order."""
    x = x.clone()
    b = torch.arange(x.shape[0], device=x.device)
    d, (h, w) = max_delta, x.shape[-2:]
    if d == 1:
        # shifts are -1 or 0, so every source is visited after its target: the loop only ever
        # reads unchanged pixels, and one gather from the input does it
        x[..., 2:h, 2:w] = x[b[:, None, None], :, rows, cols].permute(0, 3, 1, 2).flip((-2, -1))
        return x
    for i, hh in enumerate(range(h - d, d, -1)):                         # d > 1: a later pixel can
        for j, ww in enumerate(range(w - d, d, -1)):                     # read one already written
            x[:, :, hh, ww] = x[b, :, rows[:, i, j], cols[:, i, j]]
    return x


def _glass_blur(x, c, generator):
    """skimage Gaussian blur (truncate 4, 'nearest' border), truncation to 8 bits (np.uint8), `rounds`
    of glass_shuffle, the same blur again. Shifts (dx, dy) are uniform on -d..d-1 like
    np.random.randint(-d, d) (for d = 1: -1 or 0, so pixels come from above/left only)."""
    sigma, d, rounds = c
    b, _, h, w = x.shape
    x = torch.floor(_gaussian_blur(x, sigma, None) * 255) / 255             # np.uint8 truncates
    shifts = (torch.floor(_rand((rounds, 2, b, h - 2 * d, w - 2 * d), generator, x.device) * 2 * d) - d).long()
    grid = torch.arange(h - d, d, -1, device=x.device)[:, None], torch.arange(w - d, d, -1, device=x.device)
    for dx, dy in shifts:
        x = glass_shuffle(x, grid[0] + dy, grid[1] + dx, d)
    return _gaussian_blur(x, sigma, None)


def motion_taps(radius, sigma, angles):
    """ImageMagick's MotionBlurImage taps: width = 2 ceil(radius) + 1 weights exp(-i^2 / 2 sigma^2),
    i = 0..width-1, normalised (one-sided: the Gaussian starts at the pixel itself); tap i reads the
    pixel i steps along the angle, (dx, dy) = (ceil(i cos a - 1/2), ceil(i sin a - 1/2)), y down.
    Returns weights (width,) float64 and integer dx, dy (B, width) for angles (B,) in degrees."""
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-i ** 2 / (2 * sigma ** 2))
    a = torch.deg2rad(angles.detach().cpu().double())[:, None]
    dx, dy = torch.ceil(i * torch.cos(a) - 0.5), torch.ceil(i * torch.sin(a) - 0.5)
    return weights / weights.sum(), dx.long(), dy.long()


def motion_blur_at(x, radius, sigma, angles):
    """Blur image b along angles[b] degrees: out(p) = sum_i w_i x(p + offset_i), reading past the
    border the nearest edge pixel (ImageMagick's default 'edge' virtual pixels). A gather per tap,
    not a (2 width - 1)^2 convolution per image."""
    weights, dx, dy = motion_taps(radius, sigma, angles)
    b, ch, h, w = x.shape
    rows, cols = torch.arange(h), torch.arange(w)
    flat, out = x.flatten(2), torch.zeros_like(x.flatten(2))
    for i, weight in enumerate(weights.tolist()):
        r = (rows + dy[:, i, None]).clamp(0, h - 1)                   # (B, H): clamp = edge pixels
        q = (cols + dx[:, i, None]).clamp(0, w - 1)                   # (B, W)
        index = (r[:, :, None] * w + q[:, None, :]).flatten(1).to(x.device)
        out += weight * flat.gather(2, index[:, None].expand(-1, ch, -1))
    return out.view_as(x)


def _motion_blur(x, c, generator):
    """Wand's MotionImage.motion_blur(radius, sigma, angle ~ U(-45, 45)) per image. Differs: float in
    and out (ImageMagick reads and writes 8-bit PNG; `corrupt_split` rounds at the end)."""
    angles = -45 + 90 * _rand((x.shape[0],), generator, "cpu")
    return motion_blur_at(x, *c, angles)


def clipped_zoom(x, factor):
    """make_cifar_c's clipped_zoom on (B, C, H, W): crop the centre ceil(n / factor) pixels, zoom
    them to round(m * factor) with scipy.ndimage.zoom(order=1), which samples input o (m - 1) / (M - 1)
    for output o, i.e. bilinear with align_corners=True, and cut the centre n. Same numbers as scipy
    up to float32 rounding; H and W are cropped apart (the official assumes square images)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    zh, zw = round(ch * factor), round(cw * factor)                   # scipy's int(round(m * factor))
    zoomed = F.interpolate(x[..., top:top + ch, left:left + cw], size=(zh, zw), mode="bilinear",
                           align_corners=True)
    top, left = (zh - h) // 2, (zw - w) // 2
    return zoomed[..., top:top + h, left:left + w]


def _zoom_blur(x, c, generator):
    """Mean of the image and its clipped zooms by 1.00, 1.01, ... below c (so the image counts twice:
    once itself, once as the zoom by 1.00), as make_cifar_c. No randomness."""
    factors = np.arange(1, c, 0.01)                                    # the official's float steps
    out = x.clone()
    for factor in factors.tolist():
        out += clipped_zoom(x, factor)
    return out / (len(factors) + 1)


def _snow(x, c, generator):
    """make_cifar_c's snow: a flake layer N(mean, std^2) per pixel, clipped_zoom, values below the
    threshold set to 0, stored as an 8-bit grey image (floor), motion-blurred at an angle
    U(-135, -45) and read back as 8 bits (rounded); the image is brightened to keep*x + (1 - keep) *
    max(x, 1.5 grey + 0.5), grey = 0.299 R + 0.587 G + 0.114 B (cv2 RGB2GRAY), and the layer added
    twice, as is and rotated 180 degrees. Differs: the motion blur is `motion_blur_at`'s."""
    mean, std, zoom, threshold, radius, sigma, keep = c
    b, _, h, w = x.shape
    flakes = clipped_zoom(mean + std * _rand((b, 1, h, w), generator, x.device, normal=True), zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes)
    flakes = torch.floor(flakes.clamp(0, 1) * 255) / 255                # PIL 'L' image from astype(uint8)
    angles = -135 + 90 * _rand((b,), generator, "cpu")
    flakes = torch.round(motion_blur_at(flakes, radius, sigma, angles) * 255) / 255
    grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])
    x = keep * x + (1 - keep) * torch.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + flakes.flip((-2, -1))


def _smooth_reflect(x, sigma, truncate):
    """skimage gaussian(mode='reflect', truncate) of each (H, W) map: separable Gaussian of radius
    int(truncate sigma + 0.5), the border continued by half-sample symmetry (d c b a | a b c d),
    scipy's 'reflect' (torch's own 'reflect' pad leaves the edge pixel out)."""
    radius, ch = int(truncate * sigma + 0.5), x.shape[1]
    k = _gaussian_1d(sigma, radius).to(x.device, x.dtype)
    for dim, shape in ((-1, (1, -1)), (-2, (-1, 1))):
        n = x.shape[dim]
        i = torch.arange(-radius, n + radius) % (2 * n)                # any radius, even > n
        x = x.index_select(dim, torch.where(i < n, i, 2 * n - 1 - i).to(x.device))
        x = F.conv2d(x, k.view(1, 1, *shape).expand(ch, 1, *shape), groups=ch)
    return x


def affine_warp(x, src, dst):
    """cv2.warpAffine(x, getAffineTransform(src, dst), borderMode=BORDER_REFLECT_101) for point
    triples src, dst (B, 3, 2) as (col, row): output p reads input M^-1 p, M the affine map taking
    src to dst, bilinearly; reflect-101 borders = grid_sample 'reflection' with align_corners=True
    (it mirrors about the edge pixels' centres). Differs: cv2 rounds sample positions to 1/32 pixel."""
    b, _, h, w = x.shape
    ones = torch.ones(b, 3, 1, dtype=torch.float64)
    inv = torch.linalg.solve(torch.cat([dst, ones], 2), src)            # [dst 1] @ inv = src: M^-1
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    at = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ inv[:, None]  # (B, H, W, 2) input (col, row)
    scale = torch.tensor([w - 1, h - 1], dtype=torch.float64).clamp_min(1)
    grid = (2 * at / scale - 1).to(x.device, x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def displace(x, shift):
    """scipy map_coordinates(order=1, mode='reflect'): output (row, col) reads (row + dy, col + dx)
    bilinearly, shift (B, 2, H, W) = (dx, dy) in pixels; 'reflect' is half-sample symmetric, which is
    grid_sample 'reflection' with align_corners=False (mirror about the image's outer edges)."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    at = torch.stack([xs, ys], -1).to(x.device, x.dtype) + shift.permute(0, 2, 3, 1)
    size = torch.tensor([w, h], device=x.device, dtype=x.dtype)
    return F.grid_sample(x, (2 * at + 1) / size - 1, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def _elastic_transform(x, c, generator):
    """make_cifar_c's elastic_transform: (1) a random affine_warp moving the points (cx + s, cy + s),
    (cx + s, cy - s), (cx - s, cy - s), s = side // 3, by U(-jitter, jitter) each coordinate;
    (2) displace by alpha times U(-1, 1) fields smoothed by a Gaussian (sigma, truncate 3,
    half-sample symmetric border). Both steps bilinear, as the official (cv2 INTER_LINEAR,
    map_coordinates order 1). Differs: (alpha, sigma, jitter) are fractions of min(H, W), so 32x32
    gets the official pixels and 64x64 twice them; see affine_warp for cv2's 1/32-pixel positions."""
    b, _, h, w = x.shape
    alpha, sigma, jitter = (v * min(h, w) for v in c)
    cx, cy, s = w // 2, h // 2, min(h, w) // 3
    src = torch.tensor([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], dtype=torch.float64)
    dst = src + jitter * (2 * _rand((b, 3, 2), generator, "cpu").double() - 1)
    x = affine_warp(x, src.expand(b, 3, 2), dst)
    shift = 2 * _rand((b, 2, h, w), generator, x.device) - 1           # channel 0: dx, 1: dy
    return displace(x, alpha * (_smooth_reflect(shift, sigma, 3.0) if sigma > 0 else shift))


_CORRUPTION_FNS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise, "defocus_blur": _defocus_blur, "gaussian_blur": _gaussian_blur,
    "fog": _fog, "brightness": _brightness, "contrast": _contrast, "saturate": _saturate,
    "pixelate": _pixelate, "jpeg_compression": _jpeg_compression, "glass_blur": _glass_blur,
    "motion_blur": _motion_blur, "zoom_blur": _zoom_blur, "snow": _snow, "elastic_transform": _elastic_transform,
}


def corrupt(x, name, severity, generator=None):
    """CIFAR-10-C corruption `name` at severity 1..5 of float images (B, 3, H, W) in [0, 1], on x's
    device, clipped to [0, 1]. Random draws come from `generator` (on its own device)."""
    if name not in _CORRUPTION_FNS:
        why = " (frost is read from the CIFAR-10-C files, not generated)" if name in FILE_ONLY_CORRUPTIONS else ""
        raise ValueError(f"unknown corruption {name!r}{why}; choose one of {list(_CORRUPTION_FNS)}")
    if severity not in (1, 2, 3, 4, 5) or isinstance(severity, bool):
        raise ValueError(f"severity={severity!r} must be an integer in 1..5")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
    c = CORRUPTION_PARAMS[name][int(severity) - 1]
    return _CORRUPTION_FNS[name](x, c, generator).clamp_(0, 1)


# Each corruption's seed offset; new corruptions are appended, so the others keep their images.
_SEED_ORDER = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "fog", "brightness", "contrast",
               "pixelate", "jpeg_compression", "speckle_noise", "gaussian_blur", "saturate", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "elastic_transform")


def corruption_generator(seed, name, severity):
    """The generator for one (corruption, severity): every model sees the same corrupted images, and
    one corruption's images do not depend on which others ran."""
    return torch.Generator().manual_seed(seed * 1000 + 10 * _SEED_ORDER.index(name) + severity)


def corrupt_split(split, name, severity, batch_size=256, generator=None):
    """A Split of corrupted images, rounded to uint8 like the CIFAR-10-C files (which truncate)."""
    out = []
    for x, _ in batches(split, batch_size):
        out.append(corrupt(x, name, severity, generator).mul_(255).round_().to(torch.uint8))
    return Split(torch.cat(out), split.y)


def load_corrupted(directory, names=None, severities=(1, 2, 3, 4, 5), num=None):
    """Read the corrupted test sets into {name: {severity: Split}} (`names` None: every one of
    FILE_CORRUPTIONS the folder holds), in either published layout:

    - CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, zenodo.org/record/2535967 and 3555552):
      `<name>.npy`, (50000, 32, 32, 3) uint8, 10,000 images per severity in order 1..5, labelled by
      `labels.npy`; memory-mapped, so only the rows taken are read. `num` takes the first ones.
    - Tiny-ImageNet-C (zenodo.org/record/2536630): `<name>/<severity>/<wnid>/*.JPEG`, labelled by
      the wnids' sorted order (as Tiny-ImageNet's training folders). `num` takes a seeded random
      subset of each severity, since the files are in class order.
    """
    if any(s not in (1, 2, 3, 4, 5) for s in severities):
        raise ValueError(f"severities={tuple(severities)!r} must be in 1..5")
    if num is not None and num < 1:
        raise ValueError(f"num={num!r} must be >= 1 (or None for all)")
    npy = os.path.isfile(os.path.join(directory, "labels.npy"))
    if names is None:
        names = [n for n in FILE_CORRUPTIONS if os.path.exists(os.path.join(directory, n + (".npy" if npy else "")))]
    if npy:
        return _load_npy_corrupted(directory, names, severities, num)
    if names and any(os.path.isdir(os.path.join(directory, n)) for n in names):
        return _load_jpeg_corrupted(directory, names, severities, num)
    raise FileNotFoundError(f"no corrupted test set in {directory!r}: expected labels.npy and <name>.npy "
                            f"(CIFAR-10-C, CIFAR-100-C) or <name>/<severity>/<wnid>/*.JPEG (Tiny-ImageNet-C)")


def _load_npy_corrupted(directory, names, severities, num):
    def path_of(stem):
        path = os.path.join(directory, f"{stem}.npy")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"corruption file {path!r} not found; download CIFAR-10-C or CIFAR-100-C "
                                    f"(zenodo.org/record/2535967, 3555552) and pass its folder")
        return path

    labels = np.load(path_of("labels"))
    out = {}
    for name in names:
        images = np.load(path_of(name), mmap_mode="r")
        if len(images) != len(labels) or len(images) % 5:
            raise ValueError(f"{path_of(name)!r} has {len(images)} images for {len(labels)} labels; "
                             f"expected 5 equal severity blocks")
        per = len(images) // 5
        take = per if num is None else min(num, per)
        out[name] = {s: _to_split(np.array(images[(s - 1) * per:(s - 1) * per + take]),   # read, writable
                                  labels[(s - 1) * per:(s - 1) * per + take]) for s in severities}
    return out


def _load_jpeg_corrupted(directory, names, severities, num):
    out = {}
    for name in names:
        out[name] = {}
        for s in severities:
            folder = os.path.join(directory, name, str(s))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"corruption folder {folder!r} not found; download Tiny-ImageNet-C "
                                        f"(zenodo.org/record/2536630) and pass its folder")
            _, paths, labels = _image_folder_files(folder)
            if num is not None and num < len(paths):
                keep = torch.randperm(len(paths), generator=torch.Generator().manual_seed(s))[:num].sort().values
                paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
            out[name][s] = _to_split(_decode(paths), labels)
    return out


# =============================================================================
# E. Models from the RobustBench zoo (optional: pip install -r requirements-zoo.txt)
# =============================================================================

# RiFT is post hoc: its natural input is a published adversarially trained model. RobustBench's CIFAR
# models take [0, 1] inputs and normalise inside, as this project's do, so every function below takes
# them as they are, and RiFT ranks their Conv2d/Linear modules under their own names (RobustBench's
# WideResNets: `block1.layer.3.conv2`, as the RiFT paper reports them).

ROBUSTBENCH_CLASSES = {"cifar10": 10, "cifar100": 100}   # the zoos used here (L-inf threat model)


class _MissingAutoAttack:
    """Stands in for the official AutoAttack's classes while robustbench is imported (see below)."""

    def __init__(self, *args, **kwargs):
        raise ImportError("robustbench.eval needs the official AutoAttack package: "
                          "pip install git+https://github.com/fra31/auto-attack")


def _resource_filename(module, path):
    """pkg_resources.resource_filename for an imported module: `path` next to its file."""
    return os.path.join(os.path.dirname(sys.modules[module].__file__), path)


def _importable(name):
    """True when `import name` can succeed (a None entry in sys.modules blocks an import)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


@contextlib.contextmanager
def _robustbench_stand_ins():
    """For the import of robustbench only: stand-ins for the two modules robustbench 1.1.1 imports
    but cannot count on, wherever one is missing.

    Its __init__ imports `autoattack` (the official package, not on PyPI; only its `benchmark()` uses
    it, which this project never calls) and `pkg_resources` (gone from setuptools >= 81; only its
    ImageNet loader uses it). Each stand-in is removed afterwards (whatever sys.modules held before is
    put back), so `autoattack_package()` still finds only what is really installed. The stand-in
    for `autoattack` is deliberately not pyautoattack: robustbench, and `autoattack_one` once it is
    importable as `autoattack`, would drive it with the official API's keywords, which it lacks.
    """
    stand_ins = {}
    if not _importable("autoattack"):
        for name in ("autoattack", "autoattack.state"):
            stand_ins[name] = types.ModuleType(name)
        stand_ins["autoattack"].AutoAttack = _MissingAutoAttack
        stand_ins["autoattack.state"].EvaluationState = _MissingAutoAttack
    if not _importable("pkg_resources"):
        stand_ins["pkg_resources"] = types.ModuleType("pkg_resources")
        stand_ins["pkg_resources"].resource_filename = _resource_filename
    before = {name: sys.modules[name] for name in stand_ins if name in sys.modules}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
        sys.modules.update(before)


def import_robustbench():
    """The `robustbench` package, imported with the stand-ins above; an ImportError naming the install
    command when it is not installed."""
    if not _importable("robustbench"):
        raise ImportError("RobustBench models need the robustbench package: pip install -r requirements-zoo.txt")
    with _robustbench_stand_ins(), warnings.catch_warnings():
        warnings.simplefilter("ignore")          # pkg_resources' and torch.jit's deprecation notices
        importlib.import_module("robustbench.utils")
    return sys.modules["robustbench"]


def robustbench_zoo(dataset):
    """RobustBench's L-inf registry for `dataset` (a key of ROBUSTBENCH_CLASSES): {name: entry}, each
    entry {"model": constructor of the architecture, "gdrive_id": where its checkpoint lives}."""
    if dataset not in ROBUSTBENCH_CLASSES:
        raise ValueError(f"unknown RobustBench dataset {dataset!r}; choose one of {list(ROBUSTBENCH_CLASSES)}")
    zoo = import_robustbench().model_zoo
    return zoo.model_dicts[zoo.enums.BenchmarkDataset(dataset)][zoo.enums.ThreatModel.Linf]


def robustbench_entry(name, dataset):
    """The registry entry of NAME in `dataset`'s L-inf zoo; a ValueError lists the zoo's names."""
    zoo = robustbench_zoo(dataset)
    if name not in zoo:
        raise ValueError(f"unknown RobustBench model {name!r} ({dataset}, Linf); choose one of {list(zoo)}")
    return zoo[name]


def robustbench_architecture(name, dataset):
    """NAME's architecture with fresh (random) weights, from RobustBench's registry, in eval mode:
    nothing is read or downloaded. Load a state dict saved from NAME (e.g. by `run.py rift`) into it."""
    return robustbench_entry(name, dataset)["model"]().eval()


def robustbench_files(name, dataset, model_dir="models"):
    """The checkpoint file(s) robustbench.utils.load_model reads for NAME, in RobustBench's layout
    MODEL_DIR/<dataset>/Linf/NAME.pt (ensembles: NAME.pt_m0.pt, NAME.pt_m1.pt, ...); [] for the
    entries timm fetches from the Hugging Face hub itself."""
    gdrive_id = robustbench_entry(name, dataset)["gdrive_id"]
    path = os.path.join(model_dir, dataset, "Linf", f"{name}.pt")
    if isinstance(gdrive_id, list):
        return [f"{path}_m{i}.pt" for i in range(len(gdrive_id))]
    return [] if gdrive_id is None else [path]


def _first_line(error):
    """`TypeName: first line of the message` (cut at 120 characters), for one-line errors."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_robustbench_model(name, dataset, model_dir="models"):
    """NAME from RobustBench's L-inf zoo for `dataset`, in eval mode, by robustbench.utils.load_model.

    The checkpoint is read from `robustbench_files` when it is there (nothing is downloaded), else
    robustbench downloads it there; when that fails (no network), a FileNotFoundError says which file
    to put where. Zoo models take [0, 1] inputs and normalise inside, like `build_model`'s.
    """
    files = robustbench_files(name, dataset, model_dir)              # also checks the name
    load_model = import_robustbench().utils.load_model
    try:
        with contextlib.redirect_stdout(sys.stderr):                  # its download notices are not our output
            return load_model(name, model_dir, dataset, "Linf").eval()
    except Exception as e:            # gdown, requests, timm and torch.load fail in many types
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"RobustBench model {name!r}: {', '.join(missing)} does not exist and downloading it failed "
                f"({_first_line(e)}); put the checkpoint file there (RobustBench's layout "
                f"MODEL_DIR/{dataset}/Linf/{name}.pt)") from None
        if not files:
            raise RuntimeError(f"RobustBench model {name!r} is fetched by timm from the Hugging Face hub and "
                               f"that failed ({_first_line(e)}); run once with network access") from None
        raise RuntimeError(f"RobustBench model {name!r}: could not load {', '.join(files)} "
                           f"({_first_line(e)})") from None
