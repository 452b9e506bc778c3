"""Tests for robust_ft, kernels and run.py.

Every loss and mask is checked against an independent, hand-written computation of its equation;
invariants (eps-ball, [0, 1], mode restored, state unchanged) are asserted directly. Where it can, a
test compares the code with a computation written here (hand-written losses, separate autograd
passes, NumPy, functional re-implementations), not with the code itself; many such tests were
checked to fail on a named, plausible wrong implementation that the rest of the file lets through.
Small generated data only: nothing here needs a download or a dataset on disk.

The sections are robust_ft.py's, in its order (1-8, then the appendix A-E), then kernels.py's (the
Triton kernels), then run.py's (the command line). Run with

    TRITON_INTERPRET=1 python -m pytest -q test_robust_ft.py
"""
import argparse
import ast
import colorsys
import contextlib
import copy
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU, kernels.py's tests run the Triton interpreter on the CPU (the README's command sets
# it too). With one, and TRITON_INTERPRET unset, the `cuda` tests compile the kernels for the card.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS for the cuda tests
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import kernels
import robust_ft as rf
import run

try:                        # kernels.py runs without triton (the plain path): its tests then skip
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    InterpretedFunction = None

EPS = 8 / 255


# Helpers used in several sections (a section's own helpers are in it)

def randomise_bn(model, seed=0):
    """Random BatchNorm running statistics and affine parameters, so that no BN is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model


def tiny_model(width=4, seed=0, name="resnet18", classes=10, mean=rf.CIFAR10_MEAN, std=rf.CIFAR10_STD,
               random_bn=False):
    """A narrow `name` (width: channels of the first stage), seeded; with random_bn, random BatchNorm
    statistics and affine parameters (`randomise_bn`), so that no BatchNorm is the identity."""
    torch.manual_seed(seed)
    model = rf.build_model(name, classes, width, mean, std)
    return randomise_bn(model, seed) if random_bn else model


def tiny_batch(n=8, size=16, seed=0, classes=10):
    """n random images of size x size pixels in [0, 1] and their labels in 0..classes-1, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(classes, (n,), generator=g)


def double_batch(n=4, size=8, seed=0, shift=0.03):
    x, y = tiny_batch(n, size, seed)
    x = x.double()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return x, (x + shift * noise).clamp(0, 1), y


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before, changed=()):
    for k, v in model.state_dict().items():
        if any(k.startswith(c + ".") for c in changed):
            assert not torch.equal(v, before[k]), f"{k} did not change"
        else:
            assert torch.equal(v, before[k]), f"{k} changed"


def assert_same_contents(a, b, where="", skip=("config", "seconds", "epoch_seconds")):
    """Equal dicts/lists/tensors/arrays/scalars, recursively; tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            if k not in skip:
                assert_same_contents(a[k], b[k], f"{where}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_contents(u, v, f"{where}[{i}]", skip)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def hand_log_softmax(z):
    """log softmax written out: z - log(sum_j exp(z_j)) (small logits, float64)."""
    return z - z.exp().sum(1, keepdim=True).log()


def hand_kl(logp, logq):
    """KL(p || q) per example from log-probabilities, averaged over the batch."""
    return (logp.exp() * (logp - logq)).sum(1).mean()


def hand_ce(logp, y):
    return -logp[torch.arange(len(y)), y].mean()


def assert_paper_default(function, parameter, value, source):
    """rf.`function`'s `parameter` defaults to the paper's `value`. A user who copies one function
    gets these defaults; the CLI passes its own values, so only the tests calling this notice a
    changed default (one per section, over the section's functions)."""
    assert inspect.signature(getattr(rf, function)).parameters[parameter].default == value, source


def train_on_synthetic(step, epochs=3):
    data = rf.synthetic_data(num_train=1000, num_test=200, seed=1)
    torch.manual_seed(0)
    model = rf.build_model("resnet18", 10, 8)
    opt = rf.make_optimizer(model, 0.05, 5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        rf.train_epoch(model, opt, step, data.train, 32, 0.05, g)
    return model.eval()


@pytest.fixture(scope="module")
def natural_model():
    """A narrow ResNet-18 trained naturally for three epochs on synthetic images, and its data."""
    return train_on_synthetic(rf.natural_step), rf.synthetic_data(num_train=1000, num_test=200, seed=1)


@pytest.fixture(scope="module")
def natural_pgd10(natural_model):
    """The naturally trained model's clean and PGD-10 accuracy on its test images: the baseline."""
    natural, data = natural_model
    torch.manual_seed(0)                                     # PGD's random starts
    return rf.evaluate(natural, data.test, ["pgd10"], EPS)


# robust_ft.py's head: a self-contained library
def test_robust_ft_imports_no_project_module():
    """robust_ft.py is a self-contained library: kernels.py and run.py sit on top of it."""
    tree = ast.parse(open(rf.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", None) == "__import__" and isinstance(node.args[0], ast.Constant)}
    assert not imported & {"kernels", "run", "test_robust_ft"}, imported


# =============================================================================
# 1. Attacks: one PGD routine (Madry et al. 2018) with the CE, CW-margin and TRADES-KL objectives
# =============================================================================

@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
@pytest.mark.parametrize("training", [True, False])
def test_pgd_stays_in_the_ball_restores_mode_and_leaves_no_gradients(loss, training):
    model = tiny_model().train(training)
    x, y = tiny_batch()
    stats = model.bn1.running_mean.clone()
    x_adv = rf.pgd(model, x, y, EPS, 2 / 255, steps=3, loss=loss)
    assert (x_adv - x).abs().max() <= EPS + 1e-7
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training == training
    assert torch.equal(model.bn1.running_mean, stats)         # eval mode: BN statistics untouched
    assert all(p.grad is None for p in model.parameters())
    assert not x_adv.requires_grad


def test_pgd_raises_the_loss_it_attacks(natural_model):
    model, data = natural_model
    x, y = next(rf.batches(data.test, 64))
    with torch.no_grad():
        clean_ce = F.cross_entropy(model(x), y)
        adv_ce = F.cross_entropy(model(rf.pgd(model, x, y, EPS, 2 / 255, 10, "ce")), y)
        clean_cw = rf.cw_margin(model(x), y).mean()
        adv_cw = rf.cw_margin(model(rf.pgd(model, x, y, EPS, 2 / 255, 10, "cw")), y).mean()
    assert adv_ce > clean_ce + 0.5
    assert adv_cw > clean_cw + 0.5


def test_pgd_kl_follows_the_gradient_of_kl_clean_to_adversarial():
    # A linear softmax model with a peaked p(x): here the gradients of KL(p || p') and of the
    # reversed KL(p' || p) point different ways in some pixels (in a random ResNet they do not).
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 48, dtype=torch.float64))
        model[1].bias.copy_(torch.tensor([2.0, 0.0, -1.0, -3.0]))
    x = 0.2 + 0.6 * torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)                        # the KL objective does not use y
    eps, step, steps = 0.1, 0.04, 4
    torch.manual_seed(7)
    got = rf.pgd(model, x, y, eps, step, steps, loss="kl")
    torch.manual_seed(7)                                        # the same N(0, 1) start
    start = x + 0.001 * torch.randn_like(x)
    with torch.no_grad():
        logp = hand_log_softmax(model(x))

    def hand_attack(reverse):
        xa = torch.min(torch.max(start, x - eps), x + eps).clamp(0, 1)
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            logq = hand_log_softmax(model(xa))
            if reverse:                                         # KL(p(x') || p(x)): the wrong one
                objective = (logq.exp() * (logq - logp)).sum()
            else:                                               # KL(p(x) || p(x')), Eq. 4
                objective = (logp.exp() * (logp - logq)).sum()
            grad, = torch.autograd.grad(objective, [xa])
            xa = xa.detach() + step * grad.sign()
            xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0, 1)
        return xa

    right, wrong = hand_attack(False), hand_attack(True)
    assert (right - wrong).abs().max() > 0.05                   # the two directions part ways here
    assert torch.allclose(got, right, rtol=0, atol=1e-12)
    assert (got - x).abs().max() <= eps + 1e-12
    with torch.no_grad():                                       # and the attack did raise the KL
        assert hand_kl(logp, hand_log_softmax(model(got))) > 10 * hand_kl(logp, hand_log_softmax(model(start)))


def test_pgd_takes_a_radius_and_step_per_example():
    """Per-example radii and steps, as minimum_perturbation's bisection uses them."""
    model, (x, y) = tiny_model(width=2), tiny_batch(size=8)
    ours = rf.pgd(model, x, y, torch.full((8,), 8 / 255), torch.full((8,), 2 / 255), 5, random_start=False)
    assert torch.equal(ours, rf.pgd(model, x, y, 8 / 255, 2 / 255, 5, random_start=False))
    eps = torch.linspace(0, 0.1, 8)
    x_adv = rf.pgd(model, x, y, eps, eps / 4, 3, generator=torch.Generator().manual_seed(0))
    assert ((x_adv - x).abs().flatten(1).max(1).values <= eps + 1e-7).all()
    assert ((x_adv - x).abs().flatten(1).max(1).values[1:] > eps[1:] / 2).all()       # the radii are used
    with pytest.raises(ValueError, match="eps"):
        rf.pgd(model, x, y, -eps, eps / 4, 1)


def test_pgd_rejects_bad_arguments():
    model, (x, y) = tiny_model(), tiny_batch()
    with pytest.raises(ValueError, match="'l2'.*'ce', 'cw', 'kl'"):
        rf.pgd(model, x, y, loss="l2")
    with pytest.raises(ValueError, match="eps=-0.1"):
        rf.pgd(model, x, y, eps=-0.1)


def test_cw_margin_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.2], [2.0, 2.0, 1.0]])
    y = torch.tensor([1, 0, 0])
    # margins: max of the other logits minus the true one
    assert torch.allclose(rf.cw_margin(logits, y), torch.tensor([2.0 - 3.0, 0.2 - 0.5, 2.0 - 2.0]))


@pytest.mark.parametrize("function, parameter, value, source", [
    ("pgd", "eps", 8 / 255, "L-inf radius of Madry et al., TRADES, CURE, RiFT"),
    ("pgd", "step_size", 2 / 255, "eps / 4"),
    ("pgd", "steps", 10, "training attack: PGD-10"),
])
def test_attack_defaults_are_the_papers_values(function, parameter, value, source):
    assert_paper_default(function, parameter, value, source)


# =============================================================================
# 2. Adversarial training: natural, Madry AT, TRADES; SGD with the papers' step schedule
# =============================================================================

def test_trades_loss_equals_the_formula_by_hand():
    z_nat = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    z_adv = torch.tensor([[1.0, 1.5, -0.5], [0.9, -0.2, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    ce = kl = 0.0
    for i in range(2):
        p = [math.exp(v) for v in z_nat[i].tolist()]
        q = [math.exp(v) for v in z_adv[i].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        ce += -math.log(p[y[i]])
        kl += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    expect = ce / 2 + 6.0 * kl / 2
    assert rf.trades_loss(z_nat, z_adv, y, beta=6.0).item() == pytest.approx(expect, rel=1e-12)


def test_trades_step_is_one_sgd_step_on_the_hand_written_trades_loss(monkeypatch):
    model = tiny_model(width=2, seed=1, random_bn=True).double().train()
    x, x_adv, y = double_batch(seed=1)
    calls = []

    def fixed_pgd(*args, **kwargs):                    # the attack is tested on its own (section 1)
        calls.append(kwargs.get("loss", args[6] if len(args) > 6 else "ce"))
        return x_adv.clone()

    monkeypatch.setattr(rf, "pgd", fixed_pgd)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)           # plain SGD: the step is -lr * grad
    loss = rf.trades_step(model, opt, x, y, EPS, 2 / 255, 3, beta=2.5)
    assert calls == ["kl"]
    z, z_adv = ref(x), ref(x_adv)                               # train mode, one forward each
    logp, logq = hand_log_softmax(z), hand_log_softmax(z_adv)
    expect = hand_ce(logp, y) + 2.5 * hand_kl(logp, logq)       # CE(f(x), y) + beta KL(p(x) || p(x'))
    grads = torch.autograd.grad(expect, list(ref.parameters()))
    assert loss.item() == pytest.approx(expect.item(), rel=1e-12)
    for (name, p), p0, g in zip(model.named_parameters(), ref.parameters(), grads):
        assert torch.allclose(p.detach(), p0.detach() - 0.1 * g, rtol=1e-10, atol=1e-14), name
    for (name, b), b0 in zip(model.named_buffers(), ref.buffers()):   # BN saw x, then x_adv
        assert torch.allclose(b, b0, rtol=1e-12, atol=1e-14), name


def test_step_lr_follows_the_papers_milestones_and_never_drops_twice_at_once():
    assert [rf.step_lr(0.1, e) for e in (0, 99, 100, 149, 150, 199)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])          # epochs 100 and 150 of 200
    assert [rf.step_lr(0.1, e, (2,)) for e in range(3)] == pytest.approx([0.1, 0.1, 0.01])
    # half and three quarters of the run, rounded half up; a drop on an earlier one's epoch is left out
    assert rf.lr_milestones(200) == (100, 150)
    assert rf.lr_milestones(15) == (8, 11)        # 7.5 -> 8, 11.25 -> 11
    assert rf.lr_milestones(5) == (3, 4)          # 2.5 -> 3, 3.75 -> 4
    assert rf.lr_milestones(3) == (2,)            # 1.5 -> 2, 2.25 -> 2: one drop, not lr / 100 at once
    assert rf.lr_milestones(2) == (1,)            # 1.5 -> 2 is the run's end: no second drop
    assert rf.lr_milestones(1) == ()
    for epochs in range(1, 80):
        drops = rf.lr_milestones(epochs)
        assert list(drops) == sorted(set(drops)) and all(0 < e < epochs for e in drops), epochs
        lrs = [rf.step_lr(1.0, e, drops) for e in range(epochs)]
        assert all(b == a or b == pytest.approx(a / 10) for a, b in zip(lrs, lrs[1:])), (epochs, lrs)


def test_adversarial_training_beats_natural_training_under_pgd(natural_model, natural_pgd10):
    """One epoch of PGD-3 AT from the natural model, as the presets fine-tune it. It gave clean
    99.0% and PGD-10 31.0% against the natural model's 6.5% with torch 2.15, and PGD-10 36.5%
    against 12.5% with torch 2.6."""
    natural, data = natural_model
    torch.manual_seed(0)                                     # the attacks' random starts
    at = copy.deepcopy(natural).train()
    opt = rf.make_optimizer(at, 0.02, 5e-4)
    rf.train_epoch(at, opt, lambda m, o, x, y: rf.at_step(m, o, x, y, EPS, 2 / 255, 3), data.train, 32, 0.02,
                   torch.Generator().manual_seed(0))
    at.eval()
    nat_acc = natural_pgd10
    at_acc = rf.evaluate(at, data.test, ["pgd10"], EPS)
    assert nat_acc["clean"] > 50 and at_acc["clean"] > 50          # both learned the task
    assert at_acc["pgd10"] > nat_acc["pgd10"] + 5, (nat_acc, at_acc)


@pytest.mark.parametrize("function, parameter, value, source", [
    ("at_step", "eps", 8 / 255, "Madry et al."), ("at_step", "step_size", 2 / 255, "Madry et al."),
    ("at_step", "steps", 10, "Madry et al."),
    ("trades_step", "beta", 6.0, "TRADES, 1/lambda = 6"), ("trades_loss", "beta", 6.0, "TRADES"),
    ("trades_step", "steps", 10, "TRADES"),
    ("make_optimizer", "momentum", 0.9, "CURE Table 9, RiFT Sec. 4"),
    ("step_lr", "milestones", (100, 150), "epochs 100 and 150 of 200 (CURE official, Rice et al.)"),
    ("lr_milestones", "fractions", (0.5, 0.75), "half and three quarters of the run, as 100 and 150 of 200"),
])
def test_training_defaults_are_the_papers_values(function, parameter, value, source):
    assert_paper_default(function, parameter, value, source)


# =============================================================================
# 3. CURE: the RGP update mask (Eq. 6, Alg. 1 line 20), the revision model (Eq. 7), L_CR (Eq. 8),
# the step; the official code's variant
# =============================================================================

# --- The RGP update mask, against a hand-written NumPy version of the rule ------------------------

def numpy_rgp_mask(g, g_nat, g_adv, alpha, p):
    """The RGP mask rule (Eq. 6, Alg. 1 line 20) written out in NumPy: float32 score, rank k, strict <, NaN above all."""
    g = g.astype(np.float64).copy()
    s = np.float32(alpha) * np.abs(g_nat.astype(np.float32)) + \
        np.float32(1.0 - alpha) * np.abs(g_adv.astype(np.float32))          # float32, no FMA
    n = s.size
    k = math.floor(p * n / 100)
    if k == 0:
        return g
    if k == n:
        return np.zeros_like(g)
    t = np.sort(s, axis=None)[k]                                           # NumPy sorts NaN last
    below = (s < t) | (np.isnan(t) & ~np.isnan(s))
    g[below] = 0
    return g


def masked_by_rf(gs, gns, gas, alpha, p):
    gs = [torch.as_tensor(g).clone() for g in gs]
    rf.rgp_mask_(gs, [torch.as_tensor(g) for g in gns], [torch.as_tensor(g) for g in gas], alpha, p)
    return gs


def random_grads(shape, seed, ties=False):
    rng = np.random.default_rng(seed)
    make = (lambda: rng.integers(-3, 4, shape).astype(np.float32) / 4) if ties else \
        (lambda: rng.standard_normal(shape).astype(np.float32))
    return make(), make(), make()


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (3, 5), (16, 8, 3, 3), (10, 17), (1031,)])
@pytest.mark.parametrize("p", [0.0, 1.0, 30.0, 33.3, 50.0, 99.9, 100.0])
@pytest.mark.parametrize("ties", [False, True])
def test_rgp_mask_matches_the_numpy_rule(shape, p, ties):
    g, gn, ga = random_grads(shape, seed=len(shape) + int(p), ties=ties)
    (out,) = masked_by_rf([g], [gn], [ga], 0.1, p)
    assert np.array_equal(out.numpy(), numpy_rgp_mask(g, gn, ga, 0.1, p))


def test_rgp_mask_with_distinct_scores_zeroes_exactly_k_entries():
    g, gn, ga = random_grads((97,), seed=5)
    (out,) = masked_by_rf([g], [gn], [ga], 0.3, 30.0)
    assert int((out == 0).sum()) == math.floor(30.0 * 97 / 100)


def test_rgp_mask_keeps_ties_at_the_threshold():
    ones = np.ones(10, np.float32)
    (out,) = masked_by_rf([ones], [ones], [ones], 0.5, 50.0)   # every score equal: none below t
    assert np.array_equal(out.numpy(), ones)


def test_rgp_mask_never_masks_nan_scores():
    gn = np.array([np.nan, 0.1, 0.2, np.nan, 0.3, 0.05], np.float32)
    ga = np.zeros(6, np.float32)
    g = np.arange(1, 7, dtype=np.float32)
    for p in (30.0, 50.0, 70.0, 90.0):        # 90%: t itself is NaN, so every number is below it
        (out,) = masked_by_rf([g], [gn], [ga], 0.5, p)
        expect = numpy_rgp_mask(g, gn, ga, 0.5, p)
        assert np.array_equal(out.numpy(), expect)
        assert out[0] == 1 and out[3] == 4
    assert masked_by_rf([g], [gn], [ga], 0.5, 90.0)[0].tolist() == [1, 0, 0, 4, 0, 0]


def test_rgp_mask_handles_many_tensors_low_precision_and_views():
    shapes = [(8, 3, 3, 3), (8, 8, 3, 3), (16, 8, 1, 1), (10, 16), (5,)]
    grads = [random_grads(s, seed=i) for i, s in enumerate(shapes)]
    outs = masked_by_rf(*zip(*grads), 0.2, 30.0)
    for out, (g, gn, ga) in zip(outs, grads):
        assert np.array_equal(out.numpy(), numpy_rgp_mask(g, gn, ga, 0.2, 30.0))
    g, gn, ga = (torch.from_numpy(a).to(torch.bfloat16) for a in random_grads((9, 11), seed=9))
    view = g.clone().t()                                       # non-contiguous, bf16
    rf.rgp_mask_([view], [gn.t()], [ga.t()], 0.1, 40.0)
    expect = numpy_rgp_mask(g.t().float().numpy(), gn.t().float().numpy(), ga.t().float().numpy(), 0.1, 40.0)
    assert np.array_equal(view.float().numpy(), expect)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), "alpha=1.5.*\\[0, 1\\]"), (dict(alpha=float("nan")), "alpha=nan"),
    (dict(percentile=-1.0), "percentile=-1.0.*\\[0, 100\\]"), (dict(percentile=101), "percentile=101"),
])
def test_rgp_mask_rejects_bad_numbers(kwargs, match):
    t = [torch.zeros(4)]
    args = dict(alpha=0.1, percentile=30.0) | kwargs
    with pytest.raises(ValueError, match=match):
        rf.rgp_mask_(t, t, t, **args)


def test_rgp_mask_rejects_mismatched_lists():
    a, b = torch.zeros(4), torch.zeros(5)
    with pytest.raises(ValueError, match="same length"):
        rf.rgp_mask_([a], [a, a], [a], 0.1, 30)
    with pytest.raises(ValueError, match="shapes differ"):
        rf.rgp_mask_([a], [b], [a], 0.1, 30)


# --- The consistency loss, the configuration, the revision model ----------------------------------

def test_consistency_loss_is_the_kl_by_hand():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    z_rev = torch.tensor([[0.2, 0.1, 0.9], [1.0, 1.0, 1.0]], dtype=torch.float64)
    p, q = F.softmax(z, 1).tolist(), F.softmax(z_rev, 1).tolist()
    expect = sum(sum(qj * math.log(qj / pj) for pj, qj in zip(p[i], q[i])) for i in range(2)) / 2
    assert rf.consistency_loss(z, z_rev).item() == pytest.approx(expect, rel=1e-12)   # KL(p_rev || p)
    assert rf.consistency_loss(z, z).item() == pytest.approx(0.0, abs=1e-15)


def test_cure_config_defaults_are_the_official_beta_and_the_paper_variant():
    cfg = rf.CureConfig()
    assert cfg.beta == 5.0                          # official --trades_beta default, passed as CURE's beta
    assert cfg.variant == "paper"
    assert (cfg.percentile, cfg.alpha, cfg.gamma, cfg.rate, cfg.decay) == (30.0, 0.1, 1.0, 0.2, 0.999)   # Table 9
    with pytest.raises(ValueError, match="'offical'.*'paper', 'official'"):
        rf.CureConfig(variant="offical")
    assert rf.cure_rate(rf.CureConfig(variant="official"), 0.9) == 0.2          # constant r
    assert rf.cure_rate(rf.CureConfig(), 1.0) == pytest.approx(0.02)           # r_t down to r/10


def test_table9_defaults():
    assert rf.cure_defaults("wrn34_10", "cifar10") == rf.CureConfig(percentile=50, alpha=0.3, gamma=0.5)
    assert rf.cure_defaults("resnet18", "svhn").alpha == 0.2
    assert rf.cure_defaults("preact_resnet18", "cifar10").percentile == 20
    assert rf.CURE_DEFAULTS[("wrn34_10", "cifar10")] == (50, 0.3, 0.5)


def test_revision_update_is_eq7_by_hand():
    torch.manual_seed(0)
    model = rf.build_model("resnet18", 10, 4)
    revision = rf.Revision(model)
    start = {k: v.clone() for k, v in revision.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.bn1.running_mean.add_(1.0)
    model.bn1.num_batches_tracked.fill_(7)
    g = torch.Generator().manual_seed(0)
    revision.maybe_update_(model, 0.9, rate=1.0, coin=g)                   # rate 1: always
    for k, v in revision.model.state_dict().items():
        cur = model.state_dict()[k]
        if v.is_floating_point():
            assert torch.allclose(v, 0.9 * start[k] + 0.1 * cur, rtol=1e-6, atol=1e-7), k
        else:
            assert torch.equal(v, cur)
    frozen = {k: v.clone() for k, v in revision.model.state_dict().items()}
    revision.maybe_update_(model, 0.9, rate=0.0, coin=g)                   # rate 0: never
    assert all(torch.equal(v, frozen[k]) for k, v in revision.model.state_dict().items())


def test_revision_rate_and_the_paper_variants_decay_for_short_runs():
    assert rf.PAPER_STEPS == 200 * 391                           # 200 epochs of 391 batches of 128
    assert rf.revision_rate(0.2, 0.0) == pytest.approx(0.2)
    assert rf.revision_rate(0.2, 1.0) == pytest.approx(0.02)
    assert rf.revision_decay(0.999, 0.2, rf.PAPER_STEPS) == pytest.approx(0.999)
    assert rf.revision_decay(0.999, 0.2, 10 * rf.PAPER_STEPS) == 0.999     # never above d
    long = rf.revision_decay(0.999, 0.2, 50 * 391)                         # 50 epochs: a quarter of the horizon
    assert long == pytest.approx(1 - 1 / (1000 * 50 / 200))
    assert rf.revision_decay(0.999, 0.2, 5 * 39) == pytest.approx(1 - 1 / (1000 * 195 / rf.PAPER_STEPS))  # 0.599
    # shorter than one horizon: the floor, so a revision always averages (synthetic quick: 75 steps)
    assert rf.revision_decay(0.999, 0.2, 75) == rf.DECAY_FLOOR == 0.5
    assert rf.revision_decay(0.999, 0.2, 0) == 0.5
    for steps in (1, 75, 195, 1000, 5000):     # paper variant: d_t > 0 at every step, first update included
        schedule = rf.CureSchedule.for_run(rf.CureConfig(), steps)
        for t in range(0, steps, 7):
            schedule.t = t
            assert 0 < schedule.decay_now() <= schedule.run_decay, (steps, t)


def test_official_variant_revision_follows_the_official_update_rule_by_hand():
    """NeurAI-Lab/CURE utilities/train.py: global_step += 1 on every batch, then with probability r
    theta_ema <- a theta_ema + (1 - a) theta, a = min(1 - 1/(global_step + 1), 0.999): the first
    three batches use 1/2, 2/3, 3/4, whatever the run's length (no scaling)."""
    for steps in (3, 75, 195, rf.PAPER_STEPS):
        assert rf.CureSchedule.for_run(rf.CureConfig(variant="official"), steps).run_decay == 0.999
    cfg = rf.CureConfig(variant="official", rate=1.0)                       # revise after every step
    model = nn.Linear(3, 2)
    revision = rf.cure_revision(model, cfg)
    schedule = rf.CureSchedule.for_run(cfg, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)                       # the update itself: by hand
    ema = [p.detach().clone() for p in model.parameters()]
    coin = torch.Generator().manual_seed(0)
    for global_step, theta in zip((1, 2, 3), (1.0, -2.0, 5.0)):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(theta)
        rf.cure_update_(model, opt, [torch.zeros_like(p) for p in model.parameters()], revision, cfg,
                        schedule, coin)
        a = min(1 - 1 / (global_step + 1), 0.999)                            # 1/2, 2/3, 3/4
        ema = [a * e + (1 - a) * theta for e in ema]
        for e, r in zip(ema, revision.model.parameters()):
            assert torch.allclose(r, e, rtol=1e-6, atol=1e-7), global_step
    assert schedule.t == 3 and revision.updates == 3


# --- The step: three gradients, the mask, SGD -----------------------------------------------------

def double_model_and_batch():
    torch.manual_seed(0)
    model = rf.build_model("resnet18", 10, 4).double().train()
    x, y = tiny_batch(6)
    x = x.double()
    return model, x, (x + 0.03 * torch.randn_like(x)).clamp(0, 1), y


def test_three_pass_gradients_equal_separate_autograd_gradients():
    model, x, x_adv, y = double_model_and_batch()
    revision = rf.Revision(model)
    cfg = rf.CureConfig(beta=1.0, gamma=0.7)
    with torch.no_grad():
        rev_nat, rev_adv = revision.model(x), revision.model(x_adv)
    g, g_nat, g_adv, loss = rf.cure_gradients(model, x, x_adv, y, rev_nat, rev_adv, cfg)
    params = list(model.parameters())

    def grads_of(fn):
        model.zero_grad()
        fn().backward()
        return [p.grad.clone() for p in params]

    def total_loss():                              # L = L_adv + gamma * L_CR written out again
        z, z_adv = model(x), model(x_adv)
        p, p_adv = F.softmax(z, 1), F.softmax(z_adv, 1)
        kl = (p * (p.log() - p_adv.log())).sum(1).mean()
        q, q_adv = F.softmax(rev_nat, 1), F.softmax(rev_adv, 1)
        cr = (q * (q.log() - p.log())).sum(1).mean() + (q_adv * (q_adv.log() - p_adv.log())).sum(1).mean()
        return F.cross_entropy(z, y) + 1.0 * kl + 0.7 * cr

    for mine, ref in [(g_nat, grads_of(lambda: F.cross_entropy(model(x), y))),
                      (g_adv, grads_of(lambda: F.cross_entropy(model(x_adv), y))),
                      (g, grads_of(total_loss))]:
        for a, b in zip(mine, ref):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert loss.item() == pytest.approx(total_loss().item(), rel=1e-12)


def test_cure_step_updates_with_the_masked_gradient_of_l():
    model, x, x_adv, y = double_model_and_batch()
    cfg = rf.CureConfig(percentile=30.0, alpha=0.1, gamma=1.0)
    seen = {}

    def spy_mask(gs, gns, gas, alpha, p):           # record what the mask got and returned
        seen["before"] = [t.clone() for t in gs]
        rf.rgp_mask_(gs, gns, gas, alpha, p)
        seen["after"] = gs

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)            # plain SGD: the step is -lr * grad
    rf.cure_step(model, opt, x.double(), y, rf.Revision(model), cfg, rf.CureSchedule(total_steps=1, run_decay=0.9),
                 torch.Generator().manual_seed(0), steps=2, mask_fn=spy_mask)
    names = [n for n, _ in rf.masked_parameters(model)]
    assert len(seen["after"]) == len(names)
    for name, g0, g1 in zip(names, seen["before"], seen["after"]):
        kept = g1 != 0
        assert torch.equal(g1[kept], g0[kept])                   # unmasked entries: exactly dL/dw
        k = math.floor(30.0 * g0.numel() / 100)
        assert int((~kept).sum()) >= k                           # at least k entries frozen
        step = before[name] - dict(model.named_parameters())[name].detach()
        assert torch.allclose(step, 0.1 * g1, rtol=1e-12, atol=1e-15)
        assert torch.all(step[~kept] == 0)                       # frozen entries did not move


