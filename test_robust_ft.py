"""Tests for robust_ft, kernels and run.py.

Every loss and mask is checked against an independent, hand-written computation of its equation;
invariants (eps-ball, [0, 1], mode restored, state unchanged) are asserted directly. Small
generated data only: nothing here needs a download or ../shared. Run with

    TRITON_INTERPRET=1 python -m pytest -q test_robust_ft.py
"""
import colorsys
import io
import json
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # kernels.py's tests run the Triton interpreter on the CPU

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
    """A narrow ResNet-18 trained naturally for three epochs on synthetic images, and its data."""
    return train_on_synthetic(rf.natural_step), rf.synthetic_data(num_train=1000, num_test=200, seed=1)


def train_on_synthetic(step, epochs=3):
    data = rf.synthetic_data(num_train=1000, num_test=200, seed=1)
    torch.manual_seed(0)
    model = rf.build_model("resnet18", 10, 8)
    opt = rf.make_optimizer(model, 0.05, 5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        rf.train_epoch(model, opt, step, data.train, 32, 0.05, g)
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


def test_bench_step_reports_trades_cure_and_the_official_structure(tmp_path, capsys):
    out = run_cli(["bench", "step", "--device", "cpu", "--width", "4", "--batch-size", "8", "--reps", "1",
                   "--attack-steps", "1", "--out", str(tmp_path)], capsys)
    assert {"trades_ms", "cure_ms", "cure_official_ms", "ratio", "device", "model", "batch"} <= set(out)
    assert out["ratio"] == pytest.approx(out["cure_ms"] / out["trades_ms"])
    assert out["batch"] == 8 and out["width"] == 4


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
    total = 2 * (len(data.train) // 32)
    decay = rf.revision_decay(cfg.decay, cfg.rate, total)
    state = {"step": 0}

    def step(m, o, x, y):
        loss = rf.cure_step(m, o, x, y, revision, cfg, decay, rf.revision_rate(cfg.rate, state["step"] / total),
                            state["step"], gr, EPS, 2 / 255, 3)
        state["step"] += 1
        return loss

    for _ in range(2):
        rf.train_epoch(model, opt, step, data.train, 32, 0.05, g)
    nat = rf.evaluate(natural, data.test, ["pgd10"], EPS)
    cure = rf.evaluate(model, data.test, ["pgd10"], EPS)
    assert revision.updates > 0
    assert cure["clean"] > 40
    assert cure["pgd10"] > nat["pgd10"] + 5, (nat, cure)


# -----------------------------------------------------------------------------
# compare: the paper's table and figures
# -----------------------------------------------------------------------------

def test_compare_writes_table_json_and_plots_and_a_rerun_trains_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    argv = ["compare", *SMALL, "--natural-epochs", "1", "--epochs", "1", "--rift", "--rift-epochs", "1",
            "--mrc-size", "16", "--train-size", "128", "--val-size", "32", "--test-size", "32", "--out", str(out)]
    first = run_cli(argv, capsys)
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"natural", "at", "trades", "cure", "at+rift", "trades+rift", "cure+rift"}
    table = (out / "results.md").read_text()
    for name, metrics in results["rows"].items():
        test = metrics["test"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        clean, cw, nrr_cell = float(cells[1]), float(cells[4]), float(cells[6])
        assert clean == pytest.approx(test["clean"], abs=0.006)
        assert nrr_cell == pytest.approx(2 * clean * cw / (clean + cw) if clean + cw else 0.0, abs=0.02)
    for png in ("clean_vs_robust.png", "robust_per_epoch.png", "cure_updated_fraction.png",
                "rift_interpolation.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    def no_training(*a, **k):
        raise AssertionError("a complete run directory must not be trained again")

    monkeypatch.setattr(rf, "train_epoch", no_training)
    monkeypatch.setattr(rf, "finetune_module", no_training)
    again = run_cli(argv, capsys)
    assert again["table"] == first["table"]


# -----------------------------------------------------------------------------
# RiFT: MRC (Def. 3.1, Alg. 1), one-module fine-tuning, interpolation, the alpha rule, corruptions.
# Checked against hand-written computations (analytic softmax-regression gradients, a hand SGD
# loop, colorsys, NumPy filters, PIL) or invariants (eps-ball, [0, 1], state bit-identical).
# -----------------------------------------------------------------------------


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


def images(n=8, size=8, seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(classes, (n,), generator=g)


def uint8_split(n=16, size=8, seed=0, classes=5):
    x, y = images(n, size, seed, classes)
    return rf.Split((x * 255).round().to(torch.uint8), y)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before, changed=()):
    for k, v in model.state_dict().items():
        if any(k.startswith(c + ".") for c in changed):
            assert not torch.equal(v, before[k]), f"{k} did not change"
        else:
            assert torch.equal(v, before[k]), f"{k} changed"


def smooth_images(n=4, size=32, seed=0):
    """Natural-looking test images: bicubic upsampled 5x5 noise, in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=size, mode="bicubic", align_corners=False)
    return x.clamp(0, 1) * 0.8 + 0.1


# -----------------------------------------------------------------------------
# Module robust criticality
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["paper", "official"])
def test_mrc_stays_in_the_ball_is_positive_and_zero_for_a_dead_module(variant):
    model = tiny_net()
    x, y = images()
    for name in rf.rift_modules(model):
        w = dict(model.named_modules())[name].weight
        mrc, dw = rf.mrc_perturbation(model, name, x, y, eps=0.1, steps=10, variant=variant,
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


def softmax_regression_loss_grad(w, b, x, y):
    """Mean CE of x @ w.T + b and its analytic gradient (P - onehot)^T x / N, in float64."""
    z = x @ w.T + b
    p = torch.softmax(z, 1)
    loss = -torch.log(p[torch.arange(len(y)), y]).mean()
    return loss.item(), (p - F.one_hot(y, w.shape[0])).T @ x / len(y)


def linear_model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = images(n=7, size=2, seed=seed)
    w = model[1].weight.detach().double()
    b = model[1].bias.detach().double()
    return model, x, y, w, b, x.flatten(1).double()


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
    mrc, got = rf.mrc_perturbation(model, "1", x, y, eps=eps, steps=steps)
    assert projected and abs(got.norm().item() - radius) <= 1e-5 * radius   # on the sphere
    assert torch.allclose(got.double(), dw, atol=1e-5)
    assert mrc == pytest.approx(expect, rel=1e-3, abs=1e-6)


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
    mrc, _ = rf.mrc_perturbation(model, "1", x, y, eps=eps, steps=epochs, variant="official", batch_size=64)
    assert mrc == pytest.approx(expect, rel=1e-3, abs=1e-6)


def test_mrc_leaves_a_resnet_bit_identical_in_its_mode_with_no_grad():
    torch.manual_seed(0)
    model = rf.build_model("resnet18", width=4)
    x, y = images(n=4, size=16, classes=10)
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
    x, y = images()
    with pytest.raises(ValueError, match=r"nope.*\['conv', 'fc', 'dead'\]"):
        rf.module_robust_criticality(model, x, y, modules=["conv", "nope"])
    with pytest.raises(ValueError, match="bn"):                # a BatchNorm is not a RiFT module
        rf.mrc_perturbation(model, "bn", x, y)
    with pytest.raises(ValueError, match="sam"):
        rf.mrc_perturbation(model, "conv", x, y, variant="sam")


def test_non_robust_critical_module_is_the_lowest_mrc():
    assert rf.non_robust_critical_module({"a": 0.3, "b": -0.1, "c": 0.2}) == "b"


# -----------------------------------------------------------------------------
# Fine-tuning one module
# -----------------------------------------------------------------------------

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


# -----------------------------------------------------------------------------
# Interpolation and the choice of alpha
# -----------------------------------------------------------------------------

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
    return [dict(alpha=a, clean=c, robust=r) for a, c, r in rows]


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


# -----------------------------------------------------------------------------
# Corruptions (CIFAR-10-C)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", rf.CORRUPTIONS + rf.EXTRA_CORRUPTIONS)
def test_corruptions_keep_shape_and_range_and_grow_with_severity(name):
    x = smooth_images()
    change = []
    for s in (1, 5):
        out = rf.corrupt(x, name, s, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1 and not torch.isnan(out).any()
        assert torch.equal(out, rf.corrupt(x, name, s, torch.Generator().manual_seed(0)))   # seeded
        change.append((out - x).abs().mean().item())
    if name in rf.CORRUPTIONS:                                 # saturate's severities are not monotone
        assert change[1] > change[0] > 0


def test_corrupt_rejects_bad_severity_name_and_shape():
    x = smooth_images(1, 8)
    for s in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            rf.corrupt(x, "fog", s)
    with pytest.raises(ValueError, match="snow.*gaussian_noise"):
        rf.corrupt(x, "snow", 1)
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


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_pixelate_and_jpeg_match_pil(severity):
    from PIL import Image
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


def test_plasma_fractal_is_a_normalised_seeded_height_map():
    maps = rf.plasma_fractal(3, 16, 2.0, torch.Generator().manual_seed(0))
    assert maps.shape == (3, 16, 16)
    assert torch.allclose(maps.amin((1, 2)), torch.zeros(3)) and torch.allclose(maps.amax((1, 2)), torch.ones(3))
    assert torch.equal(maps, rf.plasma_fractal(3, 16, 2.0, torch.Generator().manual_seed(0)))


class Constant(nn.Module):
    """Always predicts class 0."""

    def forward(self, x):
        return F.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()


def test_corruption_accuracy_averages_severities_and_corruptions():
    split = uint8_split(n=20, classes=10)
    r = rf.corruption_accuracy(Constant(), split, names=("contrast", "jpeg_compression"), severities=(1, 3))
    expect = 100.0 * (split.y == 0).float().mean().item()
    assert r["contrast"] == pytest.approx(expect) and r["mean"] == pytest.approx(expect)
    assert r["n"] == 40 and set(r) == {"contrast", "jpeg_compression", "mean", "n"}


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
    assert r["mean"] == pytest.approx((r["gaussian_noise"] + r["fog"]) / 2)
    with pytest.raises(ValueError, match="snow"):
        rf.corruption_accuracy(model, split, names=("snow",))


# -----------------------------------------------------------------------------
# CIFAR-10-C files
# -----------------------------------------------------------------------------

def write_fake_cifar10c(directory, names, per=4, size=8):
    """<name>.npy: 5 severity blocks of `per` images; image i is constant i (so rows are traceable)."""
    n = 5 * per
    np.save(directory / "labels.npy", (np.arange(n) % 10).astype(np.uint8))
    for name in names:
        np.save(directory / f"{name}.npy", np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                                                            (n, size, size, 3)).copy())


def test_load_cifar10c_picks_severity_blocks_in_nchw(tmp_path):
    write_fake_cifar10c(tmp_path, ["fog", "contrast"])
    data = rf.load_cifar10c(str(tmp_path), ["fog", "contrast"], severities=(2, 5), num=3)
    assert set(data) == {"fog", "contrast"}
    s = data["fog"]
    assert s.x.shape == (6, 3, 8, 8) and s.x.dtype == torch.uint8 and s.y.dtype == torch.int64
    rows = [4, 5, 6, 16, 17, 18]                               # severity 2: 4..7, severity 5: 16..19
    assert s.x[:, 1, 2, 3].tolist() == rows and s.y.tolist() == [r % 10 for r in rows]
    assert len(rf.load_cifar10c(str(tmp_path), ["fog"])["fog"]) == 20


def test_load_cifar10c_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        rf.load_cifar10c(str(tmp_path), ["fog"])
    write_fake_cifar10c(tmp_path, ["fog"])
    with pytest.raises(FileNotFoundError, match="snow.npy"):
        rf.load_cifar10c(str(tmp_path), ["fog", "snow"])
    with pytest.raises(ValueError, match="severities"):
        rf.load_cifar10c(str(tmp_path), ["fog"], severities=(0,))


def test_corruption_accuracy_on_files_matches_a_hand_evaluation(tmp_path):
    write_fake_cifar10c(tmp_path, ["fog", "pixelate"], per=6)
    data = rf.load_cifar10c(str(tmp_path), ["fog", "pixelate"], severities=(1, 3))
    model = tiny_net()
    r = rf.corruption_accuracy(model, uint8_split(), names=("fog", "pixelate"), cifar10c=data)
    with torch.no_grad():
        hand = 100.0 * (model(data["fog"].x.float() / 255).argmax(1) == data["fog"].y).float().mean().item()
    assert r["fog"] == pytest.approx(hand) and r["n"] == 12
    with pytest.raises(ValueError, match="not loaded"):
        rf.corruption_accuracy(model, uint8_split(), names=("contrast",), cifar10c=data)


# -----------------------------------------------------------------------------
# kernels.py: the fused RGP mask against rgp_mask_, bit for bit, under the Triton interpreter.
# Triton reads TRITON_INTERPRET when a kernel is decorated; this file sets it before importing.
# The interpreter is slow (about 15 ms per program and launch), so tensors are small: what
# matters is awkward sizes, ties, NaN and dtypes, not bulk.
# -----------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    import kernels
    KERNELS_INTERPRETED = isinstance(kernels._rgp_mask_kernel, InterpretedFunction)
except ImportError:
    KERNELS_INTERPRETED = False
needs_kernels = pytest.mark.skipif(not KERNELS_INTERPRETED,
                                   reason="needs triton, with TRITON_INTERPRET=1 set before kernels is imported")

BLOCK, CHUNK = (kernels.BLOCK_SIZE, kernels.CHUNK_SIZE) if KERNELS_INTERPRETED else (2048, 16384)
RESNET_LIKE = [(8, 3, 3, 3), (8, 8, 3, 3), (16, 8, 3, 3), (16, 8, 1, 1), (10, 16)]


def _bits(t):
    """Integer view of a float tensor, so that NaN payloads and -0 compare exactly."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype)


def _compare(grads, grads_nat, grads_adv, alpha, percentile, expect_launches=6):
    """Mask clones of grads with both paths; assert bit-equal results and the launch count."""
    ref = [g.clone() for g in grads]
    rf.rgp_mask_(ref, grads_nat, grads_adv, alpha, percentile)
    before = kernels.LAUNCHES
    kernels.fused_rgp_mask_(grads, grads_nat, grads_adv, alpha, percentile)
    assert kernels.LAUNCHES - before == expect_launches   # the kernels ran: no silent fallback
    for i, (r, g) in enumerate(zip(ref, grads)):
        assert torch.equal(_bits(r), _bits(g)), f"tensor {i} {tuple(g.shape)} differs"


@needs_kernels
@pytest.mark.parametrize("percentile, alpha", [(30.0, 0.1), (33.3, 0.3), (50.0, 0.5)])
def test_resnet_like_shapes(percentile, alpha):
    gen = torch.Generator().manual_seed(0)
    lists = [[_randn(s, gen) for s in RESNET_LIKE] for _ in range(3)]
    _compare(*lists, alpha, percentile)


@needs_kernels
def test_awkward_sizes():
    # empty (k = 0: left out), 1 and 2 elements, around the block and the chunk, a prime
    sizes = [0, 1, 2, BLOCK - 1, BLOCK + 1, 1031, CHUNK + 1]
    gen = torch.Generator().manual_seed(1)
    lists = [[_randn(n, gen) for n in sizes] for _ in range(3)]
    _compare(*lists, 0.2, 60.0)


@needs_kernels
def test_percentile_edges():
    gen = torch.Generator().manual_seed(2)
    lists = [[_randn(s, gen) for s in RESNET_LIKE] for _ in range(3)]
    lists[1][0][0, 0, 0, 0] = float("nan")            # a NaN score is zeroed too when k = n
    before = [g.clone() for g in lists[0]]
    _compare([g.clone() for g in lists[0]], lists[1], lists[2], 0.1, 0.0, expect_launches=0)
    _compare(lists[0], lists[1], lists[2], 0.1, 100.0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in lists[0])
    assert not torch.equal(before[0], lists[0][0])
    # k = n - 1 for every tensor: only the largest score survives
    lists = [[_randn(s, gen) for s in RESNET_LIKE] for _ in range(3)]
    _compare(*lists, 0.1, 99.9)


@needs_kernels
def test_ties_and_constants():
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 3, 3, 3), (16, 8, 1, 1), (10, 16), (7,)]
    # few distinct scores: many ties at the threshold, which are kept
    grads_nat = [torch.randint(-2, 3, s, generator=gen).float() for s in shapes]
    grads_adv = [torch.randint(-1, 2, s, generator=gen).float() for s in shapes]
    grads = [_randn(s, gen) for s in shapes]
    _compare(grads, grads_nat, grads_adv, 0.5, 30.0)
    # constant and all-zero scores: t equals every score, so nothing is below it
    grads_nat = [torch.full(s, 0.25) for s in shapes[:2]] + [torch.zeros(s) for s in shapes[2:]]
    grads_adv = [torch.full(s, -0.25) for s in shapes[:2]] + [torch.zeros(s) for s in shapes[2:]]
    grads = [_randn(s, gen) for s in shapes]
    kept = [g.clone() for g in grads]
    _compare(grads, grads_nat, grads_adv, 0.1, 70.0)
    assert all(torch.equal(g, k) for g, k in zip(grads, kept))


@needs_kernels
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: 0 * inf
def test_nan_and_inf_scores():
    gen = torch.Generator().manual_seed(4)
    shapes = [(8, 8, 3, 3), (16, 8, 1, 1), (10, 16), (5,)]
    grads_nat = [_randn(s, gen) for s in shapes]
    grads_adv = [_randn(s, gen) for s in shapes]
    grads_nat[0].view(-1)[::7] = float("nan")          # some NaN scores, never masked
    grads_adv[0].view(-1)[::11] = float("-inf")
    grads_nat[1].view(-1)[: 100] = float("nan")        # t itself is NaN: all numbers are below it
    grads_adv[2].view(-1)[::3] = float("inf")          # +inf scores sort just below NaN
    grads_nat[3][:] = float("inf")                     # alpha = 0: 0 * inf = NaN in both paths
    for alpha in (0.0, 0.4):
        grads = [_randn(s, gen) for s in shapes]
        _compare(grads, grads_nat, grads_adv, alpha, 30.0)


@needs_kernels
@pytest.mark.parametrize("alpha", [0.0, 1.0, 1e-40])
def test_alpha_extremes(alpha):
    # 1e-40 makes float32(alpha) subnormal: the interpreter must still compute in float32
    gen = torch.Generator().manual_seed(5)
    lists = [[_randn(s, gen) for s in RESNET_LIKE[:3]] for _ in range(3)]
    _compare(*lists, alpha, 30.0)


@needs_kernels
def test_half_precision_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(6)
    dtypes = [(torch.float16, torch.float16, torch.float16),
              (torch.bfloat16, torch.bfloat16, torch.bfloat16),
              (torch.float16, torch.bfloat16, torch.float32),
              (torch.bfloat16, torch.float32, torch.float16),
              (torch.float32, torch.float16, torch.bfloat16)]
    shapes = RESNET_LIKE
    grads = [_randn(s, gen, d[0]) for s, d in zip(shapes, dtypes)]
    grads_nat = [_randn(s, gen, d[1]) for s, d in zip(shapes, dtypes)]
    grads_adv = [_randn(s, gen, d[2]) for s, d in zip(shapes, dtypes)]
    _compare(grads, grads_nat, grads_adv, 0.1, 33.3)   # all five dtype mixes in one launch


@needs_kernels
def test_non_contiguous_views():
    gen = torch.Generator().manual_seed(7)
    base = [_randn((16, 8, 3, 3), gen), _randn((20, 16), gen), _randn((9, 9), gen)]
    ref_base = [b.clone() for b in base]

    def views(ts):
        return [ts[0].transpose(0, 1), ts[1][:, ::2], ts[2][1:8, 2:]]

    grads_nat = [_randn((16, 8, 3, 3), gen).transpose(0, 1), _randn((20, 8), gen),
                 _randn((7, 14), gen)[:, ::2]]
    grads_adv = [_randn((8, 16, 3, 3), gen), _randn((8, 20), gen).t(), _randn((7, 7), gen)]
    rf.rgp_mask_(views(ref_base), grads_nat, grads_adv, 0.1, 30.0)
    before = kernels.LAUNCHES
    kernels.fused_rgp_mask_(views(base), grads_nat, grads_adv, 0.1, 30.0)
    assert kernels.LAUNCHES - before == 6
    # whole storages equal: the masked entries went back, the rest of each base is untouched
    assert all(torch.equal(_bits(r), _bits(b)) for r, b in zip(ref_base, base))


@needs_kernels
def test_grads_alias_g_nat():
    # CURE adds the other terms' gradient into g_nat's storage, so grads may be grads_nat
    gen = torch.Generator().manual_seed(8)
    grads_nat = [_randn(s, gen) for s in RESNET_LIKE]
    grads_adv = [_randn(s, gen) for s in RESNET_LIKE]
    ref = [g.clone() for g in grads_nat]
    rf.rgp_mask_(ref, [g.clone() for g in grads_nat], grads_adv, 0.1, 30.0)
    kernels.fused_rgp_mask_(grads_nat, grads_nat, grads_adv, 0.1, 30.0)
    assert all(torch.equal(_bits(r), _bits(g)) for r, g in zip(ref, grads_nat))


@needs_kernels
def test_launch_count_does_not_grow_with_tensors():
    gen = torch.Generator().manual_seed(9)
    counts = []
    for n_tensors in (3, 40):
        shapes = [(4, 3 + i % 5) for i in range(n_tensors)]
        lists = [[_randn(s, gen) for s in shapes] for _ in range(3)]
        before = kernels.LAUNCHES
        _compare(*lists, 0.1, 30.0)
        counts.append(kernels.LAUNCHES - before)
    assert counts[0] == counts[1] == 6


@needs_kernels
@pytest.mark.parametrize("args", [
    ("lengths", 0.1, 30.0), ("shapes", 0.1, 30.0),
    ("ok", -0.1, 30.0), ("ok", 1.5, 30.0), ("ok", float("nan"), 30.0),
    ("ok", 0.1, -1.0), ("ok", 0.1, 100.5), ("ok", 0.1, float("nan")),
])
def test_errors_match_plain_path(args):
    case, alpha, percentile = args
    a, b = torch.zeros(3, 3), torch.zeros(3, 3)
    grads, grads_nat, grads_adv = [a], [a.clone()], [b]
    if case == "lengths":
        grads_adv = [b, b]
    elif case == "shapes":
        grads_nat = [torch.zeros(9)]
    with pytest.raises(ValueError) as plain:
        rf.rgp_mask_(grads, grads_nat, grads_adv, alpha, percentile)
    with pytest.raises(ValueError) as fused:
        kernels.fused_rgp_mask_(grads, grads_nat, grads_adv, alpha, percentile)
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


if KERNELS_INTERPRETED:
    @triton.jit
    def _score_key_probe(seg_ptr,   # int64 (1, 8): segment row as built by kernels._rgp_tables
                         out_ptr,   # int32 (n,): the keys
                         n, a, b, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        tl.store(out_ptr + offs, kernels._rgp_score_key(seg_ptr, 0, offs, mask, a, b), mask=mask)


@needs_kernels
@pytest.mark.parametrize("alpha", [0.1, 1 / 3, 0.7, 1e-40])
def test_score_key_matches_spec(alpha):
    # values across the float32 range, where a fused multiply-add would round differently
    gen = torch.Generator().manual_seed(11)
    n = 4096
    mant = torch.rand(2, n, generator=gen) + 0.5
    expo = torch.randint(-140, 128, (2, n), generator=gen).float()
    g_nat, g_adv = (mant * torch.exp2(expo)) * torch.where(torch.rand(2, n, generator=gen) < 0.5, -1, 1)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4e38])
    g_nat[: 7 * 7] = special.repeat_interleave(7)
    g_adv[: 7 * 7] = special.repeat(7)
    row = torch.tensor([[n, 0, 0, g_nat.data_ptr(), g_adv.data_ptr(), 0, 0, 0]], dtype=torch.int64)
    keys = torch.empty(n, dtype=torch.int32)
    a, b = rf.rgp_coefficients(alpha)
    _score_key_probe[(1,)](row, keys, n, a, b, BLOCK=n, enable_fp_fusion=False)
    assert torch.equal(keys, rf.score_key(rf.rgp_score(g_nat, g_adv, alpha)))


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
