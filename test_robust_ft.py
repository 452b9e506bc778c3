"""Tests for robust_ft, kernels and run.py.

Every loss and mask is checked against an independent, hand-written computation of its equation;
invariants (eps-ball, [0, 1], mode restored, state unchanged) are asserted directly. Small
generated data only: nothing here needs a download or ../shared. Run with

    TRITON_INTERPRET=1 python -m pytest -q test_robust_ft.py
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import robust_ft as rf
import run

EPS = 8 / 255


def tiny_model(num_classes=10, width=4, seed=0):
    torch.manual_seed(seed)
    return rf.build_model("resnet18", num_classes, width)


def tiny_batch(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(10, (n,), generator=g)


# -----------------------------------------------------------------------------
# Models
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, count", [("resnet18", 11_173_962), ("preact_resnet18", 11_172_170),
                                         ("wrn34_10", 46_160_474)])
def test_parameter_counts_match_the_papers_models(name, count):
    with torch.device("meta"):
        model = rf.build_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name, modules", [
    ("resnet18", ["conv1", "layer1.0.conv1", "layer1.1.bn2", "layer2.1.conv2", "layer3.0.shortcut",
                  "layer4.1.conv2", "linear"]),
    ("preact_resnet18", ["conv1", "layer2.1.conv2", "layer4.0.shortcut", "bn", "linear"]),
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


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match="resnet50.*preact_resnet18.*resnet18.*wrn34_10"):
        rf.build_model("resnet50")


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------

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


def test_validation_split_is_disjoint_and_seeded():
    data = rf.synthetic_data(num_train=50, num_test=10, size=8)
    data.train.x[:, 0, 0, 0] = torch.arange(50, dtype=torch.uint8)  # tag every image
    train, val = rf.split_validation(data.train, 10, seed=1)
    tags_t, tags_v = set(train.x[:, 0, 0, 0].tolist()), set(val.x[:, 0, 0, 0].tolist())
    assert len(tags_v) == 10 and not tags_t & tags_v and len(tags_t | tags_v) == 50
    assert torch.equal(rf.split_validation(data.train, 10, seed=1)[1].x, val.x)


def test_folder_dataset_holds_out_the_last_images_of_each_class(tmp_path):
    from PIL import Image
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "train" / c)
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), 10 * i + (c == "dog"), np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    data = rf.load_data("folder", str(tmp_path), holdout_per_class=2)
    assert data.num_classes == 2 and len(data.train) == 6 and len(data.test) == 4
    assert sorted(data.test.x[:, 0, 0, 0].tolist()) == [30, 31, 40, 41]
    assert data.test.y.tolist() == [0, 0, 1, 1]


def test_missing_download_says_how_to_point_data_dir(tmp_path):
    with pytest.raises(RuntimeError, match="--data-dir"):
        rf.torchvision_data("cifar10", str(tmp_path), download=False)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match="imagenet.*cifar10.*synthetic"):
        rf.load_data("imagenet")


# -----------------------------------------------------------------------------
# Attacks
# -----------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def natural_model():
    """A narrow ResNet-18 trained naturally for four epochs on synthetic images, and its data."""
    return train_on_synthetic(rf.natural_step), rf.synthetic_data(num_train=1000, num_test=200, seed=1)


def train_on_synthetic(step, epochs=4):
    data = rf.synthetic_data(num_train=1000, num_test=200, seed=1)
    torch.manual_seed(0)
    model = rf.build_model("resnet18", 10, 8)
    opt = rf.make_optimizer(model, 0.1, 5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        rf.train_epoch(model, opt, step, data.train, 64, 0.1, g)
    return model.eval()


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


# -----------------------------------------------------------------------------
# Losses
# -----------------------------------------------------------------------------

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


def test_step_lr_follows_the_papers_milestones():
    assert [rf.step_lr(0.1, e, 200) for e in (0, 99, 100, 149, 150, 199)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_nrr_is_the_harmonic_mean():
    assert rf.nrr(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120)
    assert rf.nrr(0.0, 0.0) == 0.0


def test_evaluate_robust_is_the_per_example_worst_case():
    model = tiny_model().eval()
    data = rf.synthetic_data(num_train=10, num_test=40, size=16)
    out = rf.evaluate(model, data.test, ["pgd10", "cw"], EPS, batch_size=16)
    assert out["n"] == 40
    assert out["robust"] <= min(out["pgd10"], out["cw"]) <= out["clean"] + 1e-9


def test_adversarial_training_beats_natural_training_under_pgd(natural_model):
    natural, data = natural_model
    at = train_on_synthetic(lambda m, o, x, y: rf.at_step(m, o, x, y, EPS, 2 / 255, 3))
    nat_acc = rf.evaluate(natural, data.test, ["pgd10"], EPS)
    at_acc = rf.evaluate(at, data.test, ["pgd10"], EPS)
    assert nat_acc["clean"] > 50 and at_acc["clean"] > 50          # both learned the task
    assert at_acc["pgd10"] > nat_acc["pgd10"] + 5, (nat_acc, at_acc)


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

SMALL = ["synthetic", "--preset", "quick", "--device", "cpu", "--epochs", "2", "--train-size", "256",
         "--test-size", "64", "--val-size", "64", "--attack-steps", "2", "--width", "4"]


def run_cli(argv, capsys):
    metrics = run.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(metrics))
    return metrics


@pytest.mark.parametrize("method", ["natural", "trades"])
def test_cli_trains_end_to_end_and_writes_metrics(method, tmp_path, capsys):
    out = tmp_path / method
    metrics = run_cli([method, *SMALL, "--out", str(out)], capsys)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["method"] == method and on_disk["test"]["n"] == 64
    assert {"clean", "pgd20", "cw", "robust", "nrr"} <= set(on_disk["test"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert (out / "checkpoint.pt").exists()


def test_killed_and_resumed_run_ends_with_the_same_metrics(tmp_path, capsys, monkeypatch):
    args = ["at", *SMALL, "--epochs", "3"]
    straight = run_cli([*args, "--out", str(tmp_path / "a")], capsys)

    save = rf.save_checkpoint
    calls = []

    def save_then_die(path, **state):        # the process is "killed" right after epoch 1's checkpoint
        save(path, **state)
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(rf, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.main([*args, "--out", str(tmp_path / "b")])
    monkeypatch.setattr(rf, "save_checkpoint", save)
    capsys.readouterr()
    resumed = run_cli([*args, "--out", str(tmp_path / "b"), "--resume"], capsys)
    assert len(calls) == 1
    for key in ("test", "best_epoch", "epochs"):
        assert resumed[key] == straight[key]


def run_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize("argv, words", [
    (["train", "synthetic"], ["'train'", "natural", "cure"]),
    (["at", "mnist"], ["'mnist'", "cifar10", "synthetic"]),
    (["at", "synthetic", "--model", "vgg16"], ["'vgg16'", "resnet18", "wrn34_10"]),
    (["at", "synthetic", "--eps", "-1"], ["-1", ">= 0"]),
    (["at", "synthetic", "--preset", "fast"], ["'fast'", "paper", "quick"]),
    (["at", "synthetic", "--attacks", "pgd7"], ["'pgd7'", "pgd20"]),
    (["bench", "everything"], ["'everything'", "step", "mask"]),
])
def test_bad_input_gives_a_one_line_error_and_exit_2(argv, words, capsys):
    err = run_error(argv, capsys)
    for w in words:
        assert w in err


def test_checkpoint_for_another_architecture_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "wide.pt"
    torch.save({"model": rf.build_model("resnet18", 10, 8).state_dict()}, ckpt)
    err = run_error(["eval", *SMALL, "--init", str(ckpt)], capsys)   # SMALL asks for width 4
    assert "wide.pt" in err and "--width" in err


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


# -----------------------------------------------------------------------------
# CURE: the RGP update mask against a hand-written NumPy version of the rule
# -----------------------------------------------------------------------------

def numpy_rgp_mask(g, g_nat, g_adv, alpha, p):
    """The spec's rule written out in NumPy: float32 score, rank k, strict <, NaN above all."""
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