def hand_cure_gradients(ref, rev, x, x_adv, y, beta, gamma):
    """Eqs. 5 and 8 written out on a copy of the model and of the revision model (whose targets
    come in its own mode): (names, params, L, {"nat", "adv", "kl", "all"}), each gradient its own
    autograd pass: dCE(x), dCE(x_adv), dKL(p(x) || p(x_adv)) and dL."""
    z, z_adv = ref(x), ref(x_adv)
    with torch.no_grad():
        r, r_adv = rev(x), rev(x_adv)
    lp, lpa, lr_nat, lr_adv = map(hand_log_softmax, (z, z_adv, r, r_adv))
    ce_nat, ce_adv, kl = hand_ce(lp, y), hand_ce(lpa, y), hand_kl(lp, lpa)
    total = ce_nat + beta * kl + gamma * (hand_kl(lr_nat, lp) + hand_kl(lr_adv, lpa))
    names, params = zip(*ref.named_parameters())
    grads = {key: torch.autograd.grad(term, params, retain_graph=True)
             for key, term in (("nat", ce_nat), ("adv", ce_adv), ("kl", kl), ("all", total))}
    return names, params, total, grads


def test_cure_step_equals_algorithm_1_by_hand(monkeypatch):
    model = tiny_model(width=2, seed=5, random_bn=True).double().train()
    x, x_adv, y = double_batch(seed=5)
    monkeypatch.setattr(rf, "pgd", lambda *a, **k: x_adv.clone())
    revision = rf.Revision(model)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():                                       # a revision model unlike the model
        for p in revision.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    rev, ref = copy.deepcopy(revision.model), copy.deepcopy(model)
    rev_state = snapshot(rev)
    beta, gamma, alpha, pct, lr = 2.5, 0.7, 0.05, 40.0, 0.1
    cfg = rf.CureConfig(percentile=pct, alpha=alpha, gamma=gamma, beta=beta, rate=0.0, exclude=("linear",))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    updated = {}
    schedule = rf.CureSchedule(total_steps=10, run_decay=0.9, t=3)
    loss = rf.cure_step(model, opt, x, y, revision, cfg, schedule,
                        torch.Generator().manual_seed(0), steps=2, updated=updated)

    # Algorithm 1 by hand: three separate gradients of hand-written losses (revision model in eval mode) ...
    names, params, total, grads = hand_cure_gradients(ref, rev, x, x_adv, y, beta, gamma)
    g_nat, g_adv, g_all = grads["nat"], grads["adv"], grads["all"]
    # ... the RGP mask in NumPy on weights (ndim >= 2) outside cfg.exclude, then plain SGD
    after = dict(model.named_parameters())
    expect_updated = {}
    for name, p0, gi, gn, ga in zip(names, params, g_all, g_nat, g_adv):
        gi = gi.numpy()
        if gi.ndim >= 2 and not name.startswith("linear."):
            gi = numpy_rgp_mask(gi, gn.numpy(), ga.numpy(), alpha, pct)
            expect_updated[name] = int((gi != 0).sum())
        np.testing.assert_allclose(after[name].detach().numpy(), p0.detach().numpy() - lr * gi,
                                   rtol=1e-10, atol=1e-14, err_msg=name)
    assert "linear.weight" not in expect_updated and len(expect_updated) == 20
    assert {k: int(v) for k, v in updated.items()} == expect_updated
    assert loss.item() == pytest.approx(total.item(), rel=1e-12)
    assert revision.updates == 0                                # rate 0: the revision did not move
    assert_state_equal(revision.model, rev_state)


# --- CURE as the official code runs it (NeurAI-Lab/CURE, --reinit_mode rgp_soft) ------------------

def numpy_official_mask(g, g_nat, g_kl, alpha, p):
    """The official rgp_soft rule written with NumPy: s = a g_nat + b g_kl in float32 (signed),
    zero g where s < np.percentile(s, p) (linear interpolation, taken in float64)."""
    a, b = np.float32(alpha), np.float32(1.0 - alpha)
    s = a * g_nat.astype(np.float32) + b * g_kl.astype(np.float32)
    threshold = np.percentile(s.astype(np.float64), p)
    return np.where(s.astype(np.float64) < threshold, 0.0, g).astype(g.dtype)


def official_named_lists(seed, dtype=torch.float32):
    """(name, tensor) lists in a ResNet's parameter order: the stem conv1 first (never masked), then
    block tensors; signed gradients, with ties (rounded values) in one of them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [("conv1.weight", (4, 3, 3, 3)), ("bn1.weight", (4,)), ("layer1.0.conv1.weight", (4, 4, 3, 3)),
              ("layer1.0.bn1.weight", (4,)), ("layer1.0.conv2.weight", (4, 4, 3, 3)),
              ("layer2.0.conv1.weight", (7, 4, 3, 3)), ("layer2.0.shortcut.0.weight", (7, 4, 1, 1)),
              ("linear.weight", (10, 7))]
    lists = []
    for _ in range(3):
        lists.append([(n, torch.randn(shape, generator=g, dtype=dtype)) for n, shape in shapes])
    for lst in lists[1:]:                                     # ties: scores on a coarse grid
        lst[5] = (lst[5][0], (lst[5][1] * 2).round() / 2)
    return lists


@pytest.mark.parametrize("alpha, p", [(0.1, 30.0), (0.3, 50.0), (0.5, 33.3), (0.0, 0.0), (1.0, 100.0),
                                      (0.1, 99.9), (0.25, 1.0)])
def test_official_rgp_mask_matches_numpy_percentile_by_hand(alpha, p):
    grads, nat, kl = official_named_lists(seed=int(10 * p + 100 * alpha))
    expect = {n: t.numpy().copy() for n, t in grads}
    for (n, t), (_, tn), (_, tk) in zip(grads, nat, kl):
        if n in ("layer1.0.conv1.weight", "layer2.0.conv1.weight"):       # not the stem's conv1 (index 0)
            expect[n] = numpy_official_mask(t.numpy(), tn.numpy(), tk.numpy(), alpha, p)
    masked = rf.official_rgp_mask_(grads, nat, kl, alpha, p)
    assert masked == ["layer1.0.conv1.weight", "layer2.0.conv1.weight"]
    for n, t in grads:
        np.testing.assert_array_equal(t.numpy(), expect[n], err_msg=n)
    zeroed = int((dict(grads)["layer2.0.conv1.weight"] == 0).sum())
    assert 0 < zeroed < 252 if 0 < p < 100 else True                  # the rule did mask something


def test_official_rgp_mask_is_signed_and_keeps_ties_and_nan():
    names = ["conv1.weight", "layer1.0.conv1.weight", "layer1.1.conv1.weight"]
    g = [torch.ones(3, 1, 1, 1), torch.ones(5, 1, 1, 1), torch.ones(4, 1, 1, 1)]
    nat = [torch.zeros(3, 1, 1, 1), torch.tensor([-3.0, -1.0, 0.0, 2.0, 2.0]).view(5, 1, 1, 1),
           torch.tensor([1.0, float("nan"), -5.0, 0.0]).view(4, 1, 1, 1)]
    kl = [torch.zeros_like(t) for t in nat]
    rf.official_rgp_mask_(list(zip(names, g)), list(zip(names, nat)), list(zip(names, kl)), 1.0, 50.0)
    # scores -3, -1, 0, 2, 2: the median is 0; -3 and -1 (large negative gradients) are the ones
    # zeroed, which an absolute value would have kept
    assert g[1].flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert g[2].flatten().tolist() == [1.0] * 4           # a NaN score: the percentile is NaN, nothing masked
    assert g[0].flatten().tolist() == [1.0] * 3           # the first parameter is never masked
    with pytest.raises(ValueError, match="same tensors"):
        rf.official_rgp_mask_(list(zip(names, g)), list(zip(names[::-1], nat)), list(zip(names, kl)), 0.1, 30.0)
    with pytest.raises(ValueError, match="percentile=130"):
        rf.official_rgp_mask_(list(zip(names, g)), list(zip(names, nat)), list(zip(names, kl)), 0.1, 130.0)


def test_official_cure_step_equals_the_official_code_by_hand(monkeypatch):
    model = tiny_model(width=2, seed=6, random_bn=True).double().train()
    x, x_adv, y = double_batch(seed=6)
    monkeypatch.setattr(rf, "pgd", lambda *a, **k: x_adv.clone())
    beta, gamma, alpha, pct, lr, decay, step = 5.0, 0.7, 0.2, 40.0, 0.1, 0.9, 3
    cfg = rf.CureConfig(percentile=pct, alpha=alpha, gamma=gamma, beta=beta, rate=1.0, variant="official")
    revision = rf.cure_revision(model, cfg)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():                                       # a revision model unlike the model
        for p in revision.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    rev, ref = copy.deepcopy(revision.model), copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    updated = {}
    schedule = rf.CureSchedule(total_steps=10, run_decay=decay, t=step)
    loss = rf.cure_step(model, opt, x, y, revision, cfg, schedule,
                        torch.Generator().manual_seed(0), steps=2, updated=updated)
    assert schedule.t == step + 1

    # The official step by hand: the revision model's targets in TRAIN mode (batch statistics,
    # and its own BatchNorm statistics move), the gradient of the KL term for the score ...
    assert rev.training
    names, params, total, grads = hand_cure_gradients(ref, rev, x, x_adv, y, beta, gamma)
    g_nat, g_kl, g_all = grads["nat"], grads["kl"], grads["all"]
    # ... the signed percentile mask on the block conv1 weights only, then plain SGD
    after = dict(model.named_parameters())
    expect_updated = {}
    for i, (name, p0, gi, gn, gk) in enumerate(zip(names, params, g_all, g_nat, g_kl)):
        gi = gi.numpy()
        if i > 0 and "conv1" in name:
            gi = numpy_official_mask(gi, gn.numpy(), gk.numpy(), alpha, pct)
            expect_updated[name] = int((gi != 0).sum())
        np.testing.assert_allclose(after[name].detach().numpy(), p0.detach().numpy() - lr * gi,
                                   rtol=1e-10, atol=1e-14, err_msg=name)
    assert sorted(expect_updated) == [f"layer{a}.{b}.conv1.weight" for a in (1, 2, 3, 4) for b in (0, 1)]
    assert {k: int(v) for k, v in updated.items()} == expect_updated
    assert loss.item() == pytest.approx(total.item(), rel=1e-12)
    # ... and the revision (rate 1: always) averaged its parameters only; its buffers are its own
    d = min(decay, 1 - 1 / (step + 2))        # global_step = step + 1, incremented before the update
    for name, v in revision.model.named_parameters():
        expect = d * dict(rev.named_parameters())[name] + (1 - d) * after[name].detach()
        assert torch.allclose(v, expect, rtol=1e-12, atol=1e-15), name
    for name, v in revision.model.named_buffers():
        assert torch.equal(v, dict(rev.named_buffers())[name]), name
    assert revision.updates == 1


@pytest.mark.parametrize("function, parameter, value, source", [
    ("cure_step", "eps", 8 / 255, "CURE Sec. 5"), ("cure_step", "step_size", 2 / 255, "CURE Sec. 5"),
    ("cure_step", "steps", 10, "CURE Sec. 5"),
])
def test_cure_defaults_are_the_papers_values(function, parameter, value, source):
    assert_paper_default(function, parameter, value, source)


# --- The README's library example: CURE on a user's model through the library ---------------------

def readme_library_example(path=os.path.join(os.path.dirname(__file__), "README.md")):
    """The ```python block that follows the line `<!-- library-example -->` in the README."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"^<!-- library-example -->\n```python\n(.*?)^```$", text, flags=re.S | re.M)
    assert match, f"no ```python block right after <!-- library-example --> in {path}"
    return match.group(1)