# -----------------------------------------------------------------------------
# CURE: losses, gradients, revision
# -----------------------------------------------------------------------------

def test_consistency_loss_is_the_kl_by_hand():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    z_rev = torch.tensor([[0.2, 0.1, 0.9], [1.0, 1.0, 1.0]], dtype=torch.float64)
    p, q = F.softmax(z, 1).tolist(), F.softmax(z_rev, 1).tolist()
    expect = sum(sum(qj * math.log(qj / pj) for pj, qj in zip(p[i], q[i])) for i in range(2)) / 2
    assert rf.consistency_loss(z, z_rev).item() == pytest.approx(expect, rel=1e-12)   # KL(p_rev || p)
    assert rf.consistency_loss(z, z).item() == pytest.approx(0.0, abs=1e-15)


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
    rf.cure_step(model, opt, x.double(), y, rf.Revision(model), cfg, decay=0.9, rate=0.0, step=0,
                 generator=torch.Generator().manual_seed(0), steps=2, mask_fn=spy_mask)
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
    revision.maybe_update_(model, decay=0.99, rate=1.0, step=9, generator=g)     # rate 1: always
    d = min(0.99, 1 - 1 / 10)                                                    # warm-up: 0.9
    for k, v in revision.model.state_dict().items():
        cur = model.state_dict()[k]
        if v.is_floating_point():
            assert torch.allclose(v, d * start[k] + (1 - d) * cur, rtol=1e-6, atol=1e-7), k
        else:
            assert torch.equal(v, cur)
    frozen = {k: v.clone() for k, v in revision.model.state_dict().items()}
    revision.maybe_update_(model, decay=0.99, rate=0.0, step=10, generator=g)    # rate 0: never
    assert all(torch.equal(v, frozen[k]) for k, v in revision.model.state_dict().items())