def test_readme_library_example_runs(monkeypatch):
    """The README's library example runs as written: CURE steps change the weights, and the
    evaluation it prints is a set of accuracies in [0, 100]."""
    seen = {"steps": 0}
    cure_step, evaluate = rf.cure_step, rf.evaluate

    def counted_step(model, *args, **kwargs):
        if seen["steps"] == 0:             # the weights before the first CURE step
            seen["model"], seen["start"] = model, [p.detach().clone() for p in model.parameters()]
        seen["steps"] += 1
        return cure_step(model, *args, **kwargs)

    def recorded_evaluate(*args, **kwargs):
        seen["result"] = evaluate(*args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(rf, "cure_step", counted_step)     # the example's `import robust_ft` is this module
    monkeypatch.setattr(rf, "evaluate", recorded_evaluate)
    torch.manual_seed(0)
    exec(compile(readme_library_example(), "README.md <library-example>", "exec"), {"__name__": "readme_example"})

    assert seen["steps"] > 0, "the example never calls rf.cure_step"
    moved = [not torch.equal(p.detach(), p0) for p, p0 in zip(seen["model"].parameters(), seen["start"])]
    assert any(moved), "CURE steps left every weight unchanged"
    result = seen.get("result")
    assert result is not None, "the example never calls rf.evaluate"
    accuracies = {k: v for k, v in result.items() if k in ("clean", *rf.EVAL_ATTACKS)}
    assert "clean" in accuracies and len(accuracies) >= 2, result
    assert all(0.0 <= v <= 100.0 for v in accuracies.values()), result
    assert result["n"] > 0, result


# =============================================================================
# 4. RiFT: module robust criticality (Def. 3.1, Alg. 1), one-module fine-tuning, interpolation, OOD
# =============================================================================

# Checked against hand-written computations (analytic softmax-regression gradients, a hand SGD
# loop) or invariants (eps-ball, state bit-identical).

class TinyNet(nn.Module):
    """conv-BN-ReLU-pool-linear, plus a Linear whose output is multiplied by zero."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)
        self.dead = nn.Linear(4, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(h) + 0.0 * self.dead(h)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    model.train()
    model(torch.rand(8, 3, 8, 8))             # non-trivial BatchNorm running statistics
    return model.eval()


def uint8_split(n=16, size=8, seed=0, classes=5):
    x, y = tiny_batch(n, size, seed, classes)
    return rf.Split((x * 255).round().to(torch.uint8), y)


def softmax_regression_loss_grad(w, b, x, y):
    """Mean CE of x @ w.T + b and its analytic gradient (P - onehot)^T x / N, in float64."""
    z = x @ w.T + b
    p = torch.softmax(z, 1)
    loss = -torch.log(p[torch.arange(len(y)), y]).mean()
    return loss.item(), (p - F.one_hot(y, w.shape[0])).T @ x / len(y)


def linear_model_and_data(seed=0, n=7, dtype=torch.float32):
    """A seeded softmax regression nn.Sequential(Flatten, Linear(12, 5)) in `dtype` and n images of
    2x2 pixels: (model, x, y, w, b, x flattened), w, b and x flattened in float64 for the hand
    computations (copies, so that the model's own may be checked against them)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).to(dtype)
    x, y = tiny_batch(n, 2, seed, classes=5)
    w, b = model[1].weight.detach().double().clone(), model[1].bias.detach().double().clone()
    return model, x.to(dtype), y, w, b, x.flatten(1).double()


# --- Module robust criticality --------------------------------------------------------------------

def test_robust_loss_and_gradient_do_not_depend_on_the_batch_size():
    model, x, y, w, b, xf = linear_model_and_data(seed=2, n=10, dtype=torch.float64)
    loss, grad = softmax_regression_loss_grad(w, b, xf, y)      # the full-set mean, analytically
    weight = model[1].weight
    for bs in (3, 4, 10, 64):                                   # 3,3,3,1 / 4,4,2 / one / one batch
        assert rf.robust_loss(model, x, y, batch_size=bs) == pytest.approx(loss, rel=1e-6)
        got = rf.robust_loss_grad(model, weight, x, y, batch_size=bs)
        assert torch.allclose(got, grad, rtol=1e-5, atol=1e-7), bs
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_mrc_stays_in_the_ball_is_positive_and_zero_for_a_dead_module(variant):
    model = tiny_net()
    x, y = tiny_batch(size=8, classes=5)
    for name in rf.rift_modules(model):
        w = dict(model.named_modules())[name].weight
        mrc, dw = rf.mrc_perturbation(model, name, x, y, radius=0.1, steps=10, variant=variant,
                                      generator=torch.Generator().manual_seed(0))
        assert dw.shape == w.shape
        assert torch.linalg.vector_norm(dw) <= 0.1 * torch.linalg.vector_norm(w) * (1 + 1e-5)
        assert math.isfinite(mrc)
        if name == "dead":
            assert mrc == 0.0
        else:
            assert mrc > 1e-4
    table = rf.module_robust_criticality(model, x, y, variant=variant, generator=torch.Generator().manual_seed(0))
    assert list(table) == ["conv", "fc", "dead"]
    assert table["dead"] == 0.0 and rf.non_robust_critical_module(table) == "dead"


def test_paper_mrc_matches_a_hand_written_ascent_with_analytic_gradients():
    model, x, y, w, b, xf = linear_model_and_data()
    eps, steps = 0.1, 10
    radius = eps * w.norm().item()
    dw = torch.zeros_like(w)
    projected = False
    for _ in range(steps):                                     # Alg. 1 with normalised steps 2r/T
        g = softmax_regression_loss_grad(w + dw, b, xf, y)[1]
        dw = dw + (2 * radius / steps) * g / g.norm()
        if dw.norm() > radius:
            dw, projected = dw * radius / dw.norm(), True
            break
    expect = softmax_regression_loss_grad(w + dw, b, xf, y)[0] - softmax_regression_loss_grad(w, b, xf, y)[0]
    mrc, got = rf.mrc_perturbation(model, "1", x, y, radius=eps, steps=steps)
    assert projected and abs(got.norm().item() - radius) <= 1e-5 * radius   # on the sphere
    assert torch.allclose(got.double(), dw, atol=1e-5)
    assert mrc == pytest.approx(expect, rel=1e-3, abs=1e-6)


def test_paper_mrc_with_several_batches_matches_the_hand_ascent():
    model, x, y, w, b, xf = linear_model_and_data(seed=3, n=10, dtype=torch.float64)
    eps, steps = 0.1, 10
    radius = eps * w.norm().item()
    dw = torch.zeros_like(w)
    for _ in range(steps):                                      # Alg. 1, normalised steps 2r/T
        g = softmax_regression_loss_grad(w + dw, b, xf, y)[1]
        dw = dw + (2 * radius / steps) * g / g.norm()
        if dw.norm() > radius:
            dw = dw * radius / dw.norm()
            break
    expect = softmax_regression_loss_grad(w + dw, b, xf, y)[0] - softmax_regression_loss_grad(w, b, xf, y)[0]
    mrc, got = rf.mrc_perturbation(model, "1", x, y, radius=eps, steps=steps, batch_size=3)
    assert torch.allclose(got, dw, atol=1e-5)
    assert mrc == pytest.approx(expect, rel=1e-4, abs=1e-6)


def test_official_mrc_matches_a_hand_written_sgd_ascent():
    model, x, y, w, b, xf = linear_model_and_data(seed=1)
    eps, epochs, lr = 0.1, 4, 1.0
    radius = eps * w.norm().item()
    dw, best = torch.zeros_like(w), -math.inf
    for _ in range(epochs):                                    # one batch per pass: order is irrelevant
        dw = dw + lr * softmax_regression_loss_grad(w + dw, b, xf, y)[1]
        if dw.norm() > radius:
            dw = dw * radius / dw.norm()
        best = max(best, softmax_regression_loss_grad(w + dw, b, xf, y)[0])
    expect = best - softmax_regression_loss_grad(w, b, xf, y)[0]
    mrc, _ = rf.mrc_perturbation(model, "1", x, y, radius=eps, steps=epochs, variant="official", batch_size=64)
    assert mrc == pytest.approx(expect, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("eps, lr", [(3.0, 0.5), (0.1, 1.0)])   # the ball not reached / reached
def test_official_mrc_with_shuffled_batches_matches_a_hand_sgd_ascent(eps, lr):
    model, x, y, w, b, xf = linear_model_and_data(seed=4, n=10, dtype=torch.float64)
    epochs, bs = 3, 3
    radius = eps * w.norm().item()
    gen = torch.Generator().manual_seed(5)
    dw, best, best_dw = torch.zeros_like(w), -math.inf, torch.zeros_like(w)
    for _ in range(epochs):                                     # plain SGD ascent on batch means
        for idx in torch.randperm(len(y), generator=gen).split(bs):
            dw = dw + lr * softmax_regression_loss_grad(w + dw, b, xf[idx], y[idx])[1]
        if dw.norm() > radius:                                  # projection once per pass
            dw = dw * radius / dw.norm()
        loss = softmax_regression_loss_grad(w + dw, b, xf, y)[0]
        if loss > best:
            best, best_dw = loss, dw
    expect = best - softmax_regression_loss_grad(w, b, xf, y)[0]
    mrc, got = rf.mrc_perturbation(model, "1", x, y, radius=eps, steps=epochs, lr=lr, variant="official",
                                   batch_size=bs, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, best_dw, atol=1e-5)
    assert mrc == pytest.approx(expect, rel=1e-4, abs=1e-6)
    assert torch.equal(model[1].weight, w)                      # restored


def test_mrc_leaves_a_resnet_bit_identical_in_its_mode_with_no_grad():
    torch.manual_seed(0)
    model = rf.build_model("resnet18", width=4)
    x, y = tiny_batch(4)
    model(x)                                                   # train mode: BN statistics move
    model.layer1[0].conv1.weight.requires_grad_(False)         # a frozen flag must survive too
    before = snapshot(model)
    table = rf.module_robust_criticality(model, x, y, steps=2, modules=["layer1.0.conv1", "linear"])
    assert list(table) == ["layer1.0.conv1", "linear"] and all(v > 0 for v in table.values())
    assert model.training and not model.layer1[0].conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert_state_equal(model, before)


def test_mrc_rejects_unknown_modules_and_variants():
    model = tiny_net()
    x, y = tiny_batch(size=8, classes=5)
    with pytest.raises(ValueError, match=r"nope.*\['conv', 'fc', 'dead'\]"):
        rf.module_robust_criticality(model, x, y, modules=["conv", "nope"])
    with pytest.raises(ValueError, match="bn"):                # a BatchNorm is not a RiFT module
        rf.mrc_perturbation(model, "bn", x, y)
    with pytest.raises(ValueError, match="sam"):
        rf.mrc_perturbation(model, "conv", x, y, variant="sam")


def test_non_robust_critical_module_is_the_lowest_mrc():
    assert rf.non_robust_critical_module({"a": 0.3, "b": -0.1, "c": 0.2}) == "b"


# --- Fine-tuning one module -----------------------------------------------------------------------

def test_finetune_changes_only_the_chosen_module_and_restores_everything():
    torch.manual_seed(0)
    model = rf.build_model("resnet18", width=4)
    model(torch.rand(4, 3, 16, 16))                            # non-trivial BN statistics, train mode
    before = snapshot(model)
    losses = rf.finetune_module(model, "layer2.1.conv2", uint8_split(n=16, size=16, classes=10), epochs=2,
                                lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert_state_equal(model, before, changed=["layer2.1.conv2"])  # BN statistics included
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_finetune_is_sgd_momentum_with_weight_decay_and_the_step_schedule():
    model = tiny_net()
    split = uint8_split(n=16)
    lr, wd, epochs = 0.1, 5e-4, 4
    hand = tiny_net()
    w, b = hand.fc.weight.detach().clone(), hand.fc.bias.detach().clone()
    bufs = [None, None]
    g = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        lr_e = lr if epoch < epochs // 2 else lr / 10          # /10 from epochs // 2 on (official)
        for x, y in rf.batches(split, 8, g, train=True):       # same seed, same batches
            with torch.no_grad():
                h = F.relu(hand.bn(hand.conv(x))).mean((2, 3))  # eval-mode BN, frozen conv
            wq, bq = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            loss = F.cross_entropy(h @ wq.T + bq, y)
            grads = torch.autograd.grad(loss, [wq, bq])
            for i, (p, gr) in enumerate(zip((w, b), grads)):
                d = gr + wd * p
                bufs[i] = d.clone() if bufs[i] is None else 0.9 * bufs[i] + d
                p -= lr_e * bufs[i]
    rf.finetune_module(model, "fc", split, epochs=epochs, lr=lr, weight_decay=wd, batch_size=8,
                       generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model.fc.weight, w, atol=1e-6) and torch.allclose(model.fc.bias, b, atol=1e-6)


def test_finetune_rejects_unknown_and_non_rift_modules():
    model = tiny_net()
    for bad in ("fc2", "bn", "f"):                             # exact names only, no substrings
        with pytest.raises(ValueError, match=r"\['conv', 'fc', 'dead'\]"):
            rf.finetune_module(model, bad, uint8_split())


# --- Interpolation, the choice of alpha, the whole method -----------------------------------------

def states():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 4, generator=g), "b": torch.tensor([1.0, float("inf")]),
         "bn.num_batches_tracked": torch.tensor(5)}
    b = {"w": torch.randn(3, 4, generator=g), "b": torch.tensor([2.0, 3.0]),
         "bn.num_batches_tracked": torch.tensor(9)}
    return a, b


def test_interpolate_is_exact_at_the_ends_and_linear_between():
    a, b = states()
    at0, at1, mid = rf.interpolate(a, b, 0.0), rf.interpolate(a, b, 1), rf.interpolate(a, b, 0.3)
    assert all(torch.equal(at0[k], a[k]) for k in a)
    assert torch.equal(at1["w"], b["w"]) and torch.equal(at1["b"], b["b"])
    assert torch.equal(at1["bn.num_batches_tracked"], a["bn.num_batches_tracked"])
    assert torch.allclose(mid["w"], 0.7 * a["w"] + 0.3 * b["w"], rtol=0, atol=1e-6)
    assert torch.equal(mid["bn.num_batches_tracked"], a["bn.num_batches_tracked"])
    at0["w"] += 1                                              # copies, not views of the inputs
    assert not torch.equal(at0["w"], a["w"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_interpolate_rejects_alpha_outside_the_unit_interval(alpha):
    with pytest.raises(ValueError, match=f"alpha={alpha!r}"):
        rf.interpolate(*states(), alpha)


def test_rift_alphas_are_the_exact_decimal_grid():
    assert rf.RIFT_ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def table(rows):
    return [dict(alpha=a, clean=c, pgd10=r) for a, c, r in rows]


def test_select_alpha_takes_the_best_clean_gain_within_the_robust_tolerance():
    rows = table([(0.0, 80.0, 50.0), (0.1, 81.0, 50.05), (0.2, 82.0, 49.95), (0.3, 84.0, 49.5), (0.4, 85.0, 48.0)])
    assert rf.select_alpha(rows) == 0.2                        # 0.3 and 0.4 drop more than 0.1
    assert rf.select_alpha(rows, tolerance=0.5) == 0.3
    assert rf.select_alpha(rows, tolerance=5) == 0.4


def test_select_alpha_returns_zero_when_nothing_qualifies():
    assert rf.select_alpha(table([(0.0, 80.0, 50.0), (0.5, 85.0, 49.0), (1.0, 79.0, 51.0)])) == 0.0
    assert rf.select_alpha(table([(0.0, 80.0, 50.0), (0.5, 80.0, 50.0)])) == 0.0   # no gain, no move


def test_select_alpha_tie_breaks_and_float32_drop_of_exactly_the_tolerance():
    rows = table([(0.0, 80.0, 50.0), (0.3, 82.0, 49.95), (0.6, 82.0, 50.0), (0.8, 82.0, 50.0)])
    assert rf.select_alpha(rows) == 0.6                        # same clean: higher robust, then smaller alpha
    drop = 100.0 * torch.tensor(499 / 1000, dtype=torch.float32).item()   # 1 of 1,000 examples, as evaluate
    assert rf.select_alpha(table([(0.0, 80.0, 50.0), (0.4, 81.0, drop)])) == 0.4
    with pytest.raises(ValueError, match="alpha = 0"):
        rf.select_alpha(table([(0.5, 80.0, 50.0)]))


def test_rift_returns_the_state_its_table_scored_and_sweeps_from_the_given_model(monkeypatch):
    """rift's sweep is theta(a) = (1 - a) theta_given + a theta_FT: its a = 0 row is the given
    model's accuracy and its a = 1 row the fine-tuned model's (clean and PGD-10 on the validation
    images, with rift's seed), and the state it returns scores exactly what the table measured at
    the chosen alpha. The wrong way round, (1 - a) theta_FT + a theta_given, the rows come in reverse
    order, and the interpolation and selection tests above still pass."""
    data = rf.synthetic_data(num_train=96, num_test=8, num_classes=5, size=8, seed=3)
    train, val = rf.split_validation(data.train, 32, seed=0)
    torch.manual_seed(0)              # a softmax regression at its random start: fine-tuning moves it far
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    given = snapshot(model)
    tuned = {}
    finetune_module = rf.finetune_module

    def keep_tuned(m, *args, **kwargs):                          # theta_FT: the fine-tuned weights
        losses = finetune_module(m, *args, **kwargs)
        tuned.update(snapshot(m))
        return losses

    monkeypatch.setattr(rf, "finetune_module", keep_tuned)
    result = rf.rift(model, train, val, module="1", epochs=4, lr=0.5, batch_size=16)
    assert_state_equal(model, given)                             # rift leaves the given model as it was

    def scores(state):                                           # as rift's table scores theta(a)
        probe = copy.deepcopy(model)
        probe.load_state_dict(state)
        v = rf.evaluate(probe, val, ["pgd10"], EPS, seed=0)
        return v["clean"], v["pgd10"]

    assert [r["alpha"] for r in result.alphas] == list(rf.RIFT_ALPHAS)
    rows = [(r["clean"], r["pgd10"]) for r in result.alphas]
    assert rows[0] == scores(given)                              # a = 0: the given model
    assert rows[-1] == scores(tuned)                             # a = 1: the fine-tuned one
    chosen = rf.RIFT_ALPHAS.index(result.alpha)
    assert rows[0] != rows[-1] and rows[chosen] != rows[-1 - chosen]   # either direction would show
    assert scores(result.state) == rows[chosen]                  # the state returned: the row chosen


@pytest.mark.parametrize("function, parameter, value, source", [
    ("mrc_perturbation", "radius", 0.1, "RiFT Def. 3.1, epsilon = 0.1 (relative)"), ("mrc_perturbation", "steps", 10, "RiFT Alg. 1, T = 10"),
    ("module_robust_criticality", "radius", 0.1, "RiFT Def. 3.1"), ("module_robust_criticality", "steps", 10, "RiFT Alg. 1"),
    ("finetune_module", "epochs", 10, "RiFT Sec. 4"), ("finetune_module", "lr", 1e-3, "RiFT Sec. 4"),
    ("finetune_module", "weight_decay", 5e-4, "RiFT Sec. 4"), ("finetune_module", "batch_size", 128, "RiFT Sec. 4"),
    ("select_alpha", "tolerance", 0.1, "RiFT Sec. 3.3: at most 0.1 points of robust accuracy"),
    ("rift", "mrc_radius", 0.1, "RiFT Def. 3.1"), ("rift", "mrc_steps", 10, "RiFT Alg. 1"),
    ("rift", "epochs", 10, "RiFT Sec. 4"), ("rift", "lr", 1e-3, "RiFT Sec. 4"), ("rift", "weight_decay", 5e-4, "RiFT"),
    ("rift", "tolerance", 0.1, "RiFT Sec. 3.3"), ("rift", "eps", 8 / 255, "RiFT Sec. 4"),
    ("rift_adversarial_set", "steps", 10, "RiFT: PGD-10 for L_rob"),
    ("rift_mrc", "mrc_radius", 0.1, "RiFT Def. 3.1"), ("rift_mrc", "mrc_steps", 10, "RiFT Alg. 1"),
    ("corruption_accuracy", "severities", (1, 2, 3, 4, 5), "CIFAR-10-C severities"),
])
def test_rift_defaults_are_the_papers_values(function, parameter, value, source):
    assert_paper_default(function, parameter, value, source)


# --- OOD accuracy (RiFT Sec. 5.1) on corrupted test images, made and loaded by appendix D ---------

class Constant(nn.Module):
    """Always predicts class 0."""

    def forward(self, x):
        return F.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()


def test_corruption_groups_are_curés_four_means():
    accuracy = {"gaussian_noise": 10.0, "speckle_noise": 20.0, "fog": 30.0, "frost": 50.0, "contrast": 7.0,
                "saturate": 99.0}                               # saturate is in no group
    assert rf.corruption_groups(accuracy) == {"noise": 15.0, "weather": 40.0, "digital": 7.0}
    grouped = [n for names in rf.CORRUPTION_GROUPS.values() for n in names]
    assert len(grouped) == len(set(grouped)) == 17 and set(rf.CORRUPTIONS) <= set(grouped)
    assert set(grouped) - set(rf.CORRUPTIONS) == {"speckle_noise", "gaussian_blur"}
    assert rf.GENERATED_CORRUPTIONS == tuple(n for n in grouped if n != "frost")


def test_corruption_accuracy_averages_severities_and_corruptions():
    split = uint8_split(n=20, classes=10)
    r = rf.corruption_accuracy(Constant(), split, names=("contrast", "jpeg_compression"), severities=(1, 3))
    expect = 100.0 * (split.y == 0).float().mean().item()
    assert r["contrast"] == pytest.approx(expect) and r["mean"] == pytest.approx(expect)
    assert r["n"] == 40 and set(r) == {"contrast", "jpeg_compression", "mean", "n", "groups", "severity"}
    assert r["groups"] == {"digital": pytest.approx(expect)}
    assert r["severity"] == {"contrast": {1: pytest.approx(expect), 3: pytest.approx(expect)},
                             "jpeg_compression": {1: pytest.approx(expect), 3: pytest.approx(expect)}}


def test_corruption_accuracy_matches_a_hand_evaluation():
    model, split = tiny_net(), uint8_split(n=24)
    r = rf.corruption_accuracy(model, split, names=("gaussian_noise", "fog"), severities=(2, 5), seed=3)
    accs = {}
    for name in ("gaussian_noise", "fog"):
        accs[name] = []
        for s in (2, 5):
            xc = rf.corrupt(split.x.float() / 255, name, s, rf.corruption_generator(3, name, s))
            with torch.no_grad():
                pred = model((xc * 255).round() / 255).argmax(1)
            accs[name].append(100.0 * (pred == split.y).float().mean().item())
    for name, a in accs.items():
        assert r[name] == pytest.approx(sum(a) / 2, abs=1e-4)
        assert [r["severity"][name][s] for s in (2, 5)] == pytest.approx(a, abs=1e-4)
    assert r["mean"] == pytest.approx((r["gaussian_noise"] + r["fog"]) / 2)
    assert r["groups"] == pytest.approx({"noise": r["gaussian_noise"], "weather": r["fog"]})
    with pytest.raises(ValueError, match="frost.*files"):
        rf.corruption_accuracy(model, split, names=("frost",))


def test_corruption_accuracy_on_files_matches_a_hand_evaluation(tmp_path):
    write_fake_cifar10c(tmp_path, ["fog", "pixelate"], per=6)
    data = rf.load_corrupted(str(tmp_path), ["fog", "pixelate"], severities=(1, 3))
    model = tiny_net()
    r = rf.corruption_accuracy(model, uint8_split(), files=data)
    with torch.no_grad():
        hand = {s: 100.0 * (model(data["fog"][s].x.float() / 255).argmax(1) == data["fog"][s].y).float().mean().item()
                for s in (1, 3)}
    assert r["severity"]["fog"] == pytest.approx(hand) and r["fog"] == pytest.approx((hand[1] + hand[3]) / 2)
    assert r["n"] == 12 and set(r["severity"]) == {"fog", "pixelate"}
    with pytest.raises(ValueError, match="not loaded"):
        rf.corruption_accuracy(model, uint8_split(), names=("contrast",), files=data)


# =============================================================================
# 5. Evaluation: clean, PGD and CW accuracy, the per-example worst case; NRR (Eq. 9)
# =============================================================================

def test_evaluation_attacks_are_the_papers_and_the_official_ones_step_0_003_whatever_eps(monkeypatch):
    assert {k: (v["steps"], v["loss"]) for k, v in rf.EVAL_ATTACKS.items() if "official" not in k} == {
        "pgd10": (10, "ce"), "pgd20": (20, "ce"), "pgd100": (100, "ce"), "cw": (20, "cw")}
    assert rf.EVAL_ATTACKS["pgd20_official"]["step_size"] == 0.003      # NeurAI-Lab/CURE adv_utils.py
    model, x, y = tiny_model(), *tiny_batch(4)
    seen = []
    real_pgd = rf.pgd

    def spy(model, x, y, eps, step_size=2 / 255, steps=10, loss="ce", **k):
        seen.append((eps, step_size, steps, loss))
        return real_pgd(model, x, y, eps, step_size, steps, loss, **k)

    monkeypatch.setattr(rf, "pgd", spy)
    split = rf.Split(x.mul(255).to(torch.uint8), y)
    result = rf.evaluate(model, split, ["pgd20", "pgd20_official", "cw_official"], eps=4 / 255)
    assert seen == [(4 / 255, 2 / 255, 20, "ce"), (4 / 255, 0.003, 20, "ce"), (4 / 255, 0.003, 20, "cw")]
    assert {"pgd20_official", "cw_official"} <= set(result)


def test_accuracies_are_exact_fractions_of_integer_counts():
    assert rf.percent(940, 1000) == 94.0
    assert rf.percent(torch.tensor(1), 3) == 100 / 3
    model = tiny_model().eval()
    data = rf.synthetic_data(num_train=10, num_test=30, size=16)
    out = rf.evaluate(model, data.test, ["pgd10"], EPS, batch_size=16)
    for name, count in out["counts"].items():
        assert out[name] == 100 * count / 30                # exactly, not float32's 93.99999976158142


def test_evaluate_robust_is_the_per_example_worst_case():
    model = tiny_model().eval()
    data = rf.synthetic_data(num_train=10, num_test=40, size=16)
    out = rf.evaluate(model, data.test, ["pgd10", "cw"], EPS, batch_size=16)
    assert out["n"] == 40
    assert out["worst"] <= min(out["pgd10"], out["cw"]) <= out["clean"] + 1e-9


class PixelClassifier(nn.Module):
    """Predicts class floor(10 * x[:, 0, 0, 0]) (clamped to 0..9): a 2/255 nudge flips it at a boundary."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 10).floor().clamp(0, 9).long()
        return F.one_hot(cls, 10).float() + 0.0 * x.sum((1, 2, 3))[:, None]


def indexed_split(n=23):
    """Images whose pixel (1, 0, 0) encodes the example's index and pixel (0, 0, 0) its class.

    Example i has label i % 10; it is classified correctly unless i % 5 == 0 (then its class pixel
    says class i + 5, so no nudge can make it right). Class pixels of classes 0-4 sit 1/255 below their upper boundary, those of
    5-9 1/255 above their lower one, so `nudge` flips any of them.
    """
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    y = torch.arange(n) % 10
    shown = torch.where(torch.arange(n) % 5 == 0, (y + 5) % 10, y)
    x[:, 0, 0, 0] = torch.where(shown < 5, ((shown + 1) * 25.5).floor() - 1, (shown * 25.5).ceil() + 1).to(torch.uint8)
    x[:, 1, 0, 0] = torch.arange(n).to(torch.uint8)
    return rf.Split(x, y)


def nudge(x, fooled):
    """Move the class pixel of the `fooled` examples across the nearest class boundary (2/255)."""
    x_adv = x.clone()
    pixel = x_adv[:, 0, 0, 0]
    x_adv[:, 0, 0, 0] = torch.where(fooled, pixel + torch.where(pixel < 0.5, 2 / 255, -2 / 255), pixel)
    return x_adv


FOOLS = {"ce": lambda i: i % 2 == 0, "cw": lambda i: i % 3 == 0}   # which examples each fake attack fools


def fake_pgd(model, x, y, eps, step_size, steps=10, loss="ce", random_start=True, generator=None):
    """Nudges the examples FOOLS[loss] picks (2/255, inside the eps-ball) across a class boundary."""
    index = (x[:, 1, 0, 0] * 255).round().long()
    return nudge(x, torch.tensor([bool(FOOLS[loss](int(i))) for i in index]))


def test_evaluate_robust_is_the_per_example_and_over_attacks(monkeypatch):
    monkeypatch.setattr(rf, "pgd", fake_pgd)
    split, n = indexed_split(23), 23
    out = rf.evaluate(PixelClassifier(), split, ["pgd10", "cw"], EPS, batch_size=4)   # 23 = 5 x 4 + 3
    clean = [i % 5 != 0 for i in range(n)]
    pgd = [c and not FOOLS["ce"](i) for i, c in enumerate(clean)]
    cw = [c and not FOOLS["cw"](i) for i, c in enumerate(clean)]
    robust = [p and c for p, c in zip(pgd, cw)]                              # the per-example AND, by hand
    assert out["counts"] == {"clean": sum(clean), "pgd10": sum(pgd), "cw": sum(cw)}
    assert out["worst"] == 100 * sum(robust) / n
    assert sum(robust) < min(sum(pgd), sum(cw))      # the attacks disagree: a min() of columns would be wrong
    assert out["clean"] == 100 * sum(clean) / n and out["pgd10"] == 100 * sum(pgd) / n


def test_evaluate_counts_the_top_class_share_and_collapsed_reads_it():
    data = rf.synthetic_data(num_train=10, num_test=40, size=16)
    constant = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.arange(10.0) == 3)                      # always class 3
    out = rf.evaluate(constant, data.test, [], EPS, batch_size=16)
    assert out["top_class_share"] == 100.0
    assert out["clean"] == 100 * int((data.test.y == 3).sum()) / 40
    spread = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))         # whatever a random layer says
    x, _ = next(rf.batches(data.test, 40))
    with torch.no_grad():
        predictions = spread(x).argmax(1).tolist()
    top = max(predictions.count(c) for c in range(10))
    assert rf.evaluate(spread, data.test, [], EPS, batch_size=16)["top_class_share"] == 100 * top / 40
    # more than half of the predictions on one class, or clean accuracy within 5 points of chance
    assert rf.collapsed({"top_class_share": 50.5, "clean": 90.0}, 10)
    assert not rf.collapsed({"top_class_share": 50.0, "clean": 90.0}, 10)
    assert rf.collapsed({"top_class_share": 20.0, "clean": 15.0}, 10)
    assert not rf.collapsed({"top_class_share": 20.0, "clean": 15.1}, 10)
    assert rf.collapsed({"top_class_share": 5.0, "clean": 6.0}, 100)
    assert not rf.collapsed({"top_class_share": 5.0, "clean": 6.5}, 100)


def test_nrr_is_the_harmonic_mean():
    assert rf.nrr(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120)
    assert rf.nrr(0.0, 0.0) == 0.0


@pytest.mark.parametrize("function, parameter, value, source", [
    ("evaluate", "eps", 8 / 255, "evaluation radius"), ("evaluate", "step_size", 2 / 255, "PGD-20 step"),
])
def test_evaluation_defaults_are_the_papers_values(function, parameter, value, source):
    assert_paper_default(function, parameter, value, source)


# =============================================================================
# 6. Models (CIFAR variants: 3x3 stem, no max-pool; inputs in [0, 1], normalised inside)
# =============================================================================

def hand_resnet_count(blocks, bottleneck, width=64, classes=10):
    """Parameters of a CIFAR ResNet counted by hand: conv weights, BN weight+bias (2 per channel), the
    projection shortcuts where the shape changes, and the linear layer."""
    total = 3 * 9 * width + 2 * width                                   # 3x3 stem + BN
    c_in = width
    for stage, count in enumerate(blocks):
        c = width * 2 ** stage
        c_out = 4 * c if bottleneck else c
        for j in range(count):
            if bottleneck:      # 1x1 c_in -> c, 3x3 c -> c, 1x1 c -> 4c, each with BN
                total += c_in * c + 2 * c + 9 * c * c + 2 * c + c * c_out + 2 * c_out
            else:               # 3x3 c_in -> c, 3x3 c -> c
                total += 9 * c_in * c + 2 * c + 9 * c * c + 2 * c
            if c_in != c_out or (j == 0 and stage > 0):
                total += c_in * c_out + 2 * c_out                       # 1x1 projection + BN
            c_in = c_out
    return total + c_in * classes + classes


@pytest.mark.parametrize("name, count, hand", [
    ("resnet18", 11_173_962, hand_resnet_count((2, 2, 2, 2), False)),
    ("preact_resnet18", 11_172_170, None),
    ("resnet34", 21_282_122, hand_resnet_count((3, 4, 6, 3), False)),
    ("resnet50", 23_520_842, hand_resnet_count((3, 4, 6, 3), True)),
    ("resnet101", 42_512_970, hand_resnet_count((3, 4, 23, 3), True)),
    ("wrn34_10", 46_160_474, None)])
def test_parameter_counts_match_the_papers_models(name, count, hand):
    with torch.device("meta"):
        model = rf.build_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    assert hand is None or hand == count


@pytest.mark.parametrize("name, modules", [
    ("resnet18", ["conv1", "layer1.0.conv1", "layer1.1.bn2", "layer2.1.conv2", "layer3.0.shortcut",
                  "layer4.1.conv2", "linear"]),
    ("preact_resnet18", ["conv1", "layer2.1.conv2", "layer4.0.shortcut", "bn", "linear"]),
    ("resnet34", ["layer2.3.conv2", "layer3.5.conv2", "layer4.2.conv2", "layer2.0.shortcut", "linear"]),
    ("resnet50", ["layer1.0.conv3", "layer1.0.shortcut", "layer3.5.conv2", "layer4.2.conv3", "linear"]),
    ("resnet101", ["layer3.22.conv3", "layer4.0.shortcut", "linear"]),
    ("wrn34_10", ["conv1", "block1.layer.3.conv2", "block2.layer.0.conv1", "block3.layer.4.conv2",
                  "bn1", "fc"]),
])
def test_module_names_match_the_rift_paper(name, modules):
    with torch.device("meta"):
        names = dict(rf.build_model(name).named_modules())
    for m in modules:
        assert m in names


def test_models_take_unit_range_inputs_and_normalise_inside():
    model = tiny_model().eval()
    x = torch.rand(2, 3, 32, 32)
    norm = model.normalize
    assert torch.allclose(norm(x), (x - norm.mean) / norm.std)
    assert model(x).shape == (2, 10)


# --- Forward passes against functional re-implementations of the papers' architectures ------------

NORM_MEAN, NORM_STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)   # not CIFAR-10's: the model must use its own


class Recorder(dict):
    """A state dict that remembers which entries were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.used = set()

    def __getitem__(self, k):
        self.used.add(k)
        return super().__getitem__(k)


def f_bn(sd, name, h):
    return F.batch_norm(h, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=1e-5)


def f_conv(sd, name, h, stride=1):
    w = sd[f"{name}.weight"]
    return F.conv2d(h, w, stride=stride, padding=(w.shape[-1] - 1) // 2)


def f_head(sd, name, h):
    return F.linear(F.adaptive_avg_pool2d(h, 1).flatten(1), sd[f"{name}.weight"], sd[f"{name}.bias"])


def f_normalise(x):
    """(x - mean) / std per channel; the model keeps mean and std as float32 buffers."""
    mean = torch.tensor(NORM_MEAN, dtype=torch.float32).to(x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(NORM_STD, dtype=torch.float32).to(x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def f_resnet18(sd, x):
    """He et al.: conv-bn-relu stem; blocks relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x)."""
    h = F.relu(f_bn(sd, "bn1", f_conv(sd, "conv1", f_normalise(x))))
    for stage, stride in zip((1, 2, 3, 4), (1, 2, 2, 2)):
        for j in range(2):
            p, s = f"layer{stage}.{j}", stride if j == 0 else 1
            out = F.relu(f_bn(sd, f"{p}.bn1", f_conv(sd, f"{p}.conv1", h, s)))
            out = f_bn(sd, f"{p}.bn2", f_conv(sd, f"{p}.conv2", out))
            short = f_bn(sd, f"{p}.shortcut.1", f_conv(sd, f"{p}.shortcut.0", h, s)) if stage > 1 and j == 0 else h
            h = F.relu(out + short)
    return f_head(sd, "linear", h)


def f_preact_resnet18(sd, x):
    """Rice et al.'s PreAct ResNet-18: conv stem; a = relu(bn1 x), conv2(relu(bn2(conv1 a))) +
    (1x1 conv of a where the shape changes, else x); final relu(bn) before the pool."""
    h = f_conv(sd, "conv1", f_normalise(x))
    for stage, stride in zip((1, 2, 3, 4), (1, 2, 2, 2)):
        for j in range(2):
            p, s = f"layer{stage}.{j}", stride if j == 0 else 1
            a = F.relu(f_bn(sd, f"{p}.bn1", h))
            short = f_conv(sd, f"{p}.shortcut.0", a, s) if stage > 1 and j == 0 else h
            out = f_conv(sd, f"{p}.conv2", F.relu(f_bn(sd, f"{p}.bn2", f_conv(sd, f"{p}.conv1", a, s))))
            h = out + short
    return f_head(sd, "linear", F.relu(f_bn(sd, "bn", h)))


def f_wrn34(sd, x, width):
    """TRADES' WRN-34: conv 3->16; 3 stages of 5 pre-activation blocks (1x1 conv of the activated
    input where the shape changes); final relu(bn1) before the pool."""
    h = f_conv(sd, "conv1", f_normalise(x))
    c_in = 16
    for stage, (c_out, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), 1):
        for j in range(5):
            p, s = f"block{stage}.layer.{j}", stride if j == 0 else 1
            a = F.relu(f_bn(sd, f"{p}.bn1", h))
            short = h if j > 0 or (c_in == c_out and s == 1) else f_conv(sd, f"{p}.shortcut", a, s)
            out = f_conv(sd, f"{p}.conv2", F.relu(f_bn(sd, f"{p}.bn2", f_conv(sd, f"{p}.conv1", a, s))))
            h = out + short
        c_in = c_out
    return f_head(sd, "fc", F.relu(f_bn(sd, "bn1", h)))


@pytest.mark.parametrize("name, width, reference", [
    ("resnet18", 2, f_resnet18), ("preact_resnet18", 2, f_preact_resnet18),
    ("wrn34_10", 4, lambda sd, x: f_wrn34(sd, x, 4)),
])
def test_model_forward_matches_a_functional_reimplementation(name, width, reference):
    model = tiny_model(width, seed=6, name=name, mean=NORM_MEAN, std=NORM_STD, random_bn=True).double().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sd = Recorder({k: v for k, v in model.state_dict().items()
                   if not k.startswith("normalize.") and not k.endswith("num_batches_tracked")})
    with torch.no_grad():
        got, expect = model(x), reference(sd, x)
    assert got.shape == (2, 10)
    assert torch.allclose(got, expect, rtol=1e-10, atol=1e-12)
    assert sd.used == set(sd)                                   # every weight has its place


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match="vgg16.*preact_resnet18.*resnet101.*resnet18.*resnet50.*wrn34_10"):
        rf.build_model("vgg16")


# =============================================================================
# 7. Data: uint8 tensors on the training device, augmented in batches (no DataLoader)
# =============================================================================

def test_folder_dataset_holds_out_the_last_images_of_each_class(tmp_path):
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "train" / c)
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), 10 * i + (c == "dog"), np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    data = rf.load_data("folder", str(tmp_path), holdout_per_class=2)
    assert data.num_classes == 2 and len(data.train) == 6 and len(data.test) == 4
    assert sorted(data.test.x[:, 0, 0, 0].tolist()) == [30, 31, 40, 41]
    assert data.test.y.tolist() == [0, 0, 1, 1]


TINY_WNIDS = ["n09999999", "n01443537", "n02123045"]     # wnids.txt order is not sorted order
TINY_COLOURS = {"n01443537": (230, 20, 20), "n02123045": (20, 230, 20), "n09999999": (20, 20, 230)}


def make_tiny_imagenet(root, per_class=3, val=(("n02123045", "n01443537", "n09999999", "n02123045"))):
    """A miniature tiny-imagenet-200/ in the distributed layout: train/<wnid>/images/*.JPEG,
    train/<wnid>/<wnid>_boxes.txt, val/images/*.JPEG, val/val_annotations.txt, wnids.txt, test/images.
    Each class is a solid colour (which survives JPEG), one training image is greyscale."""
    root = root / "tiny-imagenet-200"

    def jpeg(path, colour, grey=False):
        os.makedirs(path.parent, exist_ok=True)
        im = Image.fromarray(np.full((64, 64, 3), colour, np.uint8))
        (im.convert("L") if grey else im).save(path, "JPEG")

    os.makedirs(root)
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for w in TINY_WNIDS:
        for i in range(per_class):
            jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", TINY_COLOURS[w], grey=(w, i) == (TINY_WNIDS[0], 2))
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i, w in enumerate(val):
        jpeg(root / "val" / "images" / f"val_{i}.JPEG", TINY_COLOURS[w])
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    jpeg(root / "test" / "images" / "test_0.JPEG", (0, 0, 0))   # unlabelled: not read
    return root


def test_tiny_imagenet_reads_the_distributed_layout_with_validation_labels(tmp_path):
    root = make_tiny_imagenet(tmp_path)
    data = rf.load_data("tinyimagenet", str(tmp_path))          # the parent folder works too
    assert data.num_classes == 3 and (data.mean, data.std) == rf.DATASET_STATS["tinyimagenet"]
    assert data.train.x.shape == (9, 3, 64, 64) and data.train.x.dtype == torch.uint8
    assert data.test.x.shape == (4, 3, 64, 64)
    order = sorted(TINY_WNIDS)                                  # labels: sorted wnids, as ImageFolder
    assert data.test.y.tolist() == [order.index(w) for w in ("n02123045", "n01443537", "n09999999", "n02123045")]
    for split in (data.train, data.test):                      # every label is its image's colour
        for x, y in zip(split.x, split.y):
            colour = TINY_COLOURS[order[y]]
            if x[0, 0, 0] != x[1, 0, 0]:                        # (the greyscale one is grey)
                assert (x[:, 32, 32].float() - torch.tensor(colour)).abs().max() < 12
    assert torch.equal(rf.tiny_imagenet_data(str(root)).test.y, data.test.y)


def test_missing_download_names_the_folder_and_data_dir(tmp_path):
    with pytest.raises(RuntimeError, match=f"{tmp_path}.*as data_dir"):
        rf.torchvision_data("cifar10", str(tmp_path), download=False)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match="imagenet.*cifar10.*synthetic"):
        rf.load_data("imagenet")


def test_validation_split_is_disjoint_and_seeded():
    data = rf.synthetic_data(num_train=50, num_test=10, size=8)
    data.train.x[:, 0, 0, 0] = torch.arange(50, dtype=torch.uint8)  # tag every image
    train, val = rf.split_validation(data.train, 10, seed=1)
    tags_t, tags_v = set(train.x[:, 0, 0, 0].tolist()), set(val.x[:, 0, 0, 0].tolist())
    assert len(tags_v) == 10 and not tags_t & tags_v and len(tags_t | tags_v) == 50
    assert torch.equal(rf.split_validation(data.train, 10, seed=1)[1].x, val.x)


def test_augment_is_a_padded_crop_and_optional_flip():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    g = torch.Generator().manual_seed(3)
    out = rf.augment(x, g)
    g = torch.Generator().manual_seed(3)                      # replay the same draws
    dy, dx = torch.randint(9, (2, 2), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(2):
        expect = padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 6]
        if flip[i]:
            expect = expect[:, :, ::-1]
        assert np.array_equal(out[i].numpy(), expect)


def test_training_batches_are_full_shuffled_and_in_unit_range():
    data = rf.synthetic_data(num_train=100, num_test=10, size=8)
    seen = []
    for x, y in rf.batches(data.train, 32, torch.Generator().manual_seed(0), train=True):
        assert x.shape == (32, 3, 8, 8) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1
        seen.append(y)
    assert len(seen) == 3                                     # 100 // 32 full batches
    assert not torch.equal(torch.cat(seen), data.train.y[:96])  # shuffled


# =============================================================================
# 8. Analyses (CURE Sections 3, 5 and 6, Appendices D-G): CKA, minimum perturbation, the layer-wise
# study, gradient magnitudes, update shares
# =============================================================================

# Against hand computations (Kornblith et al.'s CKA in NumPy, brute-force HSIC, the closed-form
# minimum perturbation of linear models, bit-identical frozen tensors, hand-made mask sequences).

def kornblith_cka(x, y):
    """Kornblith et al.'s `feature_space_linear_cka` (debiased=False), transcribed in numpy."""
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


# --- CKA ------------------------------------------------------------------------------------------

def test_cka_of_a_matrix_with_itself_is_one():
    x = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    assert float(rf.linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    wide = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))   # Gram path (n < p)
    assert float(rf.linear_cka(wide, wide)) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling_only():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = float(rf.linear_cka(x, y))
    assert float(rf.linear_cka(x @ q, y)) == pytest.approx(base, abs=1e-12)
    assert float(rf.linear_cka(3.7 * x, 0.2 * y)) == pytest.approx(base, abs=1e-12)
    assert float(rf.linear_cka(x + 5.0, y - 2.0)) == pytest.approx(base, abs=1e-12)    # centring
    skew = torch.diag(torch.tensor([1.0, 10, 1, 1, 1, 1], dtype=torch.float64))      # not orthogonal
    assert abs(float(rf.linear_cka(x @ skew, y)) - base) > 1e-3


def test_cka_on_a_4x2_example_by_hand():
    # X is centred: X^T X = 2 I (||.||_F = 2 sqrt 2); Y^T Y = [2] (norm 2); Y^T X = [2, 0] (squared norm 4).
    x = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    y = torch.tensor([[1.0], [0], [-1], [0]])
    assert float(rf.linear_cka(x, y)) == pytest.approx(4 / (2 * math.sqrt(2) * 2), abs=1e-15)
    assert float(rf.linear_cka(x, y)) == pytest.approx(1 / math.sqrt(2), abs=1e-15)


@pytest.mark.parametrize("n,p,q", [(40, 5, 3), (6, 50, 20)])   # feature form and Gram form
def test_cka_matches_kornblith_reference(n, p, q):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, p, generator=g), torch.randn(n, q, generator=g)
    y[:, 0] += 2 * x[:, 0]
    ref = kornblith_cka(x.double().numpy(), y.double().numpy())
    assert float(rf.linear_cka(x, y)) == pytest.approx(ref, rel=1e-10)
    assert rf.linear_cka(x, y).dtype == torch.float64


def test_unbiased_hsic_equals_the_u_statistic_by_brute_force():
    # Song et al. 2012: HSIC_1 = (n-4)!/n! sum over distinct (i,j,q,r) of h, with
    # h = 1/24 sum over the orderings (s,t,u,v) of k_st l_st + k_st l_uv - 2 k_st l_su.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    k, l = (x @ x.T).numpy(), (y @ y.T).numpy()
    n, total = 6, 0.0
    for quad in itertools.permutations(range(n), 4):
        h = 0.0
        for s, t, u, v in itertools.permutations(quad):
            h += k[s, t] * l[s, t] + k[s, t] * l[u, v] - 2 * k[s, t] * l[s, u]
        total += h / 24
    expected = total * math.factorial(n - 4) / math.factorial(n)
    assert float(rf.hsic_unbiased(x, y)) == pytest.approx(expected, rel=1e-10)


def test_cka_layers_are_the_official_ones():
    model = tiny_model(width=2)
    assert rf.block_names(model) == ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["linear"]
    layers = rf.layer_names(model)
    assert layers[:2] == ["conv1", "bn1"] and layers[-1] == "linear"
    assert len(layers) == 1 + 1 + 4 * 2 * 4 + 3 * 2 + 1     # stem, 8 blocks x (2 conv + 2 bn), 3 shortcuts, fc


def test_block_features_are_the_module_outputs_and_hooks_go_away():
    model, (x, _) = tiny_model(width=2), tiny_batch(size=8)
    model.train()
    feats = rf.block_features(model, x, ["conv1", "layer1.0", "layer4.1", "linear"])
    assert model.training
    with torch.no_grad():
        model.eval()
        stem = model.conv1(model.normalize(x))
        l10 = model.layer1[0](F.relu(model.bn1(stem)))
        logits = model(x)
    assert torch.equal(feats["conv1"], stem.flatten(1))
    assert torch.equal(feats["layer1.0"], l10.flatten(1))
    assert torch.equal(feats["linear"], logits)
    assert feats["layer4.1"].shape == (8, 16 * 1 * 1)        # 8 * width channels at 1x1
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError):
        rf.block_features(model, x[:, :2], ["conv1", "layer1.0"])    # wrong channel count
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError):
        rf.block_features(model, x, ["layer9"])


def test_clean_vs_adversarial_cka_is_one_at_eps_zero_and_matches_by_hand():
    model, (x, y) = tiny_model(width=2), tiny_batch(12, 8)
    split = rf.Split((x * 255).round().to(torch.uint8), y)
    x = split.x.float() / 255                                       # what the function sees
    names = rf.block_names(model)
    same = rf.cka_clean_vs_adversarial(model, split, names, 0.0, 0.0, 2, 6, seed=0)
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in same.values())
    same_mb = rf.cka_clean_vs_adversarial(model, split, names, 0.0, 0.0, 2, 6, seed=0, estimator="minibatch")
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in same_mb.values())
    eps = 8 / 255
    got = rf.cka_clean_vs_adversarial(model, split, ["layer2.1", "linear"], eps, 2 / 255, 3, 6, seed=5, cross=True)
    x_adv = torch.cat([rf.pgd(model, x[i:i + 6], y[i:i + 6], eps, 2 / 255, 3,
                              generator=rf.batch_generator(5, i // 6, x.device)) for i in (0, 6)])
    model.eval()
    acts = {}
    hook = model.layer2[1].register_forward_hook(lambda m, i, o: acts.__setitem__("h", o.flatten(1)))
    with torch.no_grad():
        c_lin, c_l2 = model(x), acts["h"]
        a_lin, a_l2 = model(x_adv), acts["h"]
    hook.remove()
    hand = lambda a, b: kornblith_cka(a.double().numpy(), b.double().numpy())   # noqa: E731
    assert got["layer2.1"]["layer2.1"] == pytest.approx(hand(c_l2, a_l2), rel=1e-9)
    assert got["layer2.1"]["linear"] == pytest.approx(hand(c_l2, a_lin), rel=1e-9)
    assert got["linear"]["layer2.1"] == pytest.approx(hand(c_lin, a_l2), rel=1e-9)
    assert got["linear"]["linear"] == pytest.approx(hand(c_lin, a_lin), rel=1e-9)


# --- Minimum perturbation -------------------------------------------------------------------------

def linear_setup(classes, n=40, seed=0, d=(3, 2, 2)):
    """f(x) = W vec(x) + b, x in [0.35, 0.65]: eps <= 0.3 never reaches the [0, 1] box."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(d)), classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, int(np.prod(d)), generator=g))
        model[1].bias.copy_(0.3 * torch.randn(classes, generator=g))
    x = 0.35 + 0.3 * torch.rand(n, *d, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def closed_form(model, x, y):
    """min_j (z_y - z_j) / ||w_y - w_j||_1, in float64 by hand."""
    w, b = model[1].weight.detach().double().numpy(), model[1].bias.detach().double().numpy()
    z = x.flatten(1).double().numpy() @ w.T + b
    out = []
    for i, c in enumerate(y.tolist()):
        out.append(min((z[i, c] - z[i, j]) / np.abs(w[c] - w[j]).sum() for j in range(len(b)) if j != c))
    return np.array(out)


def test_minimum_perturbation_is_the_closed_form_for_a_binary_linear_model():
    model, x, y = linear_setup(classes=2, n=60)
    tol, eps_max = 1e-3, 0.2
    got = rf.minimum_perturbation(model, x, y, eps_max, tol, steps=10, restarts=1, step_fraction=0.25,
                                  generator=torch.Generator().manual_seed(0)).double().numpy()
    want = closed_form(model, x, y)
    inside = want < eps_max
    assert inside.sum() >= 20 and (~inside).sum() >= 1          # both cases occur
    assert np.all(np.isinf(got[~inside]))
    assert np.all(got[inside] >= want[inside] - 1e-5)
    assert np.all(got[inside] <= want[inside] + tol + 1e-5)


def test_minimum_perturbation_never_beats_the_closed_form_with_more_classes():
    model, x, y = linear_setup(classes=4, n=40, seed=1)
    got = rf.minimum_perturbation(model, x, y, 0.3, 1e-3, 10, 2, 0.25, torch.Generator().manual_seed(0))
    want = closed_form(model, x, y)
    finite = np.isfinite(got.numpy())
    assert finite.sum() >= 20
    assert np.all(got.double().numpy()[finite] >= want[finite] - 1e-5)   # no attack beats the true minimum


def test_minimum_perturbation_zero_when_wrong_and_inf_when_never_fooled():
    model, x, y = linear_setup(classes=2, n=10, seed=2)
    y_wrong = y.clone()
    y_wrong[:3] = 1 - y_wrong[:3]                  # misclassified clean
    got = rf.minimum_perturbation(model, x, y_wrong, 1e-4, 1e-5, 10, 1, 0.25, torch.Generator().manual_seed(0))
    want = closed_form(model, x, y)
    assert torch.equal(got[:3], torch.zeros(3))
    assert all(math.isinf(v) for v, w in zip(got[3:].tolist(), want[3:]) if w > 1e-4)


# --- Layer-wise freezing --------------------------------------------------------------------------

def test_layerwise_blocks_maps_the_u_notation():
    assert rf.layerwise_blocks("23") == ("conv1", "bn1", "layer2", "layer3")
    assert rf.layerwise_blocks(234, stem=False) == ("layer2", "layer3", "layer4")
    assert rf.layerwise_blocks("45", stem=False) == ("layer4", "linear")
    for bad in ("", "6", "11", "0"):
        with pytest.raises(ValueError):
            rf.layerwise_blocks(bad)


def test_freeze_all_but_matches_whole_name_components():
    model = nn.Module()
    model.layer1, model.layer10 = nn.Linear(2, 2), nn.Linear(2, 2)
    assert rf.freeze_all_but(model, ["layer1"]) == ["layer1.weight", "layer1.bias"]
    assert not model.layer10.weight.requires_grad
    with pytest.raises(ValueError):
        rf.freeze_all_but(model, ["layer2"])


def _at_steps(model, n_steps=3):
    opt = rf.make_optimizer(model, lr=0.1, weight_decay=5e-4)
    model.train()
    for s in range(n_steps):
        x, y = tiny_batch(size=8, seed=s)
        rf.at_step(model, opt, x, y, 8 / 255, 2 / 255, 2)


@pytest.mark.parametrize("strict_bn", [False, True])
def test_frozen_blocks_stay_bit_identical_under_adversarial_training(strict_bn):
    model = tiny_model(width=2)
    prefixes = rf.layerwise_blocks("23")
    trainable = rf.freeze_all_but(model, prefixes)
    assert trainable == [n for n, _ in model.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer2", "layer3")]
    handles = rf.freeze_bn_(model, prefixes) if strict_bn else []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _at_steps(model)
    after = model.state_dict()
    params = dict(model.named_parameters())
    for k in before:
        frozen = not rf._under(k, prefixes)
        if k in params:
            assert torch.equal(before[k], after[k]) == frozen, k        # frozen: identical; trainable: moved
        elif frozen and strict_bn:
            assert torch.equal(before[k], after[k]), k                  # buffers of frozen BN too
        elif k.endswith("running_mean"):
            assert not torch.equal(before[k], after[k]), k              # official: statistics adapt
    for h in handles:
        h.remove()
    model.train()
    assert all(m.training for m in model.modules())


def test_reinitialize_touches_only_the_named_convs_and_classifier():
    model = tiny_model(width=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rf.reinitialize_(model, ("layer2", "linear"), torch.Generator().manual_seed(0))
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        expect = k.startswith("layer2") and ("conv" in k or "shortcut.0" in k) or k.startswith("linear")
        assert changed == expect, k
    w = model.layer2[0].conv2.weight
    assert w.abs().max() <= math.sqrt(6 / (w.shape[0] * 9))             # bound sqrt(6 / fan_out)
    assert torch.equal(model.linear.bias, torch.zeros_like(model.linear.bias))
    assert float(model.linear.weight.detach().std()) == pytest.approx(0.01, rel=0.3)


# --- Gradient magnitudes and update shares --------------------------------------------------------

def test_gradient_magnitudes_equal_the_hand_mean():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, 3, 3, generator=g), None, torch.randn(7, generator=g)]
    got = rf.gradient_magnitudes(grads)
    want = [np.abs(grads[0].double().numpy()).mean(), 0.0, np.abs(grads[2].double().numpy()).mean()]
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_optimizer_pre_hook_sees_the_step_gradient_of_at():
    model = tiny_model(width=2)
    names = rf.conv2_names(model)
    assert names == [f"layer{i}.{j}.conv2.weight" for i in range(1, 5) for j in range(2)]
    params = [dict(model.named_parameters())[n] for n in names]
    opt = rf.make_optimizer(model, lr=0.1, weight_decay=5e-4)
    total, hand = torch.zeros(len(names)), np.zeros(len(names))
    def hook(optimizer, args, kwargs):     # a step pre-hook must return None (else: new args)
        total.add_(rf.gradient_magnitudes([p.grad for p in params]))
    opt.register_step_pre_hook(hook)
    model.train()
    for s in range(2):
        x, y = tiny_batch(size=8, seed=s)
        rf.at_step(model, opt, x, y, 8 / 255, 2 / 255, 2)
        hand += [np.abs(p.grad.double().numpy()).mean() for p in params]   # SGD leaves .grad as it was
    assert total.tolist() == pytest.approx(hand.tolist(), rel=1e-5)


def test_training_phase_splits_the_run_in_thirds():
    assert [rf.training_phase(e, 10) for e in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [rf.training_phase(e, 200) for e in (0, 66, 67, 133, 134, 199)] == [0, 0, 1, 1, 2, 2]


def test_update_counts_from_the_pre_hook_agree_with_cure_mask_counts():
    model = tiny_model(width=2)
    cfg = rf.CureConfig(exclude=(rf.classifier_name(model),))
    masked = [(n, p) for n, p in rf.masked_parameters(model, cfg.exclude)]
    counts = [torch.zeros_like(p, dtype=torch.int32) for _, p in masked]
    opt = rf.make_optimizer(model, lr=0.1, weight_decay=5e-4)
    def hook(optimizer, args, kwargs):
        rf.count_updates_(counts, [p.grad for _, p in masked])
    opt.register_step_pre_hook(hook)
    revision, schedule = rf.cure_revision(model, cfg), rf.CureSchedule.for_run(cfg, 2)
    updated, coin = {}, torch.Generator().manual_seed(0)
    model.train()
    for s in range(2):
        x, y = tiny_batch(size=8, seed=s)
        rf.cure_step(model, opt, x, y, revision, cfg, schedule, coin, 8 / 255, 2 / 255, 2, updated=updated)
    for (n, _), c in zip(masked, counts):
        assert int(c.sum()) == int(updated[n]), n
    shares = rf.update_shares({0: dict(zip([n for n, _ in masked], counts))}, {0: 2})
    for n, _ in masked:
        assert shares[0][n]["per_step"] == pytest.approx(int(updated[n]) / (2 * dict(masked)[n].numel()))
        numel = dict(masked)[n].numel()                  # the rank-k rule zeroes >= floor(0.3 n) per step
        assert shares[0][n]["per_step"] <= (numel - math.floor(0.3 * numel)) / numel


def test_update_shares_on_a_hand_made_mask_sequence():
    steps = {0: [[1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 1]],       # entries 0 and 3 updated, 1 and 2 never
             1: [[0, 1, 0, 0], [0, 1, 0, 0]]}                     # only entry 1
    per_phase = {}
    for phase, masks in steps.items():
        counts = [torch.zeros(2, 2, dtype=torch.int32)]
        for m in masks:
            grad = torch.tensor(m, dtype=torch.float32).view(2, 2) * torch.tensor([[0.5, -2.0], [3.0, -1e-3]])
            rf.count_updates_(counts, [grad])
        per_phase[phase] = {"w": counts[0]}
    got = rf.update_shares(per_phase, {0: 3, 1: 2})
    assert per_phase[0]["w"].flatten().tolist() == [2, 0, 0, 2]
    assert got[0]["w"] == {"updated": 0.5, "never": 0.5, "per_step": 4 / 12}
    assert got[1]["w"] == {"updated": 0.25, "never": 0.75, "per_step": 2 / 8}
    flags = rf.update_shares({2: {"w": torch.tensor([True, False, False, False, True])}})
    assert flags[2]["w"] == {"updated": 0.4, "never": 0.6}


###############################################################################
# APPENDIX: support code, not needed to follow the methods above.
# Checkpoints and RNG state, data-parallel collectives, the AutoAttack adapters, the CIFAR-10-C
# generator and the RobustBench zoo.
###############################################################################


# =============================================================================
# A. Checkpoints and RNG state
# =============================================================================

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    rf.save_checkpoint(str(path), epoch=1)

    def broken_save(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        rf.save_checkpoint(str(path), epoch=2)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1      # the old checkpoint survives a failed write


# =============================================================================
# B. Data parallel: N processes (torchrun) that compute what one process computes; here 2 gloo
# processes on the CPU
# =============================================================================

DDP_LR, DDP_EPS = 0.1, 0.05
DDP_CFG = rf.CureConfig(percentile=40.0, alpha=0.05, gamma=0.7, beta=2.5, rate=0.0)
DDP_METHODS = ("natural", "at", "trades", "cure")


def ddp_fixed_attack(model, x, y, *args, **kwargs):
    """A deterministic stand-in for PGD (a function of x alone): the reference needs no RNG."""
    return (x + 0.02 * torch.cos(37 * x)).clamp(0, 1)


def ddp_start():
    """What every rank starts from: a float64 model, a revision model unlike it, a global batch of 8."""
    model = tiny_model(width=2, seed=21, random_bn=True).double().train()
    rev = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for p in rev.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x, _, y = double_batch(n=8, seed=21)
    return model, rev, x, y


def ddp_library_step(method, model, rev, x, y, average):
    """One step of `method` through the library, on (x, y), with `average` for the gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    if method == "natural":
        rf.natural_step(model, opt, x, y, average)
    elif method == "at":
        rf.at_step(model, opt, x, y, EPS, 2 / 255, 1, average)
    elif method == "trades":
        rf.trades_step(model, opt, x, y, EPS, 2 / 255, 1, DDP_CFG.beta, average)
    else:
        revision = rf.Revision(model)
        revision.model.load_state_dict(rev.state_dict())
        rf.cure_step(model, opt, x, y, revision, DDP_CFG, rf.CureSchedule(10, 0.9, t=3),
                     torch.Generator().manual_seed(0), steps=1, average=average)


def ddp_eval_setup():
    """A nearest-class-mean classifier (76% clean) and a test split of 21 images: batches of 4,
    the last one short."""
    data = rf.synthetic_data(num_train=200, num_test=21, size=8)
    x, y = data.train.x.float() / 255, data.train.y
    means = torch.stack([x[y == c].mean(0).flatten() for c in range(10)])
    model = nn.Sequential(nn.Flatten(), nn.Linear(means.shape[1], 10)).eval()
    with torch.no_grad():                          # logits -|x - mean_c|^2 + |x|^2
        model[1].weight.copy_(2 * means)
        model[1].bias.copy_(-(means ** 2).sum(1))
    return model, data.test


def ddp_fake_autoattack(model, x, y, eps, attack, seed=0, batch_size=256):
    """A stand-in for one AutoAttack attack whose result depends on the batch it is given: one
    FGSM step up the loss at the batch's even positions, down the loss at the odd ones."""
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), [x])
    up = torch.arange(len(x)) % 2 == 0
    return (x + eps * torch.where(up, 1.0, -1.0)[:, None, None, None] * grad.sign()).detach().clamp(0, 1)


REAL_PGD = rf.pgd


def ddp_failing_pgd(model, x, y, *args, **kwargs):
    """PGD, except that CW fails on the short last batch (batch 5 of 21 images in 4s: rank 1's)."""
    if kwargs.get("loss") == "cw" and len(x) < 4:
        raise RuntimeError("boom")
    return REAL_PGD(model, x, y, *args, **kwargs)


def ddp_evaluate(model, split, state_path, rank=0, world_size=1):
    return rf.evaluate(model, split, ["pgd10", "cw"], DDP_EPS, batch_size=4, autoattack=True,
                       aa_state_path=state_path, seed=3, rank=rank, world_size=world_size)


def ddp_finetune(rank=0, world_size=1):
    """RiFT's module fine-tuning (eval mode: the mean of the halves' gradients is the whole batch's)."""
    torch.manual_seed(0)
    model = rf.build_model("resnet18", 10, 2)
    split = rf.synthetic_data(num_train=48, num_test=4, size=8).train
    average = None if world_size == 1 else lambda grads: rf.all_reduce_mean_(grads, world_size)
    losses = rf.finetune_module(model, "layer2.0.conv1", split, epochs=2, lr=0.05, batch_size=16,
                                generator=torch.Generator().manual_seed(0), rank=rank, world_size=world_size,
                                average=average)
    return model.state_dict(), losses


def ddp_worker(rank, world_size, port, out_dir):
    """One rank of the 2-process tests, joined as under torchrun (its environment variables, then
    run.setup_distributed); saves what it computed, and its thread counts, to out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    threads = lambda: len(os.listdir("/proc/self/task"))    # noqa: E731
    torch.ones(4).sum()                                      # torch's own threads start before the count
    result = {"threads_before": threads()}
    run.setup_distributed(argparse.Namespace(method="cure", batch_size=8, sync_bn=None, device="cpu"))
    real_pgd, real_aa = rf.pgd, rf.autoattack_one
    try:
        # (1) one step of each method on this rank's half of the global batch
        rf.pgd = ddp_fixed_attack
        for method in DDP_METHODS:
            model, rev, x, y = ddp_start()
            half = slice(4 * rank, 4 * rank + 4)
            ddp_library_step(method, model, rev, x[half], y[half], rf.gradient_averager(model, world_size))
            result[method] = model.state_dict()
        rf.pgd = real_pgd

        # (2) CURE for 2 epochs of 4 steps: real PGD with each rank's own noise, revision coin 1/2
        torch.manual_seed(0)
        model = rf.build_model("resnet18", 10, 2)
        torch.manual_seed(100 + rank)
        data = rf.synthetic_data(num_train=32, num_test=4, size=8)
        optimizer = rf.make_optimizer(model, 0.05, 5e-3)
        revision, coin = rf.Revision(model), torch.Generator().manual_seed(7)
        cfg = rf.CureConfig(percentile=30.0, alpha=0.1, rate=0.5)
        average, masks, schedule = rf.gradient_averager(model, world_size), [], rf.CureSchedule(100, 0.9, t=1)

        def recording_mask(grads, grads_nat, grads_score, alpha, percentile):
            rf.rgp_mask_(grads, grads_nat, grads_score, alpha, percentile)
            masks.append([g == 0 for g in grads])

        def step(m, o, xb, yb):
            return rf.cure_step(m, o, xb, yb, revision, cfg, schedule, coin, EPS, 2 / 255, 2,
                                recording_mask, average=average)

        data_order = torch.Generator().manual_seed(0)
        losses = [rf.train_epoch(model, optimizer, step, data.train, 8, 0.05, data_order, rank=rank,
                                 world_size=world_size) for _ in range(2)]
        result["cure_run"] = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), masks=masks,
                                  revision=revision.model.state_dict(), updates=revision.updates, losses=losses,
                                  noise=torch.rand(4))

        result["finetune"] = ddp_finetune(rank, world_size)

        # (3) sharded evaluation, AutoAttack with a batch-dependent stand-in; then one rank failing
        model, split = ddp_eval_setup()
        rf.autoattack_one = ddp_fake_autoattack
        result["eval"] = ddp_evaluate(model, split, os.path.join(out_dir, "aa.json"), rank, world_size)
        rf.pgd = ddp_failing_pgd
        result["eval_failing"] = ddp_evaluate(model, split, None, rank, world_size)
        dist.barrier()                          # leave the group together, as run.main does
    finally:
        rf.pgd, rf.autoattack_one = real_pgd, real_aa
        run.leave_process_group()
    result["threads_after"] = threads()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    """What each of 2 gloo ranks computed in `ddp_worker` (one spawn for every test that reads it)."""
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


def hand_slice_gradients(method, model, rev, xs, ys):
    """One rank's part by hand: a copy of the model after this slice's forwards (BatchNorm moved)
    and, per parameter name, (g, g_nat, g_adv) of the hand-written loss on the slice."""
    m = copy.deepcopy(model)
    xa = ddp_fixed_attack(None, xs, ys)
    names, params = zip(*m.named_parameters())
    if method in ("natural", "at"):
        loss = hand_ce(hand_log_softmax(m(xs if method == "natural" else xa)), ys)
        return m, {n: (g, None, None) for n, g in zip(names, torch.autograd.grad(loss, params))}
    lp, lpa = hand_log_softmax(m(xs)), hand_log_softmax(m(xa))
    ce_nat, ce_adv = hand_ce(lp, ys), hand_ce(lpa, ys)
    loss = ce_nat + DDP_CFG.beta * hand_kl(lp, lpa)                        # TRADES, and CURE's L_adv
    if method == "cure":
        with torch.no_grad():
            r, ra = hand_log_softmax(rev(xs)), hand_log_softmax(rev(xa))
        loss = loss + DDP_CFG.gamma * (hand_kl(r, lp) + hand_kl(ra, lpa))   # + gamma L_CR (Eq. 8)
    g = torch.autograd.grad(loss, params, retain_graph=True)
    g_nat = torch.autograd.grad(ce_nat, params, retain_graph=True)
    g_adv = torch.autograd.grad(ce_adv, params)
    return m, {n: t for n, *t in zip(names, g, g_nat, g_adv)}


def test_data_parallel_batches_are_the_slices_of_the_one_process_batches():
    split = rf.synthetic_data(num_train=40, num_test=4, size=8).train
    one = list(rf.batches(split, 8, torch.Generator().manual_seed(0), train=True))
    for world in (2, 4):
        parts = [list(rf.batches(split, 8, torch.Generator().manual_seed(0), train=True, rank=r, world_size=world))
                 for r in range(world)]
        for i, (x, y) in enumerate(one):          # rank r holds rows [r * 8/N, (r + 1) * 8/N) of batch i
            assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of world_size=4"):
        next(rf.batches(split, 6, torch.Generator(), train=True, rank=0, world_size=4))


def test_data_parallel_average_is_one_all_reduce_per_dtype(monkeypatch):
    """The bucketed average: one all-reduce per dtype over a flat copy; for a CURE step of the
    model one float32 all-reduce of every g, the masked tensors' g_nat and g_adv, and the BatchNorm
    statistics: the volume the README states."""
    calls = []

    def all_reduce(t):                         # what 2 ranks holding the same tensors would sum to
        calls.append((t.dtype, t.numel()))
        t.mul_(2)

    monkeypatch.setattr(rf.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(rf.dist, "get_world_size", lambda: 2)
    a, b = torch.randn(3, 4), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    c = torch.randn(7, dtype=torch.float64)
    before = [a.clone(), b.clone(), c.clone()]
    rf.all_reduce_mean_([a, b, c], 2)
    assert calls == [(torch.float32, 12 + 120), (torch.float64, 7)]
    assert all(torch.equal(u, v) for u, v in zip([a, b, c], before))    # mean of equal tensors: unchanged
    assert b.is_contiguous(memory_format=torch.channels_last)
    calls.clear()
    model = tiny_model(width=2).train()
    x, y = tiny_batch(4, 8)
    rf.cure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, rf.Revision(model), rf.CureConfig(),
                 rf.CureSchedule(1, 0.9), torch.Generator(), steps=1, average=rf.gradient_averager(model, 2))
    params = sum(p.numel() for p in model.parameters())
    masked = sum(p.numel() for _, p in rf.masked_parameters(model))
    bn = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert calls == [(torch.float32, params + 2 * masked + bn)]
    with pytest.raises(ValueError, match="world_size=4, but the process group has 2 ranks"):
        rf.all_reduce_mean_([a], 4)                            # the mean would be divided by the wrong N


def test_data_parallel_functions_reject_a_bad_rank_or_world_size():
    split = rf.synthetic_data(num_train=16, num_test=8, size=8)
    model = tiny_model(width=2)
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        message = f"rank={rank}, world_size={world}: need an integer world_size >= 1 and 0 <= rank < world_size"
        with pytest.raises(ValueError, match=re.escape(message)):
            next(rf.batches(split.train, 8, torch.Generator(), train=True, rank=rank, world_size=world))
        with pytest.raises(ValueError, match=re.escape(message)):
            rf.evaluate(model, split.test, [], rank=rank, world_size=world)
        with pytest.raises(ValueError, match=re.escape(message)):
            rf.autoattack_correct(model, *next(rf.batches(split.test, 8)), EPS, rank=rank, world_size=world)
    with pytest.raises(ValueError, match="world_size=0"):
        rf.gradient_averager(model, 0)


@pytest.mark.parametrize("method", DDP_METHODS)
def test_data_parallel_step_equals_the_mean_of_the_two_slices_gradients(ddp_ranks, method):
    """Each rank's step equals one process that computes both halves' gradients by hand,
    averages them (and the BatchNorm statistics), masks (CURE: the mean gradients' mask) and steps."""
    ranks, _ = ddp_ranks
    model, rev, x, y = ddp_start()
    parts = [hand_slice_gradients(method, model, rev, x[4 * r:4 * r + 4], y[4 * r:4 * r + 4]) for r in range(2)]
    expect = {}
    for name, p in model.named_parameters():
        g, g_nat, g_adv = [sum(part[1][name][i] for part in parts) / 2 if parts[0][1][name][i] is not None
                           else None for i in range(3)]
        g = g.numpy()
        if method == "cure" and p.ndim >= 2:                 # RGP mask of the averaged g, g_nat, g_adv
            g = numpy_rgp_mask(g, g_nat.numpy(), g_adv.numpy(), DDP_CFG.alpha, DDP_CFG.percentile)
        expect[name] = p.detach().numpy() - DDP_LR * g
    for name, b in model.named_buffers():
        slices = [dict(part[0].named_buffers())[name] for part in parts]
        expect[name] = ((slices[0] + slices[1]) / 2 if b.is_floating_point() else slices[0]).numpy()
    for rank in ranks:
        for name, value in expect.items():
            np.testing.assert_allclose(rank[method][name].numpy(), value, rtol=1e-10, atol=1e-14, err_msg=name)
    assert_same_contents(ranks[0][method], ranks[1][method], method)             # and bit-identical ranks


def test_data_parallel_cure_keeps_every_rank_bit_identical(ddp_ranks):
    """After 8 CURE steps (own attack noise per rank) both ranks hold the same weights,
    BatchNorm statistics, optimiser state, masks and revision model, bit for bit."""
    (a, b), _ = ddp_ranks
    a, b = a["cure_run"], b["cure_run"]
    assert not torch.equal(a["noise"], b["noise"])             # the ranks' global generators differ ...
    assert_same_contents({k: v for k, v in a.items() if k != "noise"},
                         {k: v for k, v in b.items() if k != "noise"}, "cure")   # ... and nothing else does
    assert len(a["masks"]) == 8 and 0 < a["updates"] < 8
    frozen = sum(int(m.sum()) for m in a["masks"][-1])
    assert frozen > 0.25 * sum(m.numel() for m in a["masks"][-1])   # p = 30: about 30% of entries frozen


def test_data_parallel_evaluation_equals_one_process(ddp_ranks, monkeypatch):
    """The sharded evaluation (PGD, CW, the batch-dependent AutoAttack stand-in) returns on
    each rank exactly what one process returns; a failure on one rank is reported on both."""
    ranks, out = ddp_ranks
    model, split = ddp_eval_setup()
    monkeypatch.setattr(rf, "autoattack_one", ddp_fake_autoattack)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                   # as the ranks: the same float sums
    try:
        single = ddp_evaluate(model, split, str(out / "aa_single.json"))
    finally:
        torch.set_num_threads(threads)
    assert 0 < single["counts"]["autoattack"] < single["counts"]["clean"]    # the stand-in did fool some
    for rank in ranks:
        assert rank["eval"] == single
    states = [json.load(open(out / name)) for name in ("aa.json", "aa_single.json")]   # aa.json: rank 0's
    assert states[0] == states[1] and states[0]["done"] == list(rf.AUTOATTACK_STANDARD)  # per example
    monkeypatch.setattr(rf, "pgd", ddp_failing_pgd)
    failing = ddp_evaluate(model, split, None)
    assert failing["failed"] == {"cw": "RuntimeError: boom"} and "autoattack" in failing["counts"]
    assert ranks[1]["eval_failing"] == failing
    assert ranks[0]["eval_failing"]["failed"] == {"cw": "RuntimeError: 1 other rank(s) failed here; "
                                                        "see their messages"}
    assert {k: v for k, v in ranks[0]["eval_failing"].items() if k != "failed"} == \
        {k: v for k, v in failing.items() if k != "failed"}


def test_data_parallel_rift_finetuning_equals_one_process(ddp_ranks):
    """2 ranks fine-tuning one module (BatchNorm in eval mode) take the steps of one process on the
    whole batches, to float32 rounding; the mean losses agree too."""
    ranks, _ = ddp_ranks
    state, losses = ddp_finetune()
    for rank in ranks:
        rank_state, rank_losses = rank["finetune"]
        assert rank_losses == pytest.approx(losses, rel=1e-5)
        for name, value in state.items():
            assert torch.allclose(rank_state[name], value, rtol=1e-5, atol=1e-7), name
    torch.manual_seed(0)
    start = rf.build_model("resnet18", 10, 2).state_dict()
    assert not torch.allclose(state["layer2.0.conv1.weight"], start["layer2.0.conv1.weight"], atol=1e-4)  # it moved


# =============================================================================
# C. AutoAttack: the two packages' APIs, attack by attack, resumable
# =============================================================================

class FakeAutoAttackBase:
    """Shared fake: each attack fools the examples its rule picks (by the index pixel); calls logged."""
    calls = []
    rules = {"apgd-ce": lambda i: i % 2 == 0, "apgd-t": lambda i: i % 7 == 1, "fab-t": lambda i: i % 3 == 0,
             "square": lambda i: i % 11 == 3}
    fail_on = None       # (attack, call number within that attack) that raises

    def attack(self, x, y):
        assert x.is_contiguous() and list(self.attacks_to_run) and len(self.attacks_to_run) == 1
        name = self.attacks_to_run[0]
        index = (x[:, 1, 0, 0] * 255).round().long().tolist()
        FakeAutoAttackBase.calls.append((name, index))
        if self.fail_on == (name, sum(c[0] == name for c in FakeAutoAttackBase.calls)):
            raise RuntimeError(f"{name} broke")
        return nudge(x, torch.tensor([bool(self.rules[name](i)) for i in index]))


class FakeOfficialAutoAttack(FakeAutoAttackBase):
    """The official package's API: keyword `verbose`, `run_standard_evaluation(x, y, bs=)` -> x_adv."""

    def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                 version="standard", is_tf_model=False, device="cuda", log_path=None):
        assert norm == "Linf" and version == "standard" and verbose is False
        self.attacks_to_run, self.eps, self.device = list(rf.AUTOATTACK_STANDARD), eps, device

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
        return self.attack(x_orig, y_orig)


class FakePyAutoAttack(FakeAutoAttackBase):
    """pyautoattack 0.2.0's API: keyword-only, `run_standard_evaluation(x, y, *, batch_size=)` -> (x_adv, y_adv)."""

    def __init__(self, model, *, attacks=None, device="cpu", eps=0.3, norm="Linf", seed=None, version="standard"):
        assert norm == "Linf" and version == "standard" and attacks is None
        assert torch.device(device).type == "cpu"
        self.attacks_to_run, self.eps = list(rf.AUTOATTACK_STANDARD), eps

    def run_standard_evaluation(self, x_orig, y_orig, /, *, batch_size=250, state_path=None):
        x_adv = self.attack(x_orig, y_orig)
        return x_adv, y_orig


def install_fake_autoattack(monkeypatch, package):
    """Make `package` ('autoattack' or 'pyautoattack') importable as the fake, the other not."""
    fake = types.ModuleType(package)
    fake.AutoAttack = FakeOfficialAutoAttack if package == "autoattack" else FakePyAutoAttack
    other = "pyautoattack" if package == "autoattack" else "autoattack"
    monkeypatch.setitem(sys.modules, package, fake)
    monkeypatch.setitem(sys.modules, other, None)          # None in sys.modules: import raises ImportError
    FakeAutoAttackBase.calls, FakeAutoAttackBase.fail_on = [], None


def expected_autoattack(n, clean):
    """AutoAttack's standard version by hand: each attack in order, only on the still-robust examples."""
    robust = list(clean)
    for name in rf.AUTOATTACK_STANDARD:
        robust = [r and not FakeAutoAttackBase.rules[name](i) for i, r in enumerate(robust)]
    return robust


@pytest.mark.parametrize("package", ["autoattack", "pyautoattack"])
def test_autoattack_runs_the_standard_attacks_in_order_on_the_still_robust_examples(package, monkeypatch):
    install_fake_autoattack(monkeypatch, package)
    assert rf.autoattack_package() == package
    split = indexed_split(40)
    x, y = next(rf.batches(split, 40))
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)      # non-contiguous: the driver must fix it
    flags = rf.autoattack_correct(PixelClassifier(), x, y, EPS, batch_size=8)
    clean = [i % 5 != 0 for i in range(40)]
    assert flags.tolist() == expected_autoattack(40, clean)
    robust = list(clean)
    for name in rf.AUTOATTACK_STANDARD:                  # each attack saw exactly the still-robust examples
        seen = [i for a, index in FakeAutoAttackBase.calls if a == name for i in index]
        assert seen == [i for i, r in enumerate(robust) if r]
        assert all(len(index) <= 8 for a, index in FakeAutoAttackBase.calls)
        robust = [r and not FakeAutoAttackBase.rules[name](i) for i, r in enumerate(robust)]


def test_interrupted_autoattack_resumes_from_its_state_file(tmp_path, monkeypatch):
    install_fake_autoattack(monkeypatch, "pyautoattack")
    split, state = indexed_split(40), str(tmp_path / "aa.json")
    x, y = next(rf.batches(split, 40))
    FakeAutoAttackBase.fail_on = ("fab-t", 2)             # dies in FAB-T's second batch
    with pytest.raises(RuntimeError, match="fab-t broke"):
        rf.autoattack_correct(PixelClassifier(), x, y, EPS, batch_size=4, state_path=state)
    saved = json.loads(open(state).read())
    assert saved["done"] == ["apgd-ce", "apgd-t"] and saved["pending"]
    first_calls = list(FakeAutoAttackBase.calls)
    FakeAutoAttackBase.calls, FakeAutoAttackBase.fail_on = [], None
    flags = rf.autoattack_correct(PixelClassifier(), x, y, EPS, batch_size=4, state_path=state)
    assert flags.tolist() == expected_autoattack(40, [i % 5 != 0 for i in range(40)])
    assert FakeAutoAttackBase.calls[0] == first_calls[-1]    # resumes at the batch that failed, not before
    assert all(a in ("fab-t", "square") for a, _ in FakeAutoAttackBase.calls)
    with pytest.raises(ValueError, match="another evaluation"):   # a state file of other examples is refused
        rf.autoattack_correct(PixelClassifier(), x, (y + 1) % 10, EPS, batch_size=4, state_path=state)


def test_real_autoattack_package_runs_end_to_end():
    assert rf.autoattack_package() in ("autoattack", "pyautoattack")     # requirements.txt installs pyautoattack
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(12, 3, 8, 8).transpose(2, 3)                         # a non-contiguous view
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10                                              # one example wrong from the start
    flags = rf.autoattack_correct(model, x, y, 0.25, batch_size=5)
    assert flags.dtype == torch.bool and flags.shape == (12,)
    assert not flags[0]                                                 # never counted robust
    assert flags.sum() < 12


# =============================================================================
# D. CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019), generated in torch; the .npy files
# =============================================================================

# Checked against hand-written computations (colorsys, NumPy filters, PIL, scipy) or invariants
# ([0, 1], seeded).

def smooth_images(n=4, size=32, seed=0):
    """Natural-looking test images: bicubic upsampled 5x5 noise, in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=size, mode="bicubic", align_corners=False)
    return x.clamp(0, 1) * 0.8 + 0.1


@pytest.mark.parametrize("name", rf.GENERATED_CORRUPTIONS + ("saturate",))
def test_corruptions_keep_shape_and_range_and_grow_with_severity(name):
    x = smooth_images()
    change = []
    for s in (1, 5):
        out = rf.corrupt(x, name, s, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1 and not torch.isnan(out).any()
        assert torch.equal(out, rf.corrupt(x, name, s, torch.Generator().manual_seed(0)))   # seeded
        change.append((out - x).abs().mean().item())
    if name not in ("saturate", "elastic_transform"):          # not monotone (see their tests)
        assert change[1] > change[0] > 0


def test_corrupt_rejects_bad_severity_name_and_shape():
    x = smooth_images(1, 8)
    for s in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            rf.corrupt(x, "fog", s)
    with pytest.raises(ValueError, match="'frost' .frost is read from the CIFAR-10-C files.*gaussian_noise"):
        rf.corrupt(x, "frost", 1)
    with pytest.raises(ValueError, match="'spatter'; choose one of.*elastic_transform"):
        rf.corrupt(x, "spatter", 1)
    with pytest.raises(ValueError, match="shape"):
        rf.corrupt(x[:, :1], "contrast", 1)


def test_noise_and_contrast_match_their_formulas():
    x = smooth_images(2, 8)
    expect = (x + 0.08 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    assert torch.equal(rf.corrupt(x, "gaussian_noise", 3, torch.Generator().manual_seed(4)), expect)
    mean = x.mean((2, 3), keepdim=True)
    assert torch.allclose(rf.corrupt(x, "contrast", 5), ((x - mean) * 0.15 + mean).clamp(0, 1), atol=1e-7)
    hits = rf.corrupt(x, "impulse_noise", 5, torch.Generator().manual_seed(0)) != x
    assert 0.03 < hits.float().mean() < 0.11                   # about 7% of values, each 0 or 1


@pytest.mark.parametrize("severity", [1, 4, 5])
def test_defocus_blur_matches_a_numpy_disk_filter(severity):
    radius, alias = rf.CORRUPTION_PARAMS["defocus_blur"][severity - 1]
    t = np.arange(-8, 9)                                       # make_cifar_c's 17x17 grid
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias ** 2))
    g /= g.sum()
    padded = np.pad(disk, 1)
    kernel = sum(g[a] * g[b] * padded[a:a + 17, b:b + 17] for a in range(3) for b in range(3))
    x = smooth_images(1, 12)
    img = np.pad(x[0].double().numpy(), ((0, 0), (8, 8), (8, 8)), mode="reflect")   # cv2 reflect-101
    expect = np.zeros((3, 12, 12))
    for i in range(12):
        for j in range(12):
            expect[:, i, j] = (img[:, i:i + 17, j:j + 17] * kernel).sum((1, 2))
    got = rf.corrupt(x, "defocus_blur", severity)[0].double().numpy()
    assert np.abs(got - np.clip(expect, 0, 1)).max() < 1e-6


def test_plasma_fractal_is_a_normalised_seeded_height_map():
    maps = rf.plasma_fractal(3, 16, 2.0, torch.Generator().manual_seed(0))
    assert maps.shape == (3, 16, 16)
    assert torch.allclose(maps.amin((1, 2)), torch.zeros(3)) and torch.allclose(maps.amax((1, 2)), torch.ones(3))
    assert torch.equal(maps, rf.plasma_fractal(3, 16, 2.0, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name, severity", [("brightness", 2), ("brightness", 5), ("saturate", 1),
                                            ("saturate", 5)])
def test_hsv_corruptions_match_colorsys(name, severity):
    x = smooth_images(1, 4)
    x[0, :, 0, 0] = torch.tensor([0.3, 0.3, 0.3])              # grey: hue 0, saturation 0
    x[0, :, 0, 1] = 0.0                                        # black
    c = rf.CORRUPTION_PARAMS[name][severity - 1]
    expect = torch.empty_like(x)
    for i in range(4):
        for j in range(4):
            h, s, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            if name == "brightness":
                v = min(max(v + c, 0.0), 1.0)
            else:
                s = min(max(s * c[0] + c[1], 0.0), 1.0)
            expect[0, :, i, j] = torch.tensor(colorsys.hsv_to_rgb(h, s, v))
    assert torch.allclose(rf.corrupt(x, name, severity), expect, atol=1e-6)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_pixelate_and_jpeg_match_pil(severity):
    u8 = (smooth_images(2, 32) * 255).round().to(torch.uint8)
    x = u8.float() / 255
    c, q = rf.CORRUPTION_PARAMS["pixelate"][severity - 1], rf.CORRUPTION_PARAMS["jpeg_compression"][severity - 1]
    pix, jpg = [], []
    for img in u8:
        im = Image.fromarray(img.permute(1, 2, 0).numpy())
        small = im.resize((int(32 * c), int(32 * c)), Image.BOX)
        pix.append(np.asarray(small.resize((32, 32), Image.BOX)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        jpg.append(np.array(Image.open(buf)))
    as_float = lambda arrays: torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    # PIL rounds to uint8 between the two resizes: at most one level apart
    assert (rf.corrupt(x, "pixelate", severity) - as_float(pix)).abs().max() <= 1 / 255 + 1e-6
    assert (rf.corrupt(x, "jpeg_compression", severity) - as_float(jpg)).abs().mean() <= 0.5 / 255


# --- The five blurs, snow and elastic transform, against hand-written and scipy computations ------

# make_cifar_c.py's severities are not all monotone in the change they make (glass blur, motion blur
# at 3 and 4, elastic transform): each test checks what the official parameters give.

NEW_CORRUPTIONS = ["glass_blur", "motion_blur", "zoom_blur", "snow", "elastic_transform"]


def gen(seed=0):
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def corrupt6(x, name, severity, seed=0):
    return rf._CORRUPTION_FNS[name](x, rf.CORRUPTION_PARAMS[name][severity - 1], gen(seed)).clamp(0, 1)


def change(name, severity, x):
    return (corrupt6(x, name, severity) - x).abs().mean().item()


# --- All five: shape, range, seed, 64x64, severity trend ------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", NEW_CORRUPTIONS)
def test_shape_range_no_nan_and_seeded(name, size):
    x = smooth_images(2, size)
    for s in (1, 3, 5):
        out = corrupt6(x, name, s)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1 and not torch.isnan(out).any()
        assert torch.equal(out, corrupt6(x, name, s))                     # same seed, same images
        assert (out - x).abs().mean() > 1e-3                               # it does something
        if name != "zoom_blur":                                            # the one without randomness
            assert not torch.equal(out, corrupt6(x, name, s, seed=1))


@pytest.mark.parametrize("name", ["motion_blur", "zoom_blur", "snow"])
def test_change_grows_with_severity(name):
    x = smooth_images()
    assert change(name, 1, x) < change(name, 3, x) < change(name, 5, x)


def test_motion_blur_severities_3_and_4_are_the_same_blur():
    """(6, 2) and (8, 2): radius 8 only adds taps 13..16 of weight < exp(-144 / 8) = 1.5e-8."""
    x = smooth_images()
    assert torch.allclose(corrupt6(x, "motion_blur", 3), corrupt6(x, "motion_blur", 4), atol=1e-6)


def test_glass_blur_two_rounds_change_more_than_one():
    """Not monotone in mean |change|: severities 1-3 shuffle once, 4-5 twice, and the extra blur of
    3 (sigma 0.4) and 5 slightly smooths the shuffle's jumps away (3 < 1, 5 < 4 measured)."""
    x = smooth_images()
    one, two = [change("glass_blur", s, x) for s in (1, 2, 3)], [change("glass_blur", s, x) for s in (4, 5)]
    assert min(two) > 1.5 * max(one)


def test_elastic_total_change_shrinks_while_the_elastic_part_grows():
    """The official parameters trade affine jitter (2.56 px at severity 1 down to 0.96 px at 5) for
    local displacement: the mean change falls with severity; with the jitter set to 0 the
    displacement alone grows."""
    x = smooth_images()
    total = [change("elastic_transform", s, x) for s in (1, 3, 5)]
    assert total[0] > total[1] > total[2]
    local = []
    for s in (1, 3, 5):
        alpha, sigma, _ = rf.CORRUPTION_PARAMS["elastic_transform"][s - 1]
        out = rf._elastic_transform(x, (alpha, sigma, 0.0), gen()).clamp(0, 1)
        local.append((out - x).abs().mean().item())
    assert local[0] < 1e-5 < local[1] < local[2]


# --- Glass blur -----------------------------------------------------------------------------------

def numpy_shuffle(img, rows, cols, d):
    """make_cifar_c's loop on one (H, W, 3) numpy image, with the given target positions."""
    img = img.copy()
    h, w = img.shape[:2]
    for i, hh in enumerate(range(h - d, d, -1)):
        for j, ww in enumerate(range(w - d, d, -1)):
            h2, w2 = int(rows[i, j]), int(cols[i, j])
            img[hh, ww], img[h2, w2] = img[h2, w2], img[hh, ww]     # views: a copy, not a swap
    return img


@pytest.mark.parametrize("d", [1, 2])
def test_glass_shuffle_matches_the_official_numpy_loop(d):
    x = torch.randperm(3 * 2 * 16 * 16, generator=gen()).view(2, 3, 16, 16).double()   # all distinct
    n = 16 - 2 * d
    shifts = torch.randint(-d, d, (2, 2, n, n), generator=gen(1))          # (dx, dy), like randint(-d, d)
    grid = torch.arange(16 - d, d, -1)
    rows, cols = grid[:, None] + shifts[1], grid + shifts[0]
    out = rf.glass_shuffle(x, rows, cols, d)
    for b in range(2):
        expect = numpy_shuffle(x[b].permute(1, 2, 0).numpy(), rows[b].numpy(), cols[b].numpy(), d)
        assert np.array_equal(out[b].permute(1, 2, 0).numpy(), expect)


def test_glass_shuffle_copies_from_above_left_and_loses_values():
    """d = 1, shifts -1 or 0: every source (h + dy, w + dx) is visited after (h, w), so each pixel
    gets the INPUT's value there (one gather does the whole loop); rows and columns 0, 1 stay. It
    copies, so values are lost: the multiset is not kept, as it would be by a true swap."""
    x = torch.randperm(2 * 3 * 32 * 32, generator=gen()).view(2, 3, 32, 32).double()   # all distinct
    dx, dy = torch.randint(-1, 1, (2, 2, 30, 30), generator=gen(1))
    grid = torch.arange(31, 1, -1)
    out = rf.glass_shuffle(x, grid[:, None] + dy, grid + dx, 1)
    assert torch.equal(out[..., :2, :], x[..., :2, :]) and torch.equal(out[..., :2], x[..., :2])
    b = torch.arange(2)[:, None, None]
    gathered = x[b, :, grid[:, None] + dy, grid + dx].permute(0, 3, 1, 2)  # (2, 3, 30, 30), rows 31..2
    assert torch.equal(out[..., 2:, 2:], gathered.flip((-2, -1)))
    assert out.unique().numel() < x.unique().numel()


def test_glass_blur_is_blur_quantise_shuffle_blur():
    x = smooth_images(2)
    sigma, d, rounds = rf.CORRUPTION_PARAMS["glass_blur"][4]
    u = rf._rand((rounds, 2, 2, 30, 30), gen(3), "cpu")                   # the draws _glass_blur makes
    shifts = (torch.floor(u * 2 * d) - d).long()
    assert shifts.min() == -1 and shifts.max() == 0                       # randint(-1, 1): -1 or 0
    y = torch.floor(rf._gaussian_blur(x, sigma, None) * 255) / 255
    grid = torch.arange(31, 1, -1)
    for dx, dy in shifts:
        y = rf.glass_shuffle(y, grid[:, None] + dy, grid + dx, d)
    assert torch.allclose(rf._glass_blur(x, (sigma, d, rounds), gen(3)), rf._gaussian_blur(y, sigma, None))


# --- Motion blur ----------------------------------------------------------------------------------

def motion_kernel(radius, sigma, angle):
    """The reference for `rf.motion_blur_at`: the blur at one angle as a square correlation kernel
    (2 width - 1)^2 for `rf._filter`, the taps of `rf.motion_taps` placed at their offsets from the
    centre (taps that round to the same offset add up)."""
    weights, dx, dy = rf.motion_taps(radius, sigma, torch.tensor([float(angle)]))
    centre = len(weights) - 1
    kernel = torch.zeros(2 * centre + 1, 2 * centre + 1, dtype=torch.float64)
    kernel.index_put_((centre + dy[0], centre + dx[0]), weights, accumulate=True)
    return kernel


def test_motion_kernel_is_one_sided_along_the_angle_and_sums_to_one():
    k = motion_kernel(6, 2, 0.0)                                        # width 2 ceil(6) + 1 = 13
    assert k.shape == (25, 25) and abs(k.sum().item() - 1) < 1e-12
    nonzero = k.nonzero().tolist()
    assert nonzero == [[12, 12 + i] for i in range(13)]                    # centre row, to the right only
    row = k[12, 12:]
    assert torch.all(row[1:] < row[:-1])                                   # Gaussian falling from the pixel
    assert torch.allclose(row / row[0], torch.exp(-torch.arange(13.0, dtype=torch.float64) ** 2 / 8))
    down = motion_kernel(6, 2, 90.0)                                    # y points down
    assert torch.equal(down, k.T)
    diag = motion_kernel(6, 2, 45.0).nonzero().tolist()                 # round(i / sqrt 2), both axes
    assert all(r == c and r >= 12 for r, c in diag)
    up_right = motion_kernel(6, 2, -45.0).nonzero().tolist()
    assert all(r - 12 == -(c - 12) and c >= 12 for r, c in up_right)


@pytest.mark.parametrize("angle", [0.0, 17.0, -45.0, 90.0, 200.0])
def test_motion_blur_at_is_the_kernel_with_edge_pixels(angle):
    x = smooth_images(1)
    expect = rf._filter(x.double(), motion_kernel(9, 2.5, angle), "replicate")
    assert torch.allclose(rf.motion_blur_at(x.double(), 9, 2.5, torch.tensor([angle])), expect, atol=1e-12)


def test_motion_blur_draws_one_angle_per_image_in_plus_minus_45():
    x = smooth_images(3)
    angles = -45 + 90 * rf._rand((3,), gen(5), "cpu")
    assert angles.abs().max() <= 45
    assert torch.equal(rf._motion_blur(x, (6, 1), gen(5)), rf.motion_blur_at(x, 6, 1, angles))
    flat = torch.full((2, 3, 32, 32), 0.3)
    assert torch.allclose(rf._motion_blur(flat, (9, 2.5), gen()), flat, atol=1e-6)


# --- Zoom blur ------------------------------------------------------------------------------------

def numpy_zoom_1d(n, factor):
    """The clipped zoom along one axis as an (n, n) matrix, written with np.interp."""
    m = int(np.ceil(n / factor))
    big = int(round(m * factor))
    start, cut = (n - m) // 2, (big - n) // 2
    at = np.arange(big) * (m - 1) / (big - 1)                               # output o samples input o (m-1)/(M-1)
    eye = np.eye(n)[start:start + m]                                        # (m, n): the crop
    rows = np.stack([np.interp(at, np.arange(m), eye[:, k]) for k in range(n)], 1)
    return rows[cut:cut + n]


@pytest.mark.parametrize("factor", [1.0, 1.03, 1.12, 1.25, 1.75, 2.25])
def test_clipped_zoom_matches_a_hand_written_linear_zoom(factor):
    x = torch.rand(2, 3, 32, 32, generator=gen(), dtype=torch.float64)
    a = torch.from_numpy(numpy_zoom_1d(32, factor))
    assert torch.allclose(rf.clipped_zoom(x, factor), a @ x @ a.T, atol=1e-12)
    if factor == 1.0:
        assert torch.equal(rf.clipped_zoom(x, factor), x)


def test_clipped_zoom_matches_scipy_zoom():
    ndi = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 3, 32, 32, generator=gen(), dtype=torch.float64)
    img = x[0].permute(1, 2, 0).numpy()
    for factor in (1.04, 1.25, 2.25):
        m = int(np.ceil(32 / factor))
        top = (32 - m) // 2
        z = ndi.zoom(img[top:top + m, top:top + m], (factor, factor, 1), order=1)
        cut = (z.shape[0] - 32) // 2
        expect = torch.from_numpy(z[cut:cut + 32, cut:cut + 32]).permute(2, 0, 1)
        assert torch.allclose(rf.clipped_zoom(x, factor)[0], expect, atol=1e-12)