def test_revision_schedule_and_decay_scaling():
    assert rf.revision_rate(0.2, 0.0) == pytest.approx(0.2)
    assert rf.revision_rate(0.2, 1.0) == pytest.approx(0.02)
    assert rf.revision_decay(0.999, 0.2, rf.PAPER_STEPS) == pytest.approx(0.999)
    assert rf.revision_decay(0.999, 0.2, 10 * rf.PAPER_STEPS) == 0.999     # never above d
    short = rf.revision_decay(0.999, 0.2, 5 * 79)                          # 5 epochs of 10k images
    horizon = 1000 * (0.55 * 0.2 * 5 * 79) / (0.55 * 0.2 * rf.PAPER_STEPS)
    assert short == pytest.approx(1 - 1 / horizon)


def test_table9_defaults():
    assert rf.cure_defaults("wrn34_10", "cifar10") == rf.CureConfig(percentile=50, alpha=0.3, gamma=0.5)
    assert rf.cure_defaults("resnet18", "svhn").alpha == 0.2
    assert rf.cure_defaults("preact_resnet18", "cifar10").percentile == 20


def test_cure_beats_natural_training_under_pgd(natural_model):
    natural, data = natural_model
    model = __import__("copy").deepcopy(natural).train()
    revision = rf.Revision(model)
    cfg = rf.CureConfig()
    opt = rf.make_optimizer(model, 0.05, 5e-4)
    g, gr = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    total = 2 * (len(data.train) // 64)
    decay = rf.revision_decay(cfg.decay, cfg.rate, total)
    state = {"step": 0}

    def step(m, o, x, y):
        loss = rf.cure_step(m, o, x, y, revision, cfg, decay, rf.revision_rate(cfg.rate, state["step"] / total),
                            state["step"], gr, EPS, 2 / 255, 3)
        state["step"] += 1
        return loss

    for _ in range(2):
        rf.train_epoch(model, opt, step, data.train, 64, 0.05, g)
    nat = rf.evaluate(natural, data.test, ["pgd10"], EPS)
    cure = rf.evaluate(model, data.test, ["pgd10"], EPS)
    assert revision.updates > 0
    assert cure["clean"] > 40
    assert cure["pgd10"] > nat["pgd10"] + 5, (nat, cure)