def test_zoom_blur_keeps_a_constant_image_and_counts_the_official_factors():
    flat = torch.full((1, 3, 32, 32), 0.4)
    assert torch.allclose(rf._zoom_blur(flat, 1.26, None), flat, atol=1e-6)
    assert [len(np.arange(1, c, 0.01)) for c in rf.CORRUPTION_PARAMS["zoom_blur"]] == [7, 12, 16, 21, 26]
    x = torch.rand(1, 3, 32, 32, generator=gen(), dtype=torch.float64)
    zooms = [rf.clipped_zoom(x, f) for f in np.arange(1, 1.06, 0.01)]
    assert torch.allclose(rf._zoom_blur(x, 1.06, None), (x + sum(zooms)) / 8, atol=1e-12)


# --- Snow -----------------------------------------------------------------------------------------

def brightened(x, keep):
    grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    return keep * x + (1 - keep) * torch.maximum(x, 1.5 * grey + 0.5)


def test_snow_without_flakes_is_the_brightened_image():
    x = smooth_images(2)
    c = list(rf.CORRUPTION_PARAMS["snow"][4])
    c[3] = 10.0                                                             # threshold above every flake
    assert torch.allclose(rf._snow(x, tuple(c), gen()), brightened(x, c[6]), atol=1e-6)
    c[6] = 1.0
    assert torch.allclose(rf._snow(x, tuple(c), gen()), x, atol=1e-6)


def test_snow_constant_flakes_are_quantised_blurred_and_added_twice():
    x = smooth_images(2) * 0.5
    out = rf._snow(x, (0.3, 0.0, 1.75, 0.0, 10, 4, 1.0), gen())           # std 0: every flake 0.3
    assert torch.allclose(out, x + 2 * 76 / 255, atol=1e-6)                 # floor(0.3 * 255) = 76


def test_snow_layer_is_added_with_its_180_degree_rotation():
    x = torch.zeros(3, 3, 32, 32)
    out = rf._snow(x, rf.CORRUPTION_PARAMS["snow"][2][:6] + (1.0,), gen())       # keep 1: only the layers
    assert torch.equal(out, out.flip((-2, -1))) and out.max() > 0.1
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])   # white flakes


# --- Elastic transform ----------------------------------------------------------------------------

def test_elastic_without_jitter_or_displacement_is_the_identity():
    x = smooth_images(2)
    assert torch.allclose(rf._elastic_transform(x, (0.0, 0.0, 0.0), gen()), x, atol=1e-5)
    x64 = smooth_images(2, 64)
    assert torch.allclose(rf._elastic_transform(x64, (0.0, 0.0, 0.0), gen()), x64, atol=1e-5)


def test_affine_warp_translation_reflects_about_the_edge_pixel():
    x = torch.rand(1, 3, 8, 8, generator=gen(), dtype=torch.float64)
    src = torch.tensor([[[6.0, 6.0], [6.0, 2.0], [2.0, 2.0]]], dtype=torch.float64)
    out = rf.affine_warp(x, src, src + torch.tensor([1.0, 0.0]))          # move right one pixel
    assert torch.allclose(out[..., 1:], x[..., :-1]) and torch.allclose(out[..., 0], x[..., 1])  # reflect-101
    half = rf.affine_warp(x, src, src + torch.tensor([0.0, 0.5]))         # down half a pixel: bilinear
    assert torch.allclose(half[..., 1:, :], (x[..., 1:, :] + x[..., :-1, :]) / 2)
    assert torch.allclose(half[..., 0, :], (x[..., 0, :] + x[..., 1, :]) / 2)


def test_displace_by_whole_pixels_reads_the_neighbour_with_symmetric_border():
    x = torch.rand(1, 3, 8, 8, generator=gen(), dtype=torch.float64)
    right = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    right[:, 0] = 1.0                                                       # dx = 1: read col + 1
    out = rf.displace(x, right)
    assert torch.allclose(out[..., :-1], x[..., 1:]) and torch.allclose(out[..., -1], x[..., -1])
    up = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    up[:, 1] = -1.0                                                         # dy = -1: read row - 1
    out = rf.displace(x, up)
    assert torch.allclose(out[..., 1:, :], x[..., :-1, :]) and torch.allclose(out[..., 0, :], x[..., 0, :])


def test_elastic_pieces_match_scipy():
    ndi = pytest.importorskip("scipy.ndimage")
    field = torch.rand(1, 2, 32, 32, generator=gen(), dtype=torch.float64)
    for sigma in (0.96, 6.4, 40.0):                                         # 40: wider than the image
        expect = [ndi.gaussian_filter(field[0, i].numpy(), sigma, mode="reflect", truncate=3) for i in range(2)]
        assert np.allclose(rf._smooth_reflect(field, sigma, 3.0)[0].numpy(), np.stack(expect), atol=1e-12)
    x = torch.rand(1, 1, 32, 32, generator=gen(1), dtype=torch.float64)
    shift = 4 * (2 * torch.rand(1, 2, 32, 32, generator=gen(2), dtype=torch.float64) - 1)
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    expect = ndi.map_coordinates(x[0, 0].numpy(), [rows + shift[0, 1].numpy(), cols + shift[0, 0].numpy()],
                                 order=1, mode="reflect")
    assert np.allclose(rf.displace(x, shift)[0, 0].numpy(), expect, atol=1e-12)
    src = torch.tensor([[[26.0, 26.0], [26.0, 6.0], [6.0, 6.0]]], dtype=torch.float64)
    dst = src + 2.56 * (2 * torch.rand(1, 3, 2, generator=gen(3), dtype=torch.float64) - 1)
    a = np.concatenate([dst[0].numpy(), np.ones((3, 1))], 1)
    back = np.stack([cols, rows, np.ones_like(rows)], -1) @ np.linalg.solve(a, src[0].numpy())
    expect = ndi.map_coordinates(x[0, 0].numpy(), [back[..., 1], back[..., 0]], order=1, mode="mirror")
    assert np.allclose(rf.affine_warp(x, src, dst)[0, 0].numpy(), expect, atol=1e-12)   # mirror = reflect-101


# --- The CIFAR-10-C and Tiny-ImageNet-C files -----------------------------------------------------

def write_fake_cifar10c(directory, names, per=4, size=8):
    """<name>.npy: 5 severity blocks of `per` images; image i is constant i (so rows are traceable)."""
    n = 5 * per
    np.save(directory / "labels.npy", (np.arange(n) % 10).astype(np.uint8))
    for name in names:
        np.save(directory / f"{name}.npy", np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                                                            (n, size, size, 3)).copy())


def test_cifar_c_files_load_per_severity_in_nchw(tmp_path):
    write_fake_cifar10c(tmp_path, ["fog", "contrast"])
    data = rf.load_corrupted(str(tmp_path), ["fog", "contrast"], severities=(2, 5), num=3)
    assert set(data) == {"fog", "contrast"} and set(data["fog"]) == {2, 5}
    s2, s5 = data["fog"][2], data["fog"][5]
    assert s2.x.shape == (3, 3, 8, 8) and s2.x.dtype == torch.uint8 and s2.y.dtype == torch.int64
    for split, rows in ((s2, [4, 5, 6]), (s5, [16, 17, 18])):   # severity 2: rows 4..7, severity 5: 16..19
        assert split.x[:, 1, 2, 3].tolist() == rows and split.y.tolist() == [r % 10 for r in rows]
    everything = rf.load_corrupted(str(tmp_path))               # every name the folder holds, all rows
    assert list(everything) == ["fog", "contrast"] and len(everything["fog"][1]) == 4   # CIFAR-10-C's order


def test_corrupted_files_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.npy.*Tiny-ImageNet-C"):
        rf.load_corrupted(str(tmp_path), ["fog"])
    write_fake_cifar10c(tmp_path, ["fog"])
    with pytest.raises(FileNotFoundError, match="snow.npy"):
        rf.load_corrupted(str(tmp_path), ["fog", "snow"])
    with pytest.raises(ValueError, match="severities"):
        rf.load_corrupted(str(tmp_path), ["fog"], severities=(0,))


def write_fake_tiny_imagenet_c(directory, names, wnids=("n02", "n01", "n03"), per=2):
    """<name>/<severity>/<wnid>/*.JPEG: image j of class c at severity s is a solid grey 40 c + 8 s + j."""
    for name in names:
        for s in range(1, 6):
            for c, w in enumerate(sorted(wnids)):
                os.makedirs(directory / name / str(s) / w)
                for j in range(per):
                    value = 40 * c + 8 * s + j
                    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(
                        directory / name / str(s) / w / f"{j}.JPEG", quality=100)


def test_tiny_imagenet_c_folders_load_with_sorted_wnid_labels(tmp_path):
    write_fake_tiny_imagenet_c(tmp_path, ["snow", "fog"])
    data = rf.load_corrupted(str(tmp_path), severities=(1, 4))
    assert list(data) == ["snow", "fog"] and set(data["fog"]) == {1, 4}
    split = data["fog"][4]
    assert split.x.shape == (6, 3, 64, 64) and split.y.tolist() == [0, 0, 1, 1, 2, 2]
    values = split.x[:, 0, 10, 10].int()
    expect = torch.tensor([40 * c + 32 + j for c in range(3) for j in range(2)])
    assert (values - expect).abs().max() <= 1                 # JPEG at quality 100
    sub = rf.load_corrupted(str(tmp_path), ["snow"], severities=(2,), num=4)["snow"][2]
    assert len(sub) == 4 and torch.equal(sub.y, rf.load_corrupted(str(tmp_path), ["snow"], (2,), 4)["snow"][2].y)
    with pytest.raises(FileNotFoundError, match="contrast.*Tiny-ImageNet-C"):
        rf.load_corrupted(str(tmp_path), ["snow", "contrast"])


# =============================================================================
# E. Models from the RobustBench zoo (optional: pip install -r requirements-zoo.txt)
# =============================================================================

# Zoo checkpoints are made here, offline: an entry's architecture from robustbench's own registry
# with random weights (random BatchNorm statistics too), saved in RobustBench's layout
# MODEL_DIR/cifar10/Linf/NAME.pt; robustbench's downloader is replaced by one that fails as it does
# without a network, so any download attempt shows. Wong2020Fast is a real zoo entry (PreAct ResNet-18,
# full width: about 0.4 s per forward-backward of 8 images on one CPU thread), so the command-line
# tests run RiFT on it with --module; MRC over every module and the whole selection run on a zoo-like
# entry registered here: robustbench's own WideResNet class at depth 10, widen factor 1 (RobustBench's
# module names). The tests skip when robustbench is not installed (CI's oldest leg), except those that
# check the behaviour without it. Not pytest.importorskip("robustbench"): robustbench 1.1.1's own
# __init__ fails to import where `autoattack` is missing, which would skip them even when it is
# installed.

ZOO_ENTRIES = {"Wong2020Fast": 11_171_146, "Addepalli2022Efficient_RN18": 11_173_962}   # parameters
TINY = "Tiny2099ZooLike"          # the zoo-like entry: not a RobustBench name


def robustbench_or_skip():
    """The robustbench package (imported by robust_ft, see above); skips the test when not installed."""
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("robustbench is not installed (pip install -r requirements-zoo.txt)")
    return rf.import_robustbench()


def zoo_registry(rb, dataset="cifar10"):
    """RobustBench's own L-inf registry for `dataset`, read here without robust_ft's helpers."""
    enums = rb.model_zoo.enums
    return rb.model_zoo.model_dicts[enums.BenchmarkDataset(dataset)][enums.ThreatModel.Linf]


def save_zoo_checkpoint(model_dir, name, seed=0):
    """A random `name` from robustbench's registry, saved as MODEL_DIR/cifar10/Linf/NAME.pt; its state."""
    torch.manual_seed(seed)
    model = randomise_bn(zoo_registry(rf.import_robustbench())[name]["model"](), seed)
    path = model_dir / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return snapshot(model)


@pytest.fixture
def offline(monkeypatch):
    """robustbench's checkpoint download fails as without a network; the calls are recorded."""
    rb = robustbench_or_skip()
    calls = []

    def no_network(gdrive_id, path):
        calls.append(str(path))
        raise ConnectionError("Failed to resolve 'drive.google.com' (no network)")

    monkeypatch.setattr(rb.utils, "download_gdrive_new", no_network)
    return calls


@pytest.fixture(scope="module")
def wong(tmp_path_factory):
    """A model dir holding a random Wong2020Fast checkpoint: (dir, its state dict)."""
    robustbench_or_skip()
    model_dir = tmp_path_factory.mktemp("zoo")
    return model_dir, save_zoo_checkpoint(model_dir, "Wong2020Fast")


@pytest.fixture
def tiny_zoo(tmp_path, offline, monkeypatch):
    """A model dir holding a checkpoint of the zoo-like entry TINY, registered for this test only."""
    rb = robustbench_or_skip()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet
    monkeypatch.setitem(zoo_registry(rb), TINY, {"model": lambda: WideResNet(depth=10, widen_factor=1),
                                                 "gdrive_id": "not-downloaded-in-tests"})
    return tmp_path / "models", save_zoo_checkpoint(tmp_path / "models", TINY)


def zoo_clean_accuracy(name, state, x, y):
    """Clean accuracy (%) of `state` in NAME's architecture, built from robustbench's registry here."""
    model = zoo_registry(rf.import_robustbench())[name]["model"]()
    model.load_state_dict(state)
    with torch.no_grad():
        return 100.0 * (model.eval()(x).argmax(1) == y).double().mean().item()


def true_autoattack_package():
    """What an import finds, asked of the import system directly."""
    return next((n for n in ("autoattack", "pyautoattack") if importlib.util.find_spec(n) is not None), None)


@pytest.mark.parametrize("name", list(ZOO_ENTRIES))
def test_zoo_checkpoint_loads_offline_with_the_saved_weights(name, tmp_path, offline):
    saved = save_zoo_checkpoint(tmp_path, name, seed=3)
    model = rf.load_robustbench_model(name, "cifar10", str(tmp_path))
    assert offline == []                                       # the file was there: nothing downloaded
    assert type(model) is type(zoo_registry(rf.import_robustbench())[name]["model"]()) and not model.training
    assert sum(p.numel() for p in model.parameters()) == ZOO_ENTRIES[name]
    state = model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], v) for k, v in saved.items())
    assert rf.robustbench_files(name, "cifar10", "DIR") == [os.path.join("DIR", "cifar10", "Linf", f"{name}.pt")]
    # robustbench was imported with a stand-in `autoattack`, which must not outlive the import:
    # autoattack_one would otherwise drive pyautoattack with the official package's keywords
    assert rf.autoattack_package() == true_autoattack_package() is not None
    if true_autoattack_package() == "pyautoattack":
        assert "autoattack" not in sys.modules and "autoattack.state" not in sys.modules


def test_robustbench_stand_ins_live_only_during_the_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "autoattack", None)           # as if neither were installed
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    with rf._robustbench_stand_ins():
        from autoattack import AutoAttack
        from autoattack.state import EvaluationState
        import pkg_resources
        assert pkg_resources.resource_filename("robust_ft", "x.txt") == os.path.join(
            os.path.dirname(rf.__file__), "x.txt")
        with pytest.raises(ImportError, match="official AutoAttack"):
            AutoAttack(None)
        with pytest.raises(ImportError):
            EvaluationState()
    assert sys.modules["autoattack"] is None and sys.modules["pkg_resources"] is None   # as before
    assert "autoattack.state" not in sys.modules
    assert rf.autoattack_package() == "pyautoattack"


# =============================================================================
# kernels.py: the fused RGP mask (Triton)
# =============================================================================

# The fused RGP mask against rgp_mask_, bit for bit, on each device the kernels can run on: the CPU
# under the Triton interpreter ("interpreted"), and a CUDA card with the kernels compiled for it
# ("cuda", the `cuda` marker: python -m pytest -q test_robust_ft.py -m cuda, TRITON_INTERPRET unset).
# Triton reads TRITON_INTERPRET when a kernel is decorated, so one process runs one kind. The
# interpreter is slow (about 15 ms per program and launch), so tensors are small: what matters is
# awkward sizes, ties, NaN and dtypes, not bulk.

KERNELS_INTERPRETED = InterpretedFunction is not None and isinstance(kernels._rgp_mask_kernel, InterpretedFunction)
needs_kernels = pytest.mark.skipif(not KERNELS_INTERPRETED,
                                   reason="needs triton, with TRITON_INTERPRET=1 set before kernels is imported")


def cuda_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if kernels.triton is None:
        return "needs triton"
    if KERNELS_INTERPRETED:
        return "TRITON_INTERPRET=1 is set, so the kernels are interpreted: run -m cuda without it"
    return None


needs_cuda = pytest.mark.skipif(cuda_skip_reason() is not None, reason=str(cuda_skip_reason()))
KERNEL_DEVICES = [pytest.param("cpu", marks=needs_kernels, id="interpreted"),
                  pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda], id="cuda")]


@pytest.fixture(params=KERNEL_DEVICES)
def dev(request):
    """The device the kernels run on: the CPU (interpreted) or CUDA (compiled for the card)."""
    return request.param


def on(device, lists):
    """Lists of tensors moved to `device` (strides kept: dense layouts stay as they are)."""
    return [[t.to(device) for t in ts] for ts in lists]


BLOCK, CHUNK = kernels.BLOCK_SIZE, kernels.CHUNK_SIZE
RESNET_LIKE = [(8, 3, 3, 3), (8, 8, 3, 3), (16, 8, 3, 3), (16, 8, 1, 1), (10, 16)]


def _bits(t):
    """Integer view of a float tensor, so that NaN payloads and -0 compare exactly."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype)


def _compare(grads, grads_nat, grads_score, alpha, percentile, expect_launches=6):
    """Mask clones of grads with both paths; assert bit-equal results and the launch count."""
    ref = [g.clone() for g in grads]
    rf.rgp_mask_(ref, grads_nat, grads_score, alpha, percentile)
    before = kernels.LAUNCHES
    kernels.fused_rgp_mask_(grads, grads_nat, grads_score, alpha, percentile)
    assert kernels.LAUNCHES - before == expect_launches   # the kernels ran: no silent fallback
    for i, (r, g) in enumerate(zip(ref, grads)):
        assert torch.equal(_bits(r), _bits(g)), f"tensor {i} {tuple(g.shape)} differs"


@pytest.mark.parametrize("percentile, alpha", [(30.0, 0.1), (33.3, 0.3), (50.0, 0.5)])
def test_resnet_like_shapes(dev, percentile, alpha):
    gen = torch.Generator().manual_seed(0)
    lists = [[_randn(s, gen) for s in RESNET_LIKE] for _ in range(3)]
    _compare(*on(dev, lists), alpha, percentile)


def test_awkward_sizes(dev):
    # empty (k = 0: left out), 1 and 2 elements, around the block and the chunk, a prime
    sizes = [0, 1, 2, BLOCK - 1, BLOCK + 1, 1031, CHUNK + 1]
    gen = torch.Generator().manual_seed(1)
    lists = [[_randn(n, gen) for n in sizes] for _ in range(3)]
    _compare(*on(dev, lists), 0.2, 60.0)


def test_percentile_edges(dev):
    gen = torch.Generator().manual_seed(2)
    lists = on(dev, [[_randn(s, gen) for s in RESNET_LIKE] for _ in range(3)])
    lists[1][0][0, 0, 0, 0] = float("nan")            # a NaN score is zeroed too when k = n
    before = [g.clone() for g in lists[0]]
    _compare([g.clone() for g in lists[0]], lists[1], lists[2], 0.1, 0.0, expect_launches=0)
    _compare(lists[0], lists[1], lists[2], 0.1, 100.0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in lists[0])
    assert not torch.equal(before[0], lists[0][0])
    # k = n - 1 for every tensor: only the largest score survives
    lists = [[_randn(s, gen) for s in RESNET_LIKE] for _ in range(3)]
    _compare(*on(dev, lists), 0.1, 99.9)


def test_ties_and_constants(dev):
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 3, 3, 3), (16, 8, 1, 1), (10, 16), (7,)]
    # few distinct scores: many ties at the threshold, which are kept
    grads_nat = [torch.randint(-2, 3, s, generator=gen).float() for s in shapes]
    grads_score = [torch.randint(-1, 2, s, generator=gen).float() for s in shapes]
    grads = [_randn(s, gen) for s in shapes]
    _compare(*on(dev, [grads, grads_nat, grads_score]), 0.5, 30.0)
    # constant and all-zero scores: t equals every score, so nothing is below it
    grads_nat = [torch.full(s, 0.25) for s in shapes[:2]] + [torch.zeros(s) for s in shapes[2:]]
    grads_score = [torch.full(s, -0.25) for s in shapes[:2]] + [torch.zeros(s) for s in shapes[2:]]
    grads, grads_nat, grads_score = on(dev, [[_randn(s, gen) for s in shapes], grads_nat, grads_score])
    kept = [g.clone() for g in grads]
    _compare(grads, grads_nat, grads_score, 0.1, 70.0)
    assert all(torch.equal(g, k) for g, k in zip(grads, kept))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: 0 * inf
def test_nan_and_inf_scores(dev):
    gen = torch.Generator().manual_seed(4)
    shapes = [(8, 8, 3, 3), (16, 8, 1, 1), (10, 16), (5,)]
    grads_nat = [_randn(s, gen) for s in shapes]
    grads_score = [_randn(s, gen) for s in shapes]
    grads_nat[0].view(-1)[::7] = float("nan")          # some NaN scores, never masked
    grads_score[0].view(-1)[::11] = float("-inf")
    grads_nat[1].view(-1)[: 100] = float("nan")        # t itself is NaN: all numbers are below it
    grads_score[2].view(-1)[::3] = float("inf")          # +inf scores sort just below NaN
    grads_nat[3][:] = float("inf")                     # alpha = 0: 0 * inf = NaN in both paths
    for alpha in (0.0, 0.4):
        grads = [_randn(s, gen) for s in shapes]
        _compare(*on(dev, [grads, grads_nat, grads_score]), alpha, 30.0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1e-40])
def test_alpha_extremes(dev, alpha):
    # 1e-40 makes float32(alpha) subnormal: the kernel must still compute in float32 (no flush to 0)
    gen = torch.Generator().manual_seed(5)
    lists = [[_randn(s, gen) for s in RESNET_LIKE[:3]] for _ in range(3)]
    _compare(*on(dev, lists), alpha, 30.0)


def test_half_precision_and_mixed_dtypes(dev):
    gen = torch.Generator().manual_seed(6)
    dtypes = [(torch.float16, torch.float16, torch.float16),
              (torch.bfloat16, torch.bfloat16, torch.bfloat16),
              (torch.float16, torch.bfloat16, torch.float32),
              (torch.bfloat16, torch.float32, torch.float16),
              (torch.float32, torch.float16, torch.bfloat16)]
    shapes = RESNET_LIKE
    grads = [_randn(s, gen, d[0]) for s, d in zip(shapes, dtypes)]
    grads_nat = [_randn(s, gen, d[1]) for s, d in zip(shapes, dtypes)]
    grads_score = [_randn(s, gen, d[2]) for s, d in zip(shapes, dtypes)]
    _compare(*on(dev, [grads, grads_nat, grads_score]), 0.1, 33.3)   # all five dtype mixes in one launch


def test_non_contiguous_views(dev):
    gen = torch.Generator().manual_seed(7)

    def randn(shape):                                   # made on the device, then viewed
        return _randn(shape, gen).to(dev)

    base = [randn((16, 8, 3, 3)), randn((20, 16)), randn((9, 9))]
    ref_base = [b.clone() for b in base]

    def views(ts):
        return [ts[0].transpose(0, 1), ts[1][:, ::2], ts[2][1:8, 2:]]

    grads_nat = [randn((16, 8, 3, 3)).transpose(0, 1), randn((20, 8)), randn((7, 14))[:, ::2]]
    grads_score = [randn((8, 16, 3, 3)), randn((8, 20)).t(), randn((7, 7))]
    rf.rgp_mask_(views(ref_base), grads_nat, grads_score, 0.1, 30.0)
    before = kernels.LAUNCHES
    kernels.fused_rgp_mask_(views(base), grads_nat, grads_score, 0.1, 30.0)
    # no triple shares dense strides, so each is copied: g and one input per triple are not
    # contiguous (2 copies), one more input in the second and third, and g is copied back
    assert kernels.LAUNCHES - before == 6 + (2 + 0 + 1) + (1 + 1 + 1) + (1 + 1 + 1)
    # whole storages equal: the masked entries went back, the rest of each base is untouched
    assert all(torch.equal(_bits(r), _bits(b)) for r, b in zip(ref_base, base))


def test_channels_last_gradients_take_the_fused_path_without_copies(dev):
    gen = torch.Generator().manual_seed(8)
    shapes = [(8, 3, 3, 3), (16, 8, 3, 3), (16, 8, 1, 1), (10, 16)]

    def layout(t):
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    lists = on(dev, [[layout(_randn(s, gen)) for s in shapes] for _ in range(3)])
    assert not lists[0][1].is_contiguous() and kernels.dense_layout(lists[0][1])
    _compare(*lists, 0.1, 30.0, expect_launches=6)          # bit-identical, and no copy at all
    # g_nat contiguous, the others channels_last: their strides differ, so g and g_adv are copied
    # and g copied back, in the two 3x3 convolutions ((16, 8, 1, 1) is contiguous either way)
    mixed = [lists[0], [t.contiguous() for t in lists[1]], lists[2]]
    _compare(*mixed, 0.1, 30.0, expect_launches=6 + 2 * (1 + 1 + 1))


def resnet_like_lists_and_plain_mask(seed, device="cpu"):
    """Random g, g_nat, g_adv of RESNET_LIKE shapes, and g masked by the plain path (p 30, alpha 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    lists = on(device, [[_randn(s, gen) for s in RESNET_LIKE] for _ in range(3)])
    ref = [g.clone() for g in lists[0]]
    rf.rgp_mask_(ref, lists[1], lists[2], 0.1, 30.0)
    return lists, ref


def test_checked_fused_mask_checks_each_layout_once_and_reports_the_fused_path(dev, monkeypatch):
    lists, ref = resnet_like_lists_and_plain_mask(11, dev)
    plain_calls = []
    real_plain = rf.rgp_mask_
    monkeypatch.setattr(rf, "rgp_mask_", lambda *a: plain_calls.append(1) or real_plain(*a))
    mask = kernels.CheckedFusedMask(log=lambda line: pytest.fail(line))
    for _ in range(2):
        grads = [g.clone() for g in lists[0]]
        mask(grads, lists[1], lists[2], 0.1, 30.0)
        assert all(torch.equal(_bits(r), _bits(g)) for r, g in zip(ref, grads))
    assert mask.path == "fused" and mask.mismatch is None
    assert len(plain_calls) == 1                     # the reference ran for the first call only


def test_checked_fused_mask_falls_back_on_a_mismatch_and_says_so(dev, monkeypatch):
    lists, ref = resnet_like_lists_and_plain_mask(12, dev)
    real_launch = kernels._launch_rgp_mask

    def off_by_one(grads, *args):                   # a broken kernel: one more zero in tensor 2
        real_launch(grads, *args)
        grads[2].view(-1)[grads[2].view(-1).nonzero()[0]] = 0

    monkeypatch.setattr(kernels, "_launch_rgp_mask", off_by_one)
    lines = []
    mask = kernels.CheckedFusedMask(log=lines.append)
    for _ in range(2):
        grads = [g.clone() for g in lists[0]]
        mask(grads, lists[1], lists[2], 0.1, 30.0)
        assert all(torch.equal(_bits(r), _bits(g)) for r, g in zip(ref, grads))   # the plain result
    assert mask.path == "plain after a fused mismatch"
    assert mask.mismatch == dict(tensor=2, shape=list(RESNET_LIKE[2]), entries=1, numel=lists[0][2].numel())
    assert len(lines) == 1 and "tensor 2" in lines[0] and "1 of" in lines[0]


@pytest.mark.skipif(kernels.triton is None, reason="needs triton")
def test_kernels_compile_for_sm80_and_sm90_without_fma():
    """Ahead-of-time compilation with Triton's own ptxas, in a child process without the interpreter."""
    code = ("import json, kernels; r = kernels.compile_report((80, 90)); "
            "fused = kernels.compile_kernel(kernels._rgp_mask_kernel, dict(CHUNK=kernels.CHUNK_SIZE, "
            "BLOCK=kernels.BLOCK_SIZE), 90, enable_fp_fusion=True).asm['ptx']; "
            "print(json.dumps(dict(report=r, fused_fma='fma.rn.f32' in fused)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    names = [f"_rgp_hist_kernel[PASS={p}]" for p in range(4)] + ["_rgp_mask_kernel"]
    assert sorted(result["report"]) == sorted(f"{n}@sm_{c}" for n in names for c in (80, 90))
    for name, meta in result["report"].items():
        assert not meta["ptx_fma_f32"], name                     # enable_fp_fusion=False is honoured
        assert 0 < meta["registers"] <= 255 and meta["num_warps"] == 8
    assert result["fused_fma"]          # the check can fail: with fusion on, the score does use FMA


def test_grads_alias_g_nat(dev):
    # CURE adds the other terms' gradient into g_nat's storage, so grads may be grads_nat
    gen = torch.Generator().manual_seed(8)
    grads_nat, grads_score = on(dev, [[_randn(s, gen) for s in RESNET_LIKE] for _ in range(2)])
    ref = [g.clone() for g in grads_nat]
    rf.rgp_mask_(ref, [g.clone() for g in grads_nat], grads_score, 0.1, 30.0)
    kernels.fused_rgp_mask_(grads_nat, grads_nat, grads_score, 0.1, 30.0)
    assert all(torch.equal(_bits(r), _bits(g)) for r, g in zip(ref, grads_nat))


def test_bottleneck_resnet50_gradients(dev):
    # ResNet-50's 53 masked tensors (1x1 and 3x3 convolutions, the classifier left out) at width 1
    if dev == "cpu":
        pytest.skip("interpreted, ResNet-50's masked tensors are checked bit for bit (on real gradients) by "
                    "test_bench_report_fills_every_section_on_the_cpu")
    with torch.device("meta"):
        model = rf.build_model("resnet50", 10, 1)
    shapes = [tuple(p.shape) for n, p in rf.masked_parameters(model, exclude=("linear",))]
    assert len(shapes) == 53 and (4, 1, 1, 1) in shapes
    gen = torch.Generator().manual_seed(13)
    _compare(*on(dev, [[_randn(s, gen) for s in shapes] for _ in range(3)]), 0.1, 30.0)


def test_launch_count_does_not_grow_with_tensors(dev):
    gen = torch.Generator().manual_seed(9)
    counts = []
    for n_tensors in (3, 40):
        shapes = [(4, 3 + i % 5) for i in range(n_tensors)]
        lists = on(dev, [[_randn(s, gen) for s in shapes] for _ in range(3)])
        before = kernels.LAUNCHES
        _compare(*lists, 0.1, 30.0)
        counts.append(kernels.LAUNCHES - before)
    assert counts[0] == counts[1] == 6


@pytest.mark.parametrize("args", [
    ("lengths", 0.1, 30.0), ("shapes", 0.1, 30.0),
    ("ok", -0.1, 30.0), ("ok", 1.5, 30.0), ("ok", float("nan"), 30.0),
    ("ok", 0.1, -1.0), ("ok", 0.1, 100.5), ("ok", 0.1, float("nan")),
])
def test_errors_match_plain_path(dev, args):
    case, alpha, percentile = args
    a, b = torch.zeros(3, 3, device=dev), torch.zeros(3, 3, device=dev)
    grads, grads_nat, grads_score = [a], [a.clone()], [b]
    if case == "lengths":
        grads_score = [b, b]
    elif case == "shapes":
        grads_nat = [torch.zeros(9, device=dev)]
    with pytest.raises(ValueError) as plain:
        rf.rgp_mask_(grads, grads_nat, grads_score, alpha, percentile)
    with pytest.raises(ValueError) as fused:
        kernels.fused_rgp_mask_(grads, grads_nat, grads_score, alpha, percentile)
    assert str(plain.value) == str(fused.value)


@needs_kernels
def test_falls_back_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(10)
    lists = [[_randn(s, gen) for s in RESNET_LIKE[:2]] for _ in range(3)]
    _compare(*lists, 0.1, 30.0, expect_launches=0)
    # float64 has no kernel dtype code: the plain path handles it, even under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lists = [[_randn(s, gen, torch.float64) for s in RESNET_LIKE[:2]] for _ in range(3)]
    _compare(*lists, 0.1, 30.0, expect_launches=0)


if KERNELS_INTERPRETED or cuda_skip_reason() is None:
    @triton.jit
    def _score_key_probe(seg_ptr,   # int64 (1, 8): segment row as built by kernels._rgp_tables
                         out_ptr,   # int32 (n,): the keys
                         n, a, b, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        tl.store(out_ptr + offs, kernels._rgp_score_key(seg_ptr, 0, offs, mask, a, b), mask=mask)


@pytest.mark.parametrize("alpha", [0.1, 1 / 3, 0.7, 1e-40])
def test_score_key_matches_the_ordering_of_float_scores(dev, alpha):
    # values across the float32 range, where a fused multiply-add would round differently
    gen = torch.Generator().manual_seed(11)
    n = 4096
    mant = torch.rand(2, n, generator=gen) + 0.5
    expo = torch.randint(-140, 128, (2, n), generator=gen).float()
    g_nat, g_adv = (mant * torch.exp2(expo)) * torch.where(torch.rand(2, n, generator=gen) < 0.5, -1, 1)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4e38])
    g_nat[: 7 * 7] = special.repeat_interleave(7)
    g_adv[: 7 * 7] = special.repeat(7)
    g_nat, g_adv = g_nat.to(dev), g_adv.to(dev)
    row = torch.tensor([[n, 0, 0, g_nat.data_ptr(), g_adv.data_ptr(), 0, 0, 0]], dtype=torch.int64, device=dev)
    keys = torch.empty(n, dtype=torch.int32, device=dev)
    a, b = rf.rgp_coefficients(alpha)
    _score_key_probe[(1,)](row, keys, n, a, b, BLOCK=n, enable_fp_fusion=False)
    assert torch.equal(keys, rf.score_key(rf.rgp_score(g_nat, g_adv, alpha)))


@pytest.fixture
def deterministic():
    """Deterministic algorithms (cuDNN, cuBLAS, scatter) for one test, so that two runs differ only
    where the code under test makes them differ; the previous settings are restored after."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


def cure_steps(dev, mask_fn, steps=1, width=2, size=16, channels_last=False, amp="none"):
    """`steps` CURE steps (PGD-2, batch 8) of a ResNet-18 at `width` on `dev` with `mask_fn`, from
    seed 0, so that two calls differ only by their masks. Returns the model."""
    torch.manual_seed(0)
    model = rf.build_model("resnet18", 10, width).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = rf.cure_defaults("resnet18", "cifar10")
    opt = rf.make_optimizer(model, 0.1, 5e-4)
    revision, schedule = rf.cure_revision(model, cfg), rf.CureSchedule.for_run(cfg, 100)
    coin, data = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.rand(8, 3, size, size, generator=data).to(dev)
        y = torch.randint(10, (8,), generator=data).to(dev)
        with run.autocast(amp, dev):
            rf.cure_step(model, opt, x, y, revision, cfg, schedule, coin, EPS, 2 / 255, 2, mask_fn)
    return model


def test_cure_steps_with_the_fused_mask_give_the_plain_steps_parameters(dev, deterministic):
    steps, width, size = (1, 2, 16) if dev == "cpu" else (3, 16, 32)   # the interpreter is slow
    before = kernels.LAUNCHES
    fused = cure_steps(dev, kernels.fused_rgp_mask_, steps, width, size)
    assert kernels.LAUNCHES - before == 6 * steps
    plain = cure_steps(dev, rf.rgp_mask_, steps, width, size)
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp, channels_last", [("bf16", False), ("none", True), ("bf16", True)])
def test_cure_steps_in_bf16_and_channels_last_take_the_fused_path_on_cuda(amp, channels_last):
    mask = kernels.CheckedFusedMask(log=pytest.fail)          # a mismatch with the plain path fails
    torch.manual_seed(0)
    start = rf.build_model("resnet18", 10, 16).state_dict()   # cure_steps' start, seeded alike
    model = cure_steps("cuda", mask, 3, 16, 32, channels_last, amp)
    assert mask.path == "fused" and mask.mismatch is None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.cpu(), start[n]) for n, p in model.named_parameters())


@needs_kernels
def test_bench_mask_on_cpu():
    shapes = {"tiny": [(8, 3, 3, 3), (10, 16)]}
    result = kernels.bench_mask(shapes, warmup=0, reps=1, device="cpu")
    json.dumps(result)
    row = result["models"]["tiny"]
    assert row["n_elements"] == 216 + 160
    assert row["traffic_bytes"] == 44 * 376
    assert row["fused_ms"] is None and "CUDA" in row["fused_note"]
    assert row["plain_ms"] > 0 and row["numpy_ms"] > 0


# =============================================================================
# run.py: the command line
# =============================================================================

# The command-line preset of every run here: a small run on synthetic images on the CPU (a ResNet-18
# of width 4, 2 epochs of 64 training images in batches of 16, PGD-1 training attack; PGD-10 on 16
# test images, no AutoAttack, no corruptions). A test changes an option by giving it again after
# *FAST: the last value wins.
FAST = ["synthetic", "--preset", "quick", "--device", "cpu", "--width", "4", "--epochs", "2", "--train-size", "64",
        "--batch-size", "16", "--val-size", "8", "--test-size", "16", "--attack-steps", "1", "--attacks", "pgd10",
        "--no-autoattack", "--no-corruptions"]


def run_cli(argv, capsys):
    metrics = run.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(metrics))
    return metrics


def cli_error(argv, capsys):
    """The one stderr line of a run that exits with code 2."""
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("run.py: error: "), err
    return err[0]


def no_attack(model, x, *args, **kwargs):
    """Stands in for rf.pgd where a test checks names or files, not attacks: x unchanged."""
    return x.detach().clone()


@pytest.fixture(scope="module")
def natural_ckpt(tmp_path_factory):
    """A 1-epoch natural run of the FAST setting through the CLI: its checkpoint's path."""
    out = tmp_path_factory.mktemp("fast_natural") / "natural"
    run.main(["natural", *FAST, "--epochs", "1", "--out", str(out)])
    return str(out / "checkpoint.pt")


def fast_test_split(size=16):
    """The test split run.py uses for FAST: synthetic seed 0, a seeded random subset of the test set."""
    data = rf.synthetic_data(2000, 500, seed=0)
    index = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))[:size]
    return data.test.x[index].float() / 255, data.test.y[index]


def clean_accuracy_by_hand(state, x, y):
    model = rf.build_model("resnet18", 10, 4)
    model.load_state_dict(state)
    with torch.no_grad():
        return 100.0 * (model.eval()(x).argmax(1) == y).double().mean().item()


def masked_names(width=4):
    """Weights (ndim >= 2) of the FAST model, from its own state dict."""
    return {n for n, p in rf.build_model("resnet18", 10, width).named_parameters() if p.ndim >= 2}


# --- Arguments, presets, errors, progress ---------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["train", "synthetic"], ["'train'", "natural", "cure"]),
    (["at", "mnist"], ["'mnist'", "cifar10", "synthetic"]),
    (["at", "synthetic", "--model", "vgg16"], ["'vgg16'", "resnet18", "wrn34_10"]),
    (["at", "synthetic", "--eps", "-1"], ["-1", ">= 0"]),
    (["at", "synthetic", "--preset", "fast"], ["'fast'", "paper", "quick"]),
    (["at", "synthetic", "--attacks", "pgd7"], ["'pgd7'", "pgd20"]),
    (["bench", "everything"], ["'everything'", "step", "mask", "report", "gpu"]),
    (["bench", "gpu", "--device", "cpu"], ["bench gpu", "CUDA", "--device is cpu",
                                           "TRITON_INTERPRET=1 python -m pytest -q test_robust_ft.py"]),
    (["cure", "synthetic", "--revision-rate", "0"], ["--revision-rate 0", "(0, 1]"]),
    (["cure", "synthetic", "--revision-decay", "1"], ["--revision-decay 1", "[0, 1)"]),
    (["eval", "synthetic", "--aa-size", "0"], ["--aa-size 0", "positive"]),
    (["at", "synthetic", "--amp", "fp16"], ["'fp16'", "none", "bf16"]),
    (["cure", "synthetic", "--cure-variant", "authors"], ["--cure-variant", "'authors'", "paper", "official"]),
    (["cure", "synthetic", "--percentile", "150"], ["--percentile 150", "[0, 100]"]),
    (["cure", "synthetic", "--alpha", "nan"], ["--alpha nan", "[0, 1]"]),
    (["compare", "synthetic", "--methods", "mart"], ["'mart'", "at", "trades", "cure"]),
    (["eval", "synthetic", "--severity", "6"], ["--severity 6", "[1, 2, 3, 4, 5]"]),
    (["analyze", "tsne", "synthetic"], ["'tsne'", "cka", "eps", "minpert"]),
    (["analyze", "cka"], ["analyze cka needs a dataset", "cifar10"]),
    (["analyze", "eps", "synthetic"], ["needs --init"]),
    (["analyze", "eps", "synthetic", "--init", "a.pt", "--eps-list", "1,x"], ["--eps-list", "'1,x'"]),
    (["eval", "synthetic", "--init", "a.pt", "--init", "b.pt"], ["--init given 2 times", "only analyze"]),
    (["layerwise", "synthetic", "--blocks", "1,6"], ["--blocks", "'1,6'", "digits 1-4"]),
    (["layerwise", "synthetic", "--model", "wrn34_10"], ["layerwise", "'wrn34_10'", "resnet18"]),
    (["eval", "synthetic", "--cifar10c", "/no/such/dir"], ["--cifar10c", "/no/such/dir", "no such folder"]),
])
def test_bad_input_gives_a_one_line_error_and_exit_2(argv, words, capsys):
    err = cli_error(argv, capsys)
    for w in words:
        assert w in err


def test_cli_lr_is_the_presets_for_batch_128_scaled_with_the_batch_and_no_two_drops_share_an_epoch(capsys):
    resolved = lambda *a: run.resolve(run.parse_args(list(a)))
    paper = resolved("cure", "cifar10", "--no-autoattack")
    assert (paper.lr, paper.natural_lr, paper.batch_size, paper.epochs, paper.milestones) == (0.1, 0.1, 128, 200, None)
    assert resolved("cure", "cifar10", "--batch-size", "512", "--no-autoattack").lr == pytest.approx(0.4)
    quick = run.PRESETS["quick"]
    synthetic = resolved("cure", "synthetic", "--preset", "quick")             # batch 32: a quarter
    assert synthetic.batch_size == 32
    assert synthetic.lr == pytest.approx(run.SYNTHETIC_QUICK.get("lr", quick["lr"]) * 32 / 128)
    assert synthetic.natural_lr == pytest.approx(quick["natural_lr"] * 32 / 128)
    assert resolved("natural", "synthetic", "--preset", "quick").lr == pytest.approx(quick["natural_lr"] * 32 / 128)
    given = resolved("cure", "synthetic", "--preset", "quick", "--lr", "0.3")  # --lr: as given, for the method
    assert (given.lr, given.natural_lr) == (0.3, pytest.approx(quick["natural_lr"] * 32 / 128))
    assert resolved("cure", "synthetic", "--milestones", "3,4", "--epochs", "5").milestones == [3, 4]
    assert resolved("cure", "synthetic", "--milestones", "none").milestones == []
    for bad in ("2,2", "4,3", "0", "200", "a"):
        err = cli_error(["cure", "synthetic", "--milestones", bad], capsys)
        assert f"--milestones {bad!r}" in err


def test_cli_beta_defaults_cure_5_trades_6_and_given_values_kept():
    resolved = lambda *a: run.resolve(run.parse_args(list(a)))
    assert resolved("cure", "synthetic").beta == 5.0
    assert resolved("cure", "synthetic", "--beta", "1").beta == 1.0
    assert resolved("trades", "synthetic").beta == 6.0
    assert resolved("cure", "synthetic").cure_variant == "paper"


def test_autoattack_defaults_per_preset():
    """On wherever `evaluate` reports a paper table (paper: all test images, quick: 200), off for the
    one-minute synthetic run unless asked for; an explicit flag always wins."""
    def resolved(*argv):
        args = run.resolve(run.parse_args(list(argv)))
        return args.autoattack, args.aa_size

    assert resolved("cure", "cifar10") == (True, None)
    assert resolved("cure", "folder", "--preset", "quick") == (True, 200)
    assert resolved("cure", "synthetic", "--preset", "quick") == (False, 32)
    assert resolved("cure", "synthetic", "--preset", "quick", "--autoattack") == (True, 32)
    assert resolved("eval", "cifar10", "--no-autoattack", "--aa-size", "50") == (False, 50)


def test_progress_in_a_log_file_is_a_plain_line_every_5_percent(capsys):
    bar = run.Progress("cure epoch 1/5")                       # pytest's stderr is not a terminal
    for i in range(1, 391):
        bar(i, 390)
    lines = capsys.readouterr().err.split("\n")
    assert lines[-1] == "" and "\r" not in "".join(lines)
    assert len(lines) - 1 == 21 and lines[-2].startswith("cure epoch 1/5 [390/390]")   # 0%..100% by 5%
    bar = run.Progress("x", interactive=True)                   # a terminal: rewritten in place
    bar(1, 2), bar(2, 2)
    err = capsys.readouterr().err
    assert err.startswith("\rx [1/2]") and err.endswith("\n") and err.count("\n") == 1


# --- Training: natural, AT, TRADES ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["natural", "trades"])
def test_cli_trains_end_to_end_and_writes_metrics(method, tmp_path, capsys):
    out = tmp_path / method
    metrics = run_cli([method, *FAST, "--train-size", "96", "--batch-size", "32", "--val-size", "16",
                       "--test-size", "32", "--attack-steps", "2", "--attacks", "pgd20,cw", "--out", str(out)],
                      capsys)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["method"] == method and on_disk["test"]["n"] == 32
    assert {"clean", "pgd20", "cw", "worst", "nrr"} <= set(on_disk["test"])
    lines = run.read_log(out / "log.jsonl", evaluations=True)
    assert [e["epoch"] for e in lines if "epoch" in e] == [1, 2]
    assert [e["attack"] for e in lines if e.get("evaluation") == "test"] == ["clean", "pgd20", "cw"]   # as each finished
    assert (out / "checkpoint.pt").exists()
    test = on_disk["test"]
    assert test["sum"] == pytest.approx(test["clean"] + test["cw"])            # CURE Table 8's SUM
    conv2 = [f"layer{i}.{j}.conv2.weight" for i in range(1, 5) for j in range(2)]
    for e in (e for e in lines if "epoch" in e):                               # CURE Fig. 6a, every method
        assert list(e["grad_magnitude"]) == conv2 and all(v > 0 for v in e["grad_magnitude"].values())


@pytest.fixture(scope="module")
def quick_natural(tmp_path_factory):
    """`python run.py natural synthetic --preset quick` (3 epochs, width 8): (checkpoint path, metrics)."""
    out = tmp_path_factory.mktemp("quick") / "natural"
    metrics = run.main(["natural", "synthetic", "--preset", "quick", "--no-autoattack", "--attacks", "pgd20",
                        "--out", str(out)])
    return str(out / "checkpoint.pt"), metrics


def test_collapse_warning_names_the_share_and_the_levers_and_is_recorded(quick_natural, tmp_path, capsys):
    ckpt, _ = quick_natural
    out = tmp_path / "lr2"
    metrics = run.main(["trades", "synthetic", "--preset", "quick", "--no-autoattack", "--init", ckpt, "--lr", "2",
                        "--epochs", "1", "--train-size", "256", "--attacks", "pgd10", "--out", str(out)])
    captured = capsys.readouterr()
    assert metrics["collapsed"]["epoch"] == 1 and metrics["collapsed"]["top_class_share"] > 50
    assert json.loads(captured.out.strip().splitlines()[-1])["collapsed"] == metrics["collapsed"]
    assert json.loads((out / "metrics.json").read_text())["collapsed"] == metrics["collapsed"]
    assert run.read_log(out / "log.jsonl")[0]["collapsed"] == metrics["collapsed"]
    (line,) = [l for l in captured.err.splitlines() if "collapsed" in l]
    assert f"{metrics['collapsed']['top_class_share']:.1f}%" in line and "--lr (now 2)" in line and "--beta (now 6)" in line


# --- CURE -----------------------------------------------------------------------------------------

def test_quick_preset_cure_stage_keeps_clean_accuracy_and_doubles_robustness(quick_natural, tmp_path, capsys):
    """The first two epochs of the synthetic quick preset's own CURE stage (its lr, batch 32, PGD-3;
    its schedule drops lr only after epoch 2, hence --milestones none), from the preset's natural
    model: no collapse, clean accuracy within 15 points of the natural model's and PGD-20 at least
    twice its (the bar the README's demo meets after all three epochs). The old default, lr 0.1 at
    batch 32, collapsed in its first epoch (14% clean, 90% of the predictions on one class)."""
    ckpt, natural = quick_natural
    metrics = run_cli(["cure", "synthetic", "--preset", "quick", "--no-autoattack", "--init", ckpt, "--epochs", "2",
                       "--milestones", "none", "--attacks", "pgd20", "--out", str(tmp_path / "cure")], capsys)
    assert "collapsed" not in metrics
    assert metrics["test"]["clean"] >= natural["test"]["clean"] - 15, (natural["test"], metrics["test"])
    assert metrics["test"]["pgd20"] >= 2 * natural["test"]["pgd20"], (natural["test"], metrics["test"])


def test_cli_cure_eff_warm_up_epoch_is_natural_then_cure(tmp_path, capsys):
    out = tmp_path / "eff"
    metrics = run_cli(["cure", *FAST, "--warmup-epochs", "1", "--epochs", "2", "--out", str(out)], capsys)
    log = run.read_log(out / "log.jsonl")
    assert [e["epoch"] for e in log] == [1, 2]
    assert "val_revision" not in log[0] and "updated_fraction" not in log[0]     # natural epoch
    assert "val_revision" in log[1] and set(log[1]["updated_fraction"]) == masked_names()
    numel = {n: p.numel() for n, p in rf.build_model("resnet18", 10, 4).named_parameters()}
    for name, frac in log[1]["updated_fraction"].items():      # p = 30 (Table 9) masks >= floor(0.3 n)
        assert 0.5 < frac <= 1 - math.floor(0.3 * numel[name]) / numel[name] + 1e-9, name
    assert not (out / "natural").exists()                       # CURE-Eff: no separate pre-training
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["cure_step"] == 4            # only the second epoch ran CURE steps
    assert metrics["epochs"] == 2 and "test_revision" in metrics


def test_cli_cure_without_init_pretrains_naturally_then_starts_from_it(tmp_path, capsys):
    out = tmp_path / "cure"
    run_cli(["cure", *FAST, "--natural-epochs", "2", "--epochs", "1", "--revision-rate", "1e-9",
             "--out", str(out)], capsys)
    nat = torch.load(out / "natural" / "checkpoint.pt", weights_only=False)
    assert nat["epoch"] == 2 and nat["method"] == "natural"      # --natural-epochs, not --epochs
    assert len(run.read_log(out / "natural" / "log.jsonl")) == 2
    cure = torch.load(out / "checkpoint.pt", weights_only=False)
    assert cure["method"] == "cure" and cure["epoch"] == 1 and cure["revision_updates"] == 0
    # the revision model (never updated) is the copy of the model CURE started from
    assert_same_contents(cure["revision"], nat["model"])
    assert not all(torch.equal(cure["model"][k], v) for k, v in nat["model"].items())


def test_cli_no_mask_classifier_leaves_the_classifier_unmasked(natural_ckpt, tmp_path, capsys, monkeypatch):
    shapes = []
    mask = rf.rgp_mask_

    def spy(grads, grads_nat, grads_score, alpha, percentile):
        shapes.append([tuple(g.shape) for g in grads])
        return mask(grads, grads_nat, grads_score, alpha, percentile)

    monkeypatch.setattr(rf, "rgp_mask_", spy)
    out = tmp_path / "nomask"
    run_cli(["cure", *FAST, "--epochs", "1", "--init", natural_ckpt, "--no-mask-classifier", "--out", str(out)],
            capsys)
    assert len(shapes) == 4                                     # one mask call per CURE step
    assert all((10, 32) not in s and len(s) == 20 for s in shapes)   # linear.weight (10, 32): never masked
    frac = run.read_log(out / "log.jsonl")[0]["updated_fraction"]
    assert set(frac) == masked_names() - {"linear.weight"}
    assert all(v < 1 for v in frac.values())
    assert json.loads((out / "config.json").read_text())["mask_classifier"] is False


def test_cure_variant_official_runs_end_to_end_and_logs_only_conv1(tmp_path, capsys, natural_ckpt):
    out = tmp_path / "official"
    metrics = run_cli(["cure", *FAST, "--epochs", "1", "--init", natural_ckpt, "--cure-variant", "official",
                       "--out", str(out)], capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["beta"] == 5.0 and config["cure_variant"] == "official"
    log = run.read_log(out / "log.jsonl")
    fraction = log[0]["updated_fraction"]
    assert sorted(fraction) == [f"layer{a}.{b}.conv1.weight" for a in (1, 2, 3, 4) for b in (0, 1)]
    assert all(0.5 < v < 0.8 for v in fraction.values())          # about 70% updated (p 30, ties aside)
    assert metrics["mask_path"] == "official (plain)"
    assert {"clean", "pgd10"} <= set(metrics["test_revision"])


def test_cure_logs_the_entries_updated_at_least_once_in_each_third_of_training(natural_ckpt, tmp_path, capsys,
                                                                                 monkeypatch):
    kept = []                                      # per step: the entries the mask let through

    def spy(grads, grads_nat, grads_score, alpha, percentile):
        rf.rgp_mask_(grads, grads_nat, grads_score, alpha, percentile)
        kept.append([g != 0 for g in grads])

    monkeypatch.setattr(run, "mask_function", lambda device: spy)
    run_cli(["cure", *FAST, "--epochs", "3", "--init", natural_ckpt, "--out", str(tmp_path)], capsys)
    log = run.read_log(tmp_path / "log.jsonl")
    phases = [e["update_shares"] for e in log if "update_shares" in e]
    assert [p["phase"] for p in phases] == ["initial", "middle", "final"] and len(kept) == 12
    names = list(phases[0]["updated"])
    assert len(names) == 21 and "linear.weight" in names       # every masked tensor
    for i, phase in enumerate(phases):                           # 4 steps per phase (one epoch each)
        steps = kept[4 * i: 4 * i + 4]
        for j, name in enumerate(names):
            ever = torch.stack([s[j] for s in steps]).any(0).double().mean().item()
            assert phase["updated"][name] == pytest.approx(ever) and phase["never"][name] == pytest.approx(1 - ever)
        assert phase["steps"] == 4
    assert len({round(v, 6) for v in phases[0]["updated"].values()}) > 1     # it varies by layer


# --- RiFT -----------------------------------------------------------------------------------------

def test_cli_rift_module_skips_mrc_and_changes_only_that_module(natural_ckpt, tmp_path, capsys, monkeypatch):
    out, module = tmp_path / "rift", "layer4.1.conv2"
    chosen = []

    def half(table, tolerance):       # record the rule's choice, then interpolate half-way whatever
        chosen.append(select(table, tolerance))     # it is, so the fine-tuned module shows up
        return 0.5

    tuned = {}

    def finetune(model, *args, **kwargs):                  # keep the fine-tuned weights
        losses = finetune_module(model, *args, **kwargs)
        tuned.update(snapshot(model))
        return losses

    select, finetune_module = rf.select_alpha, rf.finetune_module
    monkeypatch.setattr(rf, "select_alpha", half)
    monkeypatch.setattr(rf, "finetune_module", finetune)
    m = run_cli(["rift", *FAST, "--init", natural_ckpt, "--module", module, "--rift-epochs", "2", "--lr", "0.05",
                 "--tolerance", "100", "--out", str(out)], capsys)
    assert "mrc" not in m and "mrc_examples" not in m and m["module"] == module
    assert [r["alpha"] for r in m["alphas"]] == [i / 10 for i in range(11)]
    clean0 = m["alphas"][0]["clean"]
    gains = [r["clean"] for r in m["alphas"] if r["clean"] > clean0]      # tolerance 100: any gain counts
    pick = next(r for r in m["alphas"] if r["alpha"] == chosen[0])
    assert (chosen[0] == 0.0) if not gains else (pick["clean"] == max(gains))
    start = torch.load(natural_ckpt, weights_only=False)["model"]
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["module"] == module and ck["alpha"] == m["alpha"] == 0.5
    for k, v in start.items():       # theta(1/2) = (theta_0 + theta_tuned) / 2: exact where nothing moved
        if k.startswith(module + "."):
            assert not torch.equal(tuned[k], v), k
            assert torch.allclose(ck["model"][k], 0.5 * v + 0.5 * tuned[k], rtol=0, atol=1e-7), k
        else:
            assert torch.equal(ck["model"][k], v), k                      # BN statistics included
    x, y = fast_test_split(16)
    assert m["before"]["clean"] == pytest.approx(clean_accuracy_by_hand(start, x, y), abs=1e-9)
    assert m["after"]["clean"] == pytest.approx(clean_accuracy_by_hand(ck["model"], x, y), abs=1e-9)


def test_cli_rift_mrc_only_ranks_every_conv_and_linear_and_stops(natural_ckpt, tmp_path, capsys):
    out = tmp_path / "mrc"
    m = run_cli(["rift", *FAST, "--init", natural_ckpt, "--mrc-only", "--mrc-size", "8", "--out", str(out)], capsys)
    model = rf.build_model("resnet18", 10, 4)
    expected = {n for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert set(m["mrc"]) == expected and len(expected) == 21
    values = list(m["mrc"].values())
    assert values == sorted(values)                             # the ranking, lowest first
    assert m["module"] == min(m["mrc"], key=m["mrc"].get) == next(iter(m["mrc"]))
    assert m["mrc_examples"] == 8
    assert not (out / "checkpoint.pt").exists() and "alphas" not in m and "after" not in m


def test_rift_fine_tunes_rifts_published_resnet34_module_and_cure_masks_bottlenecks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rf, "pgd", no_attack)                      # names, not attacks
    torch.manual_seed(0)
    torch.save(rf.build_model("resnet34", 10, 1).state_dict(), tmp_path / "r34.pt")
    common = ["synthetic", "--device", "cpu", "--width", "1", "--train-size", "16", "--val-size", "4",
              "--test-size", "4", "--batch-size", "16", "--attacks", "pgd10", "--attack-steps", "1", "--no-autoattack"]
    m = run_cli(["rift", *common, "--model", "resnet34", "--init", str(tmp_path / "r34.pt"),
                 "--module", "layer2.3.conv2", "--rift-epochs", "1", "--out", str(tmp_path / "rift")], capsys)
    assert m["module"] == "layer2.3.conv2" and len(m["alphas"]) == 11
    assert set(m["after"]["corruptions"]["per_type"]) == set(rf.GENERATED_CORRUPTIONS)   # on by default for rift
    m = run_cli(["cure", *common, "--model", "resnet50", "--epochs", "1", "--natural-epochs", "1",
                 "--out", str(tmp_path / "cure")], capsys)
    log = run.read_log(tmp_path / "cure" / "log.jsonl")
    fraction = next(e["updated_fraction"] for e in log if "updated_fraction" in e)
    assert len(fraction) == 54 and "layer4.2.conv3.weight" in fraction and "linear.weight" in fraction


def test_rift_names_a_collapsed_fine_tuning_even_when_alpha_0_is_kept(quick_natural, tmp_path, capsys):
    ckpt, _ = quick_natural
    m = run.main(["rift", "synthetic", "--preset", "quick", "--no-autoattack", "--no-corruptions", "--init", ckpt,
                  "--module", "conv1", "--rift-epochs", "1", "--lr", "10", "--train-size", "128", "--val-size", "32",
                  "--test-size", "32", "--attacks", "pgd10", "--out", str(tmp_path / "rift")])
    tuned = next(r for r in m["alphas"] if r["alpha"] == 1.0)
    assert rf.collapsed(tuned, 10) and m["collapsed"]["top_class_share"] == tuned["top_class_share"]
    assert m["collapsed"]["on"] == "validation (the fine-tuned weights, alpha 1)" and m["alpha"] < 1.0
    assert "rift (the fine-tuned weights, alpha 1) collapsed at epoch 1" in capsys.readouterr().err


# --- Evaluation -----------------------------------------------------------------------------------

def test_cli_eval_reports_the_clean_accuracy_of_the_checkpoint(tmp_path, capsys):
    model = tiny_model(seed=11, mean=(0.5,) * 3, std=(0.25,) * 3, random_bn=True)
    ckpt = tmp_path / "m.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    metrics = run_cli(["eval", *FAST, "--test-size", "64", "--init", str(ckpt), "--out", str(tmp_path / "e")],
                      capsys)
    test = metrics["test"]
    assert metrics["method"] == "eval" and metrics["checkpoint"] == str(ckpt)
    assert {"n", "clean", "pgd10", "worst", "nrr"} <= set(test) and test["n"] == 64
    assert not {"pgd20", "cw", "autoattack"} & set(test)       # only the attacks asked for
    x, y = fast_test_split(64)
    assert test["clean"] == pytest.approx(clean_accuracy_by_hand(model.state_dict(), x, y), abs=1e-9)
    assert test["worst"] == test["pgd10"] <= test["clean"]
    c, r = test["clean"], test["worst"]
    assert test["nrr"] == pytest.approx(2 * c * r / (c + r) if c + r else 0.0)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


def test_metrics_json_is_written_as_each_attack_finishes(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "m.pt"
    torch.save({"model": rf.build_model("resnet18", 10, 4, (0.5,) * 3, (0.25,) * 3).state_dict()}, ckpt)
    out = tmp_path / "eval"
    seen = []
    real = rf.pgd

    def spy(model, x, y, *args, loss="ce", **kwargs):            # what is on disk while CW runs
        if loss == "cw" and (out / "metrics.json").exists():
            seen.append(json.loads((out / "metrics.json").read_text()))
        return real(model, x, y, *args, loss=loss, **kwargs)

    monkeypatch.setattr(rf, "pgd", spy)
    run_cli(["eval", *FAST, "--attacks", "pgd20,cw", "--init", str(ckpt), "--out", str(out)], capsys)
    assert seen and seen[0]["status"] == "evaluating"
    assert "pgd20" in seen[0]["test"] and "cw" not in seen[0]["test"]


def test_a_failing_attack_keeps_the_others_results_and_exits_1(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save({"model": rf.build_model("resnet18", 10, 4, (0.5,) * 3, (0.25,) * 3).state_dict()}, ckpt)

    def broken(*args, **kwargs):
        raise RuntimeError("AutoAttack exploded")

    monkeypatch.setattr(rf, "autoattack_correct", broken)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        run.main(["eval", *FAST, "--attacks", "pgd20,cw", "--init", str(ckpt), "--autoattack", "--out", str(out)])
    assert e.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "autoattack" in err[0] and "AutoAttack exploded" in err[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"clean", "pgd20", "cw", "worst"} <= set(metrics["test"])
    assert "autoattack" not in metrics["test"] and "AutoAttack exploded" in metrics["test"]["failed"]["autoattack"]
    logged = [e["attack"] for e in run.read_log(out / "log.jsonl", evaluations=True)]
    assert logged == ["clean", "pgd20", "cw", "autoattack"]            # one log line per finished attack


# --- Data -----------------------------------------------------------------------------------------

def test_natural_and_eval_run_on_a_miniature_tiny_imagenet(tmp_path, capsys):
    make_tiny_imagenet(tmp_path / "data", per_class=6)
    common = ["tinyimagenet", "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--width", "2",
              "--no-autoattack", "--attacks", "pgd10", "--attack-steps", "1", "--val-size", "2"]
    trained = run_cli(["natural", *common, "--epochs", "2", "--batch-size", "4",
                       "--out", str(tmp_path / "nat")], capsys)
    assert trained["test"]["n"] == 4 and trained["dataset"] == "tinyimagenet"
    ckpt = torch.load(tmp_path / "nat" / "checkpoint.pt", weights_only=False)
    assert ckpt["model"]["linear.weight"].shape == (3, 16)            # 200 classes in the real one
    evaluated = run_cli(["eval", *common, "--init", str(tmp_path / "nat" / "checkpoint.pt"),
                         "--out", str(tmp_path / "eval")], capsys)
    assert evaluated["test"]["clean"] == trained["test"]["clean"] and evaluated["test"]["n"] == 4


@pytest.mark.parametrize("breakage, words", [
    ("no wnids", ["no wnids.txt", "tiny-imagenet-200"]),
    ("no annotations", ["val_annotations.txt", "not found"]),
    ("unknown wnid", ["line 2", "n00000000"]),
    ("missing image", ["val_1.JPEG", "does not exist"]),
    ("empty class", ["n01443537", "no images"]),
])
def test_a_broken_tiny_imagenet_is_one_line_and_exit_2(tmp_path, capsys, breakage, words):
    root = make_tiny_imagenet(tmp_path)
    if breakage == "no wnids":
        os.remove(root / "wnids.txt")
    elif breakage == "no annotations":
        os.remove(root / "val" / "val_annotations.txt")
    elif breakage == "unknown wnid":
        text = (root / "val" / "val_annotations.txt").read_text().replace("n01443537", "n00000000")
        (root / "val" / "val_annotations.txt").write_text(text)
    elif breakage == "missing image":
        os.remove(root / "val" / "images" / "val_1.JPEG")
    else:
        shutil.rmtree(root / "train" / "n01443537" / "images")
    err = cli_error(["natural", "tinyimagenet", "--data-dir", str(tmp_path), "--device", "cpu"], capsys)
    for w in words:
        assert w in err


# --- Analyses -------------------------------------------------------------------------------------

def test_layerwise_trains_only_the_listed_blocks_from_one_natural_checkpoint(natural_ckpt, tmp_path, capsys):
    out = tmp_path / "lw"
    summary = run_cli(["layerwise", *FAST, "--init", natural_ckpt, "--epochs", "1", "--blocks", "1,23",
                       "--out", str(out)], capsys)
    assert list(summary["table"]) == ["ST", "SAT", "U-1", "U-23"]
    start = torch.load(natural_ckpt, weights_only=False)["model"]
    for row, trained in (("U-1", ("conv1", "bn1", "layer1")), ("U-23", ("conv1", "bn1", "layer2", "layer3"))):
        state = torch.load(out / row / "checkpoint.pt", weights_only=False)["model"]
        params = dict(rf.build_model("resnet18", 10, 4).named_parameters())
        for k, v in state.items():
            if k not in params:
                continue                                   # BatchNorm statistics adapt (the official code)
            moved = not torch.equal(v, start[k])
            assert moved == (k.split(".")[0] in trained), (row, k)
        config = json.loads((out / row / "config.json").read_text())
        assert config["trainable"] == list(trained) and config["reinit"] is True
    sat = torch.load(out / "SAT" / "checkpoint.pt", weights_only=False)["model"]
    assert not torch.equal(sat["linear.weight"], start["linear.weight"])     # SAT trains everything
    table = (out / "results.md").read_text()
    assert "| U-23 | conv1, bn1, layer2, layer3 |" in table and "| SAT | everything |" in table
    for png in ("layerwise_accuracy.png", "layerwise_robust_per_epoch.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layerwise_freeze_bn_keeps_the_frozen_blocks_batchnorm_statistics(natural_ckpt, tmp_path, capsys):
    out = tmp_path / "lw"
    run_cli(["layerwise", *FAST, "--init", natural_ckpt, "--epochs", "1", "--blocks", "1", "--freeze-bn",
             "--out", str(out)], capsys)
    start = torch.load(natural_ckpt, weights_only=False)["model"]
    state = torch.load(out / "U-1" / "checkpoint.pt", weights_only=False)["model"]
    stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    for k in stats:                                        # frozen: as the natural model left them
        assert torch.equal(state[k], start[k]) == (k.split(".")[0] not in ("bn1", "layer1")), k
    assert json.loads((out / "results.json").read_text())["freeze_bn"] is True


def test_analyze_eps_cka_and_minpert_write_their_results_for_several_checkpoints(natural_ckpt, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(1)
    torch.save(rf.build_model("resnet18", 10, 4).state_dict(), other / "model.pt")
    common = [*FAST, "--test-size", "8", "--init", natural_ckpt, "--init", str(other / "model.pt")]
    run_cli(["analyze", "eps", *common, "--eps-list", "2,8", "--out", str(tmp_path / "eps")], capsys)
    eps = json.loads((tmp_path / "eps" / "results.json").read_text())
    assert list(eps["models"]) == ["natural", "other"] and eps["n"] == 8
    model = rf.build_model("resnet18", 10, 4)
    model.load_state_dict(torch.load(natural_ckpt, weights_only=False)["model"])
    split = rf.synthetic_data(2000, 500, seed=0).test
    split = split.subset(torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:8])
    hand = rf.evaluate(model.eval(), split, ["pgd20"], 2 / 255, 0.5 / 255, seed=0)
    assert eps["models"]["natural"]["2.0"] == hand["pgd20"] and eps["models"]["natural"]["clean"] == hand["clean"]
    run_cli(["analyze", "cka", *common, "--out", str(tmp_path / "cka")], capsys)
    cka = json.loads((tmp_path / "cka" / "results.json").read_text())
    names = ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["linear"]
    assert cka["models"]["natural"]["names"] == names
    assert all(0 <= v <= 1.0001 for v in cka["models"]["other"]["diagonal"].values())
    run_cli(["analyze", "minpert", *common, "--tol", "2", "--out", str(tmp_path / "mp")], capsys)
    mp = json.loads((tmp_path / "mp" / "results.json").read_text())
    values = mp["models"]["natural"]["values"]
    assert len(values) == 8 and all(v is None or 0 <= v <= 16 for v in values)
    for name, png in (("eps", "accuracy_vs_eps.png"), ("cka", "cka.png"), ("mp", "minimum_perturbation.png"),
                      ("mp", "minimum_perturbation_examples.png")):
        assert (tmp_path / name / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / name / "results.md").exists()


# --- compare: the paper's table and figures -------------------------------------------------------

def table_line(table, label):
    """The row of a `results.md` table for `label`; a collapsed run's label carries a marker."""
    pattern = rf"\| {re.escape(label)}( \*\*\(collapsed [^|]*\)\*\*)? \|"
    return next(line for line in table.splitlines() if re.match(pattern, line))


def test_compare_writes_table_json_and_plots_and_a_rerun_trains_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    (tmp_path / "c").mkdir()
    write_fake_cifar10c(tmp_path / "c", ["gaussian_noise", "fog", "contrast", "zoom_blur"], per=4)
    argv = ["compare", *FAST, "--attacks", "pgd20,cw", "--natural-epochs", "1", "--epochs", "1", "--methods", "cure",
            "--rift", "--rift-epochs", "1", "--mrc-size", "8", "--train-size", "32", "--batch-size", "16",
            "--val-size", "8", "--test-size", "8", "--attack-steps", "1", "--corruptions",
            "--cifar10c", str(tmp_path / "c"), "--out", str(out)]
    first = run_cli(argv, capsys)
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"natural", "cure", "cure+rift"}
    for name, metrics in results["rows"].items():      # --corruptions reaches every stage, RiFT's too
        test = metrics.get("test", metrics.get("after"))
        assert set(test["corruptions"]["groups_at_severity"]) == {"noise", "blur", "weather", "digital"}, name
    table = (out / "results.md").read_text()
    for name, metrics in results["rows"].items():
        test = metrics["test"]
        cells = [c.strip() for c in table_line(table, name).strip("|").split("|")]
        clean, cw, nrr_cell = float(cells[1]), float(cells[4]), float(cells[6])
        assert clean == pytest.approx(test["clean"], abs=0.006)
        assert nrr_cell == pytest.approx(2 * clean * cw / (clean + cw) if clean + cw else 0.0, abs=0.02)
    for png in ("clean_vs_robust.png", "robust_per_epoch.png", "cure_updated_fraction.png",
                "rift_interpolation.png", "grad_magnitudes.png", "corruptions.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    def no_training(*a, **k):
        raise AssertionError("a complete run directory must not be trained again")

    monkeypatch.setattr(rf, "train_epoch", no_training)
    monkeypatch.setattr(rf, "finetune_module", no_training)
    monkeypatch.setattr(run, "make_plots", lambda *args: [])      # drawn and checked above
    again = run_cli(argv, capsys)
    assert again["table"] == first["table"]


def test_compare_ablation_trains_the_six_cure_rows_from_one_natural_checkpoint(tmp_path, capsys):
    out = tmp_path / "abl"
    argv = ["compare", *FAST, "--natural-epochs", "1", "--epochs", "1", "--ablation", "--train-size", "32",
            "--test-size", "8", "--out", str(out)]
    run_cli(argv, capsys)
    results = json.loads((out / "results.json").read_text())
    stages = ["cure_neither", "cure_rgp", "cure_revision", "cure", "cure_beta1", "cure_official"]
    assert list(results["rows"]) == ["natural", *stages]
    config = {s: json.loads((out / s / "config.json").read_text()) for s in stages}
    expect = {"cure_neither": (0.0, 0.0, 5.0, "paper"), "cure_rgp": (None, 0.0, 5.0, "paper"),
              "cure_revision": (0.0, None, 5.0, "paper"), "cure": (None, None, 5.0, "paper"),
              "cure_beta1": (None, None, 1.0, "paper"), "cure_official": (None, None, 5.0, "official")}
    for stage, (p, gamma, beta, variant) in expect.items():
        c = config[stage]
        assert (c["percentile"], c["gamma"], c["beta"], c["cure_variant"]) == (p, gamma, beta, variant), stage
        assert c["init"] == str(out / "natural" / "checkpoint.pt") and c["weight_decay"] == 5e-3
    log = lambda s: run.read_log(out / s / "log.jsonl")
    assert set(log("cure_neither")[0]["updated_fraction"].values()) == {1.0}          # p 0: nothing masked
    assert len(log("cure_official")[0]["updated_fraction"]) == 8                       # the conv1 tensors
    table = (out / "results.md").read_text()
    for label, _ in run.ABLATION.values():
        assert table_line(table, label)
    assert "Table 7" in table and "| 86.76 | 54.90 | 52.48 | 49.69 | 63.19 |" in table
    assert (out / "cure_ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_plots_without_cw_use_the_worst_case(tmp_path):
    """`--attacks pgd10` gives rows with neither CW nor PGD-20: the figure plots the worst case."""
    rows = {"natural": {"test": {"n": 4, "clean": 75.0, "pgd10": 25.0, "worst": 25.0}},
            "at": {"test": {"n": 4, "clean": 50.0, "pgd10": 50.0, "worst": 50.0}},
            "none": {"test": {"n": 4, "clean": 50.0}}}                # clean only: left out of the figure
    assert run.table_row(rows["at"])["nrr_robust"] == 50.0 and run.table_row(rows["none"])["nrr_robust"] is None
    (tmp_path / "at").mkdir()
    (tmp_path / "at" / "log.jsonl").write_text(json.dumps({"epoch": 1, "val": {"pgd20": 40.0}}) + "\n")
    paths = run.make_plots(str(tmp_path), rows, ["at"])
    assert os.path.basename(paths[0]) == "clean_vs_robust.png" and (tmp_path / "clean_vs_robust.png").exists()


def test_collapse_is_marked_in_the_compare_table():
    row = dict(test=dict(n=100, clean=10.0, pgd20=10.0, cw=9.0), collapsed=dict(epoch=2, top_class_share=97.0))
    healthy = dict(test=dict(n=100, clean=80.0, pgd20=30.0, cw=28.0))
    table = run.results_table(dict(rows={"natural": healthy, "cure": row}, dataset="synthetic", model="resnet18",
                                   width=8, epochs=3, natural_epochs=3, preset="quick", device="cpu"))
    assert "| cure **(collapsed at epoch 2: 97% one class)** |" in table_line(table, "cure")
    assert "collapsed" not in table_line(table, "natural")


# --- Checkpoints and resume -----------------------------------------------------------------------

def test_checkpoint_for_another_architecture_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "wide.pt"
    torch.save({"model": rf.build_model("resnet18", 10, 8).state_dict()}, ckpt)
    err = cli_error(["eval", *FAST, "--init", str(ckpt)], capsys)   # FAST asks for width 4
    assert "wide.pt" in err and "--width" in err


def straight_and_killed_then_resumed(args, tmp_path, capsys, monkeypatch):
    """Run `args` into tmp/a; into tmp/b, "kill" the same run right after epoch 1's checkpoint and
    resume it. Returns (straight metrics, resumed metrics, the epochs checkpointed before the kill)."""
    straight = run_cli([*args, "--out", str(tmp_path / "a")], capsys)
    save = rf.save_checkpoint
    calls = []

    def save_then_die(path, **state):
        save(path, **state)
        calls.append(state["epoch"])
        raise KeyboardInterrupt

    monkeypatch.setattr(rf, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.main([*args, "--out", str(tmp_path / "b")])
    monkeypatch.setattr(rf, "save_checkpoint", save)
    capsys.readouterr()
    resumed = run_cli([*args, "--out", str(tmp_path / "b"), "--resume"], capsys)
    return straight, resumed, calls


def test_killed_and_resumed_cure_run_is_bit_identical(natural_ckpt, tmp_path, capsys, monkeypatch):
    args = ["cure", *FAST, "--epochs", "3", "--revision-rate", "0.6", "--init", natural_ckpt]
    straight, resumed, calls = straight_and_killed_then_resumed(args, tmp_path, capsys, monkeypatch)
    assert calls == [1]

    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == 3 and a["cure_step"] == 3 * 4
    assert a["revision_updates"] > 0                            # the revision model did move
    for key in ("model", "revision", "revision_updates", "revision_coin", "cure_step", "optimizer",
                "generator", "rng"):
        assert_same_contents(a[key], b[key], key)
    assert_same_contents(a, b)                                  # and everything else but timings
    log_a, log_b = run.read_log(tmp_path / "a" / "log.jsonl"), run.read_log(tmp_path / "b" / "log.jsonl")
    assert len(log_a) == 3 and all("updated_fraction" in e and "val_revision" in e for e in log_a)
    assert_same_contents(log_a, log_b)                          # updated fractions included
    for key in ("test", "test_revision", "best_epoch", "epochs"):
        assert resumed[key] == straight[key]


def test_resume_restores_each_rank_generator_or_reseeds_for_another_process_count(capsys):
    with torch.random.fork_rng():                               # leave the suite's generator as it was
        states = []
        for seed in (11, 12):
            torch.manual_seed(seed)
            states.append(rf.rng_state())
        ck = dict(rng=states[0], rng_per_rank=states, epoch=3)
        args = argparse.Namespace(world_size=2, rank=1, seed=5)
        run.restore_rng(args, ck)                                   # the same process count: rank 1's own state
        assert torch.equal(torch.get_rng_state(), states[1]["torch"])
        run.restore_rng(argparse.Namespace(world_size=1, rank=0, seed=5), ck)       # one process: "rng"
        assert torch.equal(torch.get_rng_state(), states[0]["torch"])
        capsys.readouterr()
        run.restore_rng(argparse.Namespace(world_size=4, rank=2, seed=5), ck)       # another count: reseeded
        assert torch.initial_seed() == run.rank_seed(5 + 3, 2)
        assert "written by 2 process(es), this run has 4" in capsys.readouterr().err


# --- Data parallel (torchrun) ---------------------------------------------------------------------

def test_data_parallel_bad_input_is_one_line_before_any_process_group(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")                      # as torchrun sets it, for rank 0
    monkeypatch.setenv("RANK", "0")
    out = ["--out", str(tmp_path / "x")]
    assert "--batch-size 33 is the global batch and must be divisible by the 2 processes" in \
        cli_error(["at", *FAST, "--batch-size", "33", *out], capsys)
    assert "--sync-bn needs CUDA" in cli_error(["at", *FAST, "--sync-bn", *out], capsys)
    assert "bench times one process" in cli_error(["bench", "mask", *out], capsys)
    assert not dist.is_initialized() and not (tmp_path / "x").exists()
    monkeypatch.setenv("RANK", "1")                            # the other ranks exit 2 without a word
    with pytest.raises(SystemExit) as e:
        run.main(["at", *FAST, "--batch-size", "33", *out])
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_torchrun_process_group_frees_its_threads(ddp_ranks):
    """After run.setup_distributed, optimiser steps (the first imports torch._dynamo) and
    destroy_process_group, no gloo thread is left: such threads, alive at interpreter exit, aborted
    ranks now and then."""
    ranks, _ = ddp_ranks
    counts = [(r["threads_before"], r["threads_after"]) for r in ranks]
    assert all(before == after for before, after in counts), counts     # (3 more without the fix)


# One gloo rank: rank 0 leaves the group while its last all-reduce still waits for rank 1 (one
# second late), and Python has already let go of the all-reduce's tensor; it prints its thread
# counts before joining the group and after leaving it.
LEAVE_WHILE_BUSY = """
import os, sys, time, torch, torch.distributed as dist
import run
rank, port = int(sys.argv[1]), sys.argv[2]
count = lambda: len(os.listdir("/proc/self/task"))
torch.ones(4).sum()
before = count()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2)
if rank == 1:
    time.sleep(1.0)
tensor = torch.ones(1000)
dist.all_reduce(tensor, async_op=True)
del tensor
run.leave_process_group()
print(before, count())
"""


def test_torchrun_leaving_waits_for_a_busy_gloo_thread_without_deadlock():
    """A gloo thread that finishes a collective after Python dropped its tensor needs the GIL to free
    it. leave_process_group joins the group's threads with the GIL released, so rank 0 leaves once
    the late all-reduce is done, and no gloo thread is left. Before torch 2.8, plain
    destroy_process_group() joins them holding the GIL, and rank 0 hangs here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    here = os.path.dirname(os.path.abspath(__file__))
    ranks = [subprocess.Popen([sys.executable, "-c", LEAVE_WHILE_BUSY, str(rank), port], cwd=here,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=60) for proc in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail("a rank did not leave the process group within 60 s: deadlocked in destroy_process_group")
    finally:
        for proc in ranks:
            proc.kill()
    for proc, (stdout, stderr) in zip(ranks, outputs):
        assert proc.returncode == 0, stderr[-2000:]
        before, after = map(int, stdout.split())
        assert after == before, (before, after)                     # the gloo threads are gone


def test_torchrun_ranks_leave_together_after_rank0_has_written(tmp_path, monkeypatch):
    """At the normal end every rank waits at a barrier, reached by rank 0 only after metrics.json is
    written, and only then leaves the process group: no rank tears down while a peer still works."""
    calls = []
    monkeypatch.setattr(run.dist, "is_initialized", lambda: True)     # as under torchrun, one process
    monkeypatch.setattr(run.dist, "barrier", lambda: calls.append(("barrier", (tmp_path / "metrics.json").exists())))
    monkeypatch.setattr(run, "leave_process_group", lambda: calls.append(("destroy", None)))
    run.main(["natural", *FAST, "--epochs", "1", "--out", str(tmp_path)])
    assert calls == [("barrier", True), ("destroy", None)]


def torchrun(argv, **popen):
    """`torchrun --standalone --nproc_per_node=2 run.py ARGV` (as `python -m torch.distributed.run`)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONFAULTHANDLER="1"), **popen)   # a crash shows where


def torchrun_metrics(argv):
    """Run to the end; check one JSON line on stdout (rank 0's) and return it."""
    proc = torchrun(argv)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and stdout.strip().splitlines()[-1] == lines[0], stdout
    return json.loads(lines[0])


def test_torchrun_cure_end_to_end_killed_and_resumed(natural_ckpt, tmp_path):
    """torchrun with 2 gloo processes writes one metrics.json and prints one JSON line;
    killed (SIGTERM to torchrun, which ends its workers) after a CURE checkpoint and rerun with
    --resume, it ends with the same metrics as the uninterrupted 2-process run."""
    cli = ["cure", *FAST, "--epochs", "3", "--train-size", "32", "--val-size", "4", "--test-size", "8",
           "--init", natural_ckpt]                                # global batch 16: 8 per rank, 2 steps an epoch
    straight = torchrun_metrics([*cli, "--out", str(tmp_path / "a")])
    assert (straight["world_size"], straight["backend"]) == (2, "gloo")
    assert json.load(open(tmp_path / "a" / "metrics.json")) == straight
    config = json.load(open(tmp_path / "a" / "config.json"))
    assert (config["world_size"], config["backend"], config["sync_bn"]) == (2, "gloo", False)
    assert [e["epoch"] for e in run.read_log(tmp_path / "a" / "log.jsonl")] == [1, 2, 3]   # rank 0 alone logs
    rng = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["rng_per_rank"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])   # each rank its own noise

    proc = torchrun([*cli, "--out", str(tmp_path / "b")])
    ckpt = tmp_path / "b" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)       # as a scheduler's preemption: torchrun ends every worker
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "b" / "metrics.json").exists()      # killed before the end ...
    assert torch.load(ckpt, weights_only=False)["epoch"] < 3    # ... with a checkpoint to resume from
    resumed = torchrun_metrics([*cli, "--out", str(tmp_path / "b"), "--resume"])
    for key in ("test", "test_best", "test_revision", "best_epoch", "epochs"):
        assert resumed.get(key) == straight.get(key), key


# --- AutoAttack -----------------------------------------------------------------------------------

def test_eval_with_autoattack_end_to_end_on_the_installed_package(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save({"model": rf.build_model("resnet18", 10, 4, (0.5,) * 3, (0.25,) * 3).state_dict()}, ckpt)
    out = tmp_path / "eval"
    # eps 64/255: APGD-CE fools this untrained model at once, so Square's 5,000 queries never run
    metrics = run_cli(["eval", *FAST, "--test-size", "64", "--init", str(ckpt), "--autoattack",
                       "--aa-size", "16", "--eps", "64", "--out", str(out)], capsys)
    test = metrics["test"]
    assert test["n_autoattack"] == 16 and test["autoattack"] == 100 * test["counts"]["autoattack"] / 16
    assert test["nrr_autoattack"] == rf.nrr(test["clean_autoattack"], test["autoattack"])
    state = json.loads((out / "autoattack_test.json").read_text())
    assert state["done"] == list(rf.AUTOATTACK_STANDARD) and state["n"] == 16


# --- Corruptions ----------------------------------------------------------------------------------

def test_eval_reports_corruptions_per_type_and_group_at_the_chosen_severity(tmp_path, capsys):
    write_fake_cifar10c(tmp_path, ["fog", "snow", "contrast", "saturate"], per=3)
    torch.manual_seed(0)
    torch.save(rf.build_model("resnet18", 10, 2).state_dict(), tmp_path / "model.pt")
    metrics = run_cli(["eval", "synthetic", "--device", "cpu", "--width", "2", "--init", str(tmp_path / "model.pt"),
                       "--test-size", "8", "--attacks", "", "--no-autoattack", "--corruptions",
                       "--cifar10c", str(tmp_path), "--severity", "2", "--out", str(tmp_path / "eval")], capsys)
    c = metrics["test"]["corruptions"]
    assert c["severity"] == 2 and c["n"] == 15 and c["source"] == str(tmp_path)
    assert list(c["per_type_at_severity"]) == ["snow", "fog", "contrast", "saturate"]
    for name, at in c["per_type_at_severity"].items():
        assert at == c["by_severity"][name]["2"]
        assert c["per_type"][name] == pytest.approx(sum(c["by_severity"][name].values()) / 5)
    assert c["groups_at_severity"] == pytest.approx(
        {"weather": (c["per_type_at_severity"]["snow"] + c["per_type_at_severity"]["fog"]) / 2,
         "digital": c["per_type_at_severity"]["contrast"]})
    assert metrics["test"]["corruption"] == pytest.approx(sum(c["per_type"].values()) / 4)


# --- The RobustBench zoo --------------------------------------------------------------------------

def test_cli_eval_on_a_zoo_checkpoint(wong, tmp_path, offline, capsys):
    model_dir, saved = wong
    out = tmp_path / "eval"
    m = run_cli(["eval", *FAST, "--test-size", "4", "--init", "robustbench:Wong2020Fast", "--model-dir",
                 str(model_dir), "--out", str(out)], capsys)
    assert offline == []
    assert m["model"] == m["checkpoint"] == "robustbench:Wong2020Fast" and m["width"] is None
    assert m["weights"] == str(model_dir / "cifar10" / "Linf" / "Wong2020Fast.pt")
    x, y = fast_test_split(4)
    assert m["test"]["n"] == 4 and m["test"]["clean"] == pytest.approx(
        zoo_clean_accuracy("Wong2020Fast", saved, x, y), abs=1e-9)
    assert m["test"]["pgd10"] <= m["test"]["clean"]


def test_cli_rift_module_on_a_zoo_checkpoint_saves_a_state_dict_robustbench_and_eval_read(
        wong, tmp_path, offline, capsys, monkeypatch):
    model_dir, saved = wong
    module, out = "layer4.1.conv2", tmp_path / "rift"
    monkeypatch.setattr(rf, "select_alpha", lambda table, tolerance: 0.5)   # the tuned module shows up
    # the weights' round trip is under test, not the attacks, which at full width take most of the time
    monkeypatch.setattr(rf, "pgd", no_attack)
    m = run_cli(["rift", *FAST, "--train-size", "8", "--batch-size", "8", "--test-size", "4", "--rift-epochs", "1",
                 "--val-size", "1", "--init", "robustbench:Wong2020Fast", "--model-dir", str(model_dir),
                 "--module", module, "--lr", "0.05", "--out", str(out)], capsys)
    assert offline == [] and m["module"] == module and m["alpha"] == 0.5
    assert m["state_dict"] == str(out / "model.pt") and len(m["alphas"]) == 11
    tuned = torch.load(out / "model.pt", weights_only=True)             # a plain state dict of tensors
    assert tuned.keys() == saved.keys()
    for k, v in saved.items():                                          # only the fine-tuned module moved
        assert torch.equal(tuned[k], v) != k.startswith(module + "."), k
    assert torch.equal(torch.load(out / "checkpoint.pt", weights_only=False)["model"][f"{module}.weight"],
                      tuned[f"{module}.weight"])
    x, y = fast_test_split(4)
    assert m["after"]["clean"] == pytest.approx(zoo_clean_accuracy("Wong2020Fast", tuned, x, y), abs=1e-9)
    # RobustBench reads it as NAME.pt in its layout; --init-weights reads it into the zoo architecture
    other = tmp_path / "models2"
    (other / "cifar10" / "Linf").mkdir(parents=True)
    shutil.copy(out / "model.pt", other / "cifar10" / "Linf" / "Wong2020Fast.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = rf.import_robustbench().utils.load_model("Wong2020Fast", str(other), "cifar10", "Linf")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tuned.items())
    e = run_cli(["eval", *FAST, "--test-size", "4", "--init", "robustbench:Wong2020Fast",
                 "--init-weights", str(out / "model.pt"), "--model-dir", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "eval")], capsys)
    assert e["weights"] == str(out / "model.pt") and e["test"]["clean"] == m["after"]["clean"]
    assert offline == [] and not (tmp_path / "empty").exists()          # the zoo's checkpoint was not needed


def test_cli_rift_mrc_only_ranks_every_conv_and_linear_of_a_zoo_like_model(tiny_zoo, tmp_path, capsys):
    model_dir, _ = tiny_zoo
    out = tmp_path / "mrc"
    m = run_cli(["rift", *FAST, "--mrc-size", "8", "--init", f"robustbench:{TINY}", "--model-dir", str(model_dir),
                 "--mrc-only", "--out", str(out)], capsys)
    expected = {"conv1", "block1.layer.0.conv1", "block1.layer.0.conv2", "block2.layer.0.conv1",
                "block2.layer.0.conv2", "block2.layer.0.convShortcut", "block3.layer.0.conv1",
                "block3.layer.0.conv2", "block3.layer.0.convShortcut", "fc"}
    assert set(m["mrc"]) == expected and list(m["mrc"].values()) == sorted(m["mrc"].values())
    assert m["module"] == next(iter(m["mrc"])) and m["mrc_examples"] == 8
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()


def test_cli_full_rift_on_a_zoo_like_model(tiny_zoo, tmp_path, offline, capsys):
    model_dir, saved = tiny_zoo
    out = tmp_path / "rift"
    m = run_cli(["rift", *FAST, "--train-size", "8", "--batch-size", "8", "--test-size", "4", "--rift-epochs", "1",
                 "--val-size", "16", "--mrc-size", "8", "--init", f"robustbench:{TINY}", "--model-dir",
                 str(model_dir), "--out", str(out)], capsys)
    assert offline == [] and m["module"] == min(m["mrc"], key=m["mrc"].get)
    assert [r["alpha"] for r in m["alphas"]] == [i / 10 for i in range(11)]
    assert m["alpha"] == rf.select_alpha(m["alphas"], 0.1)
    tuned = torch.load(out / "model.pt", weights_only=True)
    for k, v in saved.items():                        # nothing outside the chosen module moved
        if not k.startswith(m["module"] + "."):
            assert torch.equal(tuned[k], v), k
    x, y = fast_test_split(4)
    assert m["before"]["clean"] == pytest.approx(zoo_clean_accuracy(TINY, saved, x, y), abs=1e-9)
    assert m["after"]["clean"] == pytest.approx(zoo_clean_accuracy(TINY, tuned, x, y), abs=1e-9)


def test_zoo_without_robustbench_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)              # as if not installed
    line = cli_error(["eval", *FAST, "--init", "robustbench:Wong2020Fast", "--out", str(tmp_path)], capsys)
    assert "pip install -r requirements-zoo.txt" in line


def test_zoo_option_errors_need_no_robustbench(tmp_path, capsys):
    base = [*FAST[1:], "--out", str(tmp_path)]
    assert "--init-weights needs --init robustbench:NAME" in cli_error(
        ["eval", "synthetic", *base, "--init", "m.pt", "--init-weights", "w.pt"], capsys)
    assert "works with eval, rift and analyze, not 'at'" in cli_error(
        ["at", "synthetic", *base, "--init", "robustbench:Wong2020Fast"], capsys)
    assert "not 'svhn'" in cli_error(["eval", "svhn", *base, "--init", "robustbench:Wong2020Fast"], capsys)


def test_zoo_errors_are_one_line_naming_the_bad_value(wong, tmp_path, offline, capsys):
    model_dir, _ = wong
    base = [*FAST, "--out", str(tmp_path / "out"), "--model-dir", str(model_dir)]
    line = cli_error(["eval", *base, "--init", "robustbench:Wong2021Fast"], capsys)      # a typo
    assert "unknown RobustBench model 'Wong2021Fast' (cifar10, Linf)" in line and "'Wong2020Fast'" in line
    line = cli_error(["eval", *base, "--init", "robustbench:Addepalli2022Efficient_RN18"], capsys)   # no file
    path = str(model_dir / "cifar10" / "Linf" / "Addepalli2022Efficient_RN18.pt")
    assert offline == [path] and f"{path} does not exist" in line and "put the checkpoint file there" in line
    c100 = next(n for n in zoo_registry(rf.import_robustbench(), "cifar100") if n not in zoo_registry(
        rf.import_robustbench()))                                      # a CIFAR-100-only entry
    line = cli_error(["eval", *base, "--init", f"robustbench:{c100}"], capsys)
    assert "has 100 (cifar100) classes, the synthetic data has 10" in line
    wrong = tmp_path / "resnet18.pt"
    torch.save(rf.build_model("resnet18", 10, 4).state_dict(), wrong)
    line = cli_error(["eval", *base, "--init", "robustbench:Wong2020Fast", "--init-weights", str(wrong)], capsys)
    assert str(wrong) in line and "it must be a state dict of robustbench:Wong2020Fast" in line
    assert "no such checkpoint file" in cli_error(
        ["eval", *base, "--init", "robustbench:Wong2020Fast", "--init-weights", str(tmp_path / "none.pt")], capsys)


# --- bench, and the GPU path checked on the CPU ---------------------------------------------------

def test_bench_step_reports_trades_cure_and_the_official_structure(tmp_path, capsys):
    out = run_cli(["bench", "step", "--device", "cpu", "--width", "4", "--batch-size", "8", "--reps", "1",
                   "--attack-steps", "1", "--out", str(tmp_path)], capsys)
    assert {"trades_ms", "cure_ms", "cure_official_ms", "ratio", "device", "model", "batch"} <= set(out)
    assert out["ratio"] == pytest.approx(out["cure_ms"] / out["trades_ms"])
    assert out["batch"] == 8 and out["width"] == 4


def test_bench_report_fills_every_section_on_the_cpu(tmp_path, capsys):
    report = run_cli(["bench", "report", "--device", "cpu", "--width", "2", "--batch-size", "4", "--reps", "1",
                      "--attack-steps", "1", "--out", str(tmp_path)], capsys)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    for name in ("resnet18", "resnet50", "wrn34_10"):
        mask = report["mask"][name]
        assert mask["bit_exact"] is True and mask["fused_ran"] is KERNELS_INTERPRETED
        assert mask["plain_ms"] > 0 and mask["numpy_ms"] > 0
    for name in ("resnet18", "wrn34_10"):
        assert set(report["images_per_s"][name]) == {"natural", "at", "trades", "cure"}
    for amp in ("none", "bf16"):
        step = report["step"][amp]
        assert step["ratio"] == step["ms"]["cure"] / step["ms"]["trades"]
        assert {"attack", "revision forwards", "forwards, 3 backward passes", "mask",
                "optimiser, revision update"} == set(step["phases_ms"]["cure"])
        assert {"attack", "forwards", "backward, optimiser"} == set(step["phases_ms"]["trades"])
    ips = report["images_per_s"]["resnet18"]
    images = 200 * (49_000 - 49_000 % 128)
    assert report["projection_hours"]["python run.py cure cifar10 --model resnet18"] == pytest.approx(
        (images / ips["natural"] + images / ips["cure"]) / 3600)


@needs_kernels
def test_bench_gpus_fused_vs_plain_run_finds_identical_states_and_a_broken_mask(tmp_path):
    """bench gpu's training check, on the CPU: the fused kernels interpreted against the plain mask."""
    args = run.resolve(run.parse_args(["bench", "report", "--device", "cpu", "--attack-steps", "1"]))

    def one_more_zero(grads, grads_nat, grads_score, alpha, percentile):   # a broken mask
        rf.rgp_mask_(grads, grads_nat, grads_score, alpha, percentile)
        grads[3].view(-1)[grads[3].view(-1).nonzero()[0]] = 0

    before = kernels.LAUNCHES
    r = run.fused_vs_plain_training(args, {"fused": kernels.fused_rgp_mask_, "plain": rf.rgp_mask_},
                                    steps=2, width=2, batch=8)
    assert kernels.LAUNCHES - before == 6 * 2
    assert r["identical"] and r["differing"] == [] and r["plain"]["step_ms"] > 0
    assert not torch.are_deterministic_algorithms_enabled()            # restored
    r = run.fused_vs_plain_training(args, {"plain": rf.rgp_mask_, "broken": one_more_zero},
                                    steps=2, width=2, batch=8)
    name = [n for n, _ in rf.masked_parameters(rf.build_model("resnet18", 10, 2))][3]
    assert not r["identical"] and name in r["differing"]


def test_amp_bf16_runs_the_forwards_in_bf16_and_keeps_parameters_and_gradients_float32():
    model, (x, y) = tiny_model(), tiny_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}

    def step(m, o, xb, yb):
        logits = m(xb)
        seen["logits"] = logits.dtype
        loss = F.cross_entropy(logits, yb)
        o.zero_grad()
        loss.backward()
        seen["grads"] = {p.grad.dtype for p in m.parameters()}
        o.step()
        return loss.detach()

    run.with_amp(step, "bf16", "cpu")(model, opt, x, y)
    assert seen["logits"] == torch.bfloat16
    assert seen["grads"] == {torch.float32} and {p.dtype for p in model.parameters()} == {torch.float32}
    run.with_amp(step, "none", "cpu")(model, opt, x, y)
    assert seen["logits"] == torch.float32
    # TRADES' attack starts with a no_grad forward: every parameter must still get its gradient
    before = [p.detach().clone() for p in model.parameters()]
    run.with_amp(lambda m, o, xb, yb: rf.trades_step(m, o, xb, yb, EPS, 2 / 255, 1), "bf16", "cpu")(model, opt, x, y)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(p0, p) for p0, p in zip(before, model.parameters()))


def test_cure_run_records_its_mask_path_and_device_settings(tmp_path, capsys):
    metrics = run_cli(["cure", *FAST, "--epochs", "1", "--natural-epochs", "1", "--train-size", "32",
                       "--channels-last", "--out", str(tmp_path)], capsys)
    assert metrics["mask_path"] == "plain"                  # on a CPU the plain path runs
    assert metrics["device_settings"] == dict(cudnn_benchmark=False, tf32=False, channels_last=True, amp="none",
                                              onednn=False)     # see run.setup_device
    assert not torch.backends.mkldnn.enabled
    run.setup_device(run.resolve(run.parse_args(["natural", "synthetic", "--device", "cpu"])))
    assert torch.backends.mkldnn.enabled                    # back on for the next run
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["device_settings"] == metrics["device_settings"]
