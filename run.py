"""Command line for robust_ft: train, fine-tune, evaluate and benchmark.

    python run.py METHOD DATASET [options]

METHOD:  natural | at | trades | cure | rift | eval | bench
DATASET: cifar10 | cifar100 | svhn | folder | synthetic   (for bench: step | mask)

Examples:
    python run.py cure cifar10                          # the paper's CURE run (GPU)
    python run.py trades synthetic --preset quick       # the same pipeline, CPU-sized
    python run.py eval cifar10 --init runs/cure_cifar10_resnet18/checkpoint.pt
    python run.py bench step

Every run writes to its run directory (--out): config.json, checkpoint.pt (atomically, every
epoch), log.jsonl (one line per epoch) and metrics.json, and prints the final metrics as one
JSON object on the last line of stdout. Bad input exits with code 2 and a one-line error.
"""
import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import torch

import robust_ft as rf

METHODS = ("natural", "at", "trades", "cure", "rift", "eval", "bench")
BENCHES = ("step", "mask")

# Presets: `paper` is the papers' setting; `quick` is the same pipeline sized for a 2-core CPU.
PRESETS = {
    "paper": dict(
        model="resnet18", width=None,  # full width (64 channels in the first stage)
        epochs=200,                    # CURE Table 9; also Rice et al.'s AT schedule
        natural_epochs=200,            # natural pre-training for CURE (Alg. 1, line 2), same schedule
        batch_size=128, lr=0.1,        # Table 9
        train_size=None,               # the whole training split ...
        val_size=1000,                 # ... minus 1,000 images for selection (never the test split)
        test_size=None,                # evaluate on the full test split
        epoch_eval_size=1000,          # per-epoch clean/PGD-20 on this many validation images
        attack_steps=10,               # training attack: PGD-10, step eps/4 (spec)
        attacks="pgd20,pgd100,cw",     # final evaluation (+ AutoAttack when installed)
    ),
    "quick": dict(
        model="resnet18", width=16, epochs=5, natural_epochs=5, batch_size=128, lr=0.1,
        train_size=10000, val_size=500, test_size=1000, epoch_eval_size=500,
        attack_steps=5,                # PGD-5 (step 2/255) training attack to fit the CPU budget
        attacks="pgd20,cw",
    ),
}
SYNTHETIC_QUICK = dict(width=8, epochs=3, natural_epochs=3, train_size=1000, val_size=200,
                       test_size=200, epoch_eval_size=100)  # synthetic + quick: under a minute here
WEIGHT_DECAY = {  # per method, from each method's paper / official code
    "natural": 5e-4, "at": 5e-4,       # Rice et al. 2020
    "trades": 2e-4,                    # TRADES official code
    "cure": 5e-3,                      # CURE Table 9
    "rift": 5e-4,                      # RiFT spec (fine-tuning)
}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", help="|".join(METHODS))
    p.add_argument("dataset", help="|".join(rf.DATASETS) + " (bench: step|mask)")
    p.add_argument("--preset", default="paper", help="paper | quick")
    p.add_argument("--model", help="|".join(rf.MODELS))
    p.add_argument("--width", type=int, help="channels of the first stage (default: the paper's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--natural-epochs", type=int, help="CURE: natural pre-training epochs when no --init")
    p.add_argument("--warmup-epochs", type=int, default=0,
                   help="CURE-Eff: clean warm-up epochs inside the --epochs budget (no --init needed)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--eps", type=float, default=8.0, help="L-inf radius in pixel units /255 (default 8)")
    p.add_argument("--attack-steps", type=int, help="PGD steps of the training attack (step eps/4)")
    p.add_argument("--beta", type=float, help="TRADES beta (default 6) / CURE beta (default 1)")
    p.add_argument("--percentile", type=float, help="CURE p (default: Table 9)")
    p.add_argument("--alpha", type=float, help="CURE alpha (default: Table 9)")
    p.add_argument("--gamma", type=float, help="CURE gamma (default: Table 9)")
    p.add_argument("--revision-rate", type=float, default=0.2, help="CURE r (Table 9)")
    p.add_argument("--revision-decay", type=float, default=0.999,
                   help="CURE d for a 200-epoch run (Table 9); scaled down for shorter runs")
    p.add_argument("--mask-classifier", action=argparse.BooleanOptionalAction, default=True,
                   help="CURE: apply the RGP mask to the classifier weight too")
    p.add_argument("--train-size", type=int, help="use only this many training images")
    p.add_argument("--val-size", type=int, help="validation images carved from the training split")
    p.add_argument("--test-size", type=int, help="evaluate on the first N test images")
    p.add_argument("--attacks", help="final evaluation attacks, comma-separated: " + ",".join(rf.EVAL_ATTACKS))
    p.add_argument("--autoattack", action=argparse.BooleanOptionalAction, default=None,
                   help="run AutoAttack in the final evaluation (default: when installed, paper preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default="data", help="dataset root (torchvision download / ImageFolder)")
    p.add_argument("--holdout-per-class", type=int, default=500,
                   help="folder datasets without test/: images per class held out as the test split")
    p.add_argument("--out", help="run directory (default runs/METHOD_DATASET_MODEL)")
    p.add_argument("--init", help="start from this checkpoint's weights")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    # RiFT
    p.add_argument("--module", help="RiFT: fine-tune this module (skips MRC)")
    p.add_argument("--mrc-only", action="store_true", help="RiFT: print the MRC ranking and stop")
    p.add_argument("--mrc-variant", default="paper", help="RiFT: paper | official")
    p.add_argument("--tolerance", type=float, default=0.1, help="RiFT: allowed robust drop (points)")
    p.add_argument("--cifar10c", help="RiFT: directory of the CIFAR-10-C .npy files")
    # bench
    p.add_argument("--reps", type=int, default=10, help="bench: timed repetitions")
    return p.parse_args(argv)


def resolve(args):
    """Check every value, fill the preset's defaults in place, and return the args."""
    if args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose one of {list(METHODS)}")
    allowed = BENCHES if args.method == "bench" else rf.DATASETS
    if args.dataset not in allowed:
        raise UsageError(f"unknown {'benchmark' if args.method == 'bench' else 'dataset'} "
                         f"{args.dataset!r}; choose one of {list(allowed)}")
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {list(PRESETS)}")
    preset = dict(PRESETS[args.preset])
    if args.preset == "quick" and args.dataset == "synthetic":
        preset.update(SYNTHETIC_QUICK)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model not in rf.MODELS:
        raise UsageError(f"unknown model {args.model!r}; choose one of {sorted(rf.MODELS)}")
    if args.eps < 0:
        raise UsageError(f"--eps {args.eps} must be >= 0 (pixel units /255, e.g. 8)")
    for name in ("epochs", "batch_size", "width", "train_size", "test_size", "val_size"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "val_size" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {v} must be positive")
    if not 0 <= args.warmup_epochs < max(args.epochs, 1):
        raise UsageError(f"--warmup-epochs {args.warmup_epochs} must be in [0, --epochs={args.epochs})")
    attacks = [a for a in args.attacks.split(",") if a]
    bad = [a for a in attacks if a not in rf.EVAL_ATTACKS]
    if bad:
        raise UsageError(f"unknown attack {bad[0]!r}; choose from {sorted(rf.EVAL_ATTACKS)}")
    args.attacks = attacks
    if args.autoattack is None:
        args.autoattack = args.preset == "paper" and rf.autoattack_available()
    elif args.autoattack and not rf.autoattack_available():
        raise UsageError("--autoattack needs the `autoattack` package: pip install "
                         "git+https://github.com/fra31/auto-attack (or `pip install pyautoattack`)")
    if args.weight_decay is None:
        args.weight_decay = WEIGHT_DECAY.get(args.method, 5e-4)
    if args.beta is None:
        args.beta = 1.0 if args.method == "cure" else 6.0
    if args.mrc_variant not in ("paper", "official"):
        raise UsageError(f"unknown --mrc-variant {args.mrc_variant!r}; choose one of ['paper', 'official']")
    if args.out is None:
        args.out = os.path.join("runs", f"{args.method}_{args.dataset}_{args.model}")
    args.eps_px = args.eps / 255          # divided by 255 once, here
    args.step_px = args.eps_px / 4        # training attack step eps/4 (spec)
    return args


# -----------------------------------------------------------------------------
# Small helpers: progress with ETA, run records
# -----------------------------------------------------------------------------

class Progress:
    """Prints `label [i/n] elapsed ETA` to stderr at most twice a second."""

    def __init__(self, label):
        self.label, self.start, self.last = label, time.time(), 0.0

    def __call__(self, i, n):
        now = time.time()
        if now - self.last < 0.5 and i < n:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / i * (n - i)
        end = "\n" if i == n else ""
        print(f"\r{self.label} [{i}/{n}] {elapsed:.0f}s, ETA {eta:.0f}s   ", end=end, file=sys.stderr, flush=True)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def versions():
    return {"python": platform.python_version(), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}


def finish(args, metrics):
    """Write OUT/metrics.json and print the same object as the last stdout line."""
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    print(json.dumps(metrics))
    return metrics


# -----------------------------------------------------------------------------
# Data and model set-up
# -----------------------------------------------------------------------------

def setup_data(args):
    """Train / validation / test splits on the device, as the preset sizes them."""
    data = rf.load_data(args.dataset, args.data_dir, args.holdout_per_class, seed=args.seed)
    train, val = rf.split_validation(data.train, args.val_size, seed=args.seed)
    if args.train_size is not None and args.train_size < len(train):
        train = train.subset(slice(0, args.train_size))
    test = data.test
    if args.test_size is not None and args.test_size < len(test):   # a fixed random subset (all classes)
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.test_size])
    dev = torch.device(args.device)
    return data, train.to(dev), val.to(dev), test.to(dev)


def load_weights(path, model):
    if not os.path.isfile(path):
        raise UsageError(f"--init {path!r}: no such checkpoint file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    try:
        rf.load_state_dict_checked(model, state, source=f"checkpoint {path!r}")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ckpt


def setup_model(args, data):
    model = rf.build_model(args.model, data.num_classes, args.width, data.mean, data.std)
    if args.init:
        load_weights(args.init, model)
    return model.to(args.device)


# -----------------------------------------------------------------------------
# Training: one loop for natural, AT, TRADES and CURE
# -----------------------------------------------------------------------------

def method_step(args, method, cure_state=None):
    """The per-batch step for `method`, a function (model, optimizer, x, y) -> loss."""
    eps, step, k = args.eps_px, args.step_px, args.attack_steps
    if method == "natural":
        return rf.natural_step
    if method == "at":
        return lambda m, o, x, y: rf.at_step(m, o, x, y, eps, step, k)
    if method == "trades":
        return lambda m, o, x, y: rf.trades_step(m, o, x, y, eps, step, k, args.beta)
    s = cure_state

    def step_cure(m, o, x, y):
        loss = rf.cure_step(m, o, x, y, s["revision"], s["cfg"], s["decay"],
                            rf.revision_rate(s["cfg"].rate, s["step"] / s["total_steps"]), s["step"],
                            s["generator"], eps, step, k, s["mask_fn"], s["updated"])
        s["step"] += 1
        return loss
    return step_cure


def cure_config(args, model):
    cfg = rf.cure_defaults(args.model, args.dataset)
    exclude = () if args.mask_classifier else (rf.classifier_name(model),)
    return rf.CureConfig(
        percentile=cfg.percentile if args.percentile is None else args.percentile,
        alpha=cfg.alpha if args.alpha is None else args.alpha,
        gamma=cfg.gamma if args.gamma is None else args.gamma,
        beta=args.beta, rate=args.revision_rate, decay=args.revision_decay, exclude=exclude)


def train(args, method, data, train_split, val, test, out, init_model=None):
    """Train `method` into run directory `out`, resuming from out/checkpoint.pt with --resume.

    Returns (model, revision or None, record) where record holds per-epoch logs and timings.
    """
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise UsageError(f"{out!r} already holds a run; pass --resume to continue it or choose another --out")
    torch.manual_seed(args.seed)
    model = init_model if init_model is not None else setup_model(args, data)
    epochs = args.epochs if method != "natural" or args.method == "natural" else args.natural_epochs
    # --weight-decay applies to the method asked for; CURE's natural pre-training keeps its own.
    weight_decay = args.weight_decay if method == args.method else WEIGHT_DECAY[method]
    optimizer = rf.make_optimizer(model, args.lr, weight_decay)
    generator = torch.Generator().manual_seed(args.seed)            # data order and augmentation
    steps_per_epoch = max(1, len(train_split) // args.batch_size)
    cure_state = None
    if method == "cure":
        cfg = cure_config(args, model)
        total = epochs * steps_per_epoch
        decay = rf.revision_decay(cfg.decay, cfg.rate, (epochs - args.warmup_epochs) * steps_per_epoch)
        cure_state = dict(cfg=cfg, revision=rf.Revision(model), decay=decay, step=0, total_steps=total,
                          generator=torch.Generator().manual_seed(args.seed + 1),
                          mask_fn=rf.rgp_mask_for(args.device), updated={})
        print(f"CURE: p={cfg.percentile} alpha={cfg.alpha} gamma={cfg.gamma} beta={cfg.beta} "
              f"r={cfg.rate} d={decay:.6f} (paper d={cfg.decay}, {total} steps)", file=sys.stderr)
    record = dict(log=[], epoch_seconds=[], best=None)
    start_epoch = 0
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=args.device, weights_only=False)
        rf.load_state_dict_checked(model, ck["model"], f"checkpoint {ckpt_path!r}")
        optimizer.load_state_dict(ck["optimizer"])
        generator.set_state(ck["generator"])
        rf.set_rng_state(ck["rng"])
        record = ck["record"]
        start_epoch = ck["epoch"]
        if cure_state is not None:
            cure_state["revision"].model.load_state_dict(ck["revision"])
            cure_state["revision"].updates = ck["revision_updates"]
            cure_state["generator"].set_state(ck["revision_generator"])
            cure_state["step"] = ck["cure_step"]
        print(f"resumed {out} at epoch {start_epoch}/{epochs}", file=sys.stderr)
    step_fn = method_step(args, method, cure_state)
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        lr = rf.step_lr(args.lr, epoch, epochs)
        warm = method == "cure" and epoch < args.warmup_epochs               # CURE-Eff warm-up
        fn = rf.natural_step if warm else step_fn
        if cure_state is not None:
            cure_state["updated"] = {}
        loss = rf.train_epoch(model, optimizer, fn, train_split, args.batch_size, lr, generator,
                              Progress(f"{method} epoch {epoch + 1}/{epochs}"))
        seconds = time.time() - t0
        entry = dict(epoch=epoch + 1, lr=lr, loss=loss, seconds=seconds)
        eval_split = val.subset(slice(0, args.epoch_eval_size))
        entry["val"] = rf.evaluate(model, eval_split, ["pgd20"], args.eps_px)
        if cure_state is not None:
            if warm:
                cure_state["revision"] = rf.Revision(model)    # revise from where adversarial training starts
            else:
                entry["val_revision"] = rf.evaluate(cure_state["revision"].model, eval_split, ["pgd20"], args.eps_px)
                numel = dict(rf.masked_parameters(model))
                entry["updated_fraction"] = {n: float(c) / (numel[n].numel() * steps_per_epoch)
                                             for n, c in cure_state["updated"].items()}
        record["log"].append(entry)
        record["epoch_seconds"].append(seconds)
        if record["best"] is None or entry["val"]["pgd20"] >= record["best"]["val"]["pgd20"]:
            record["best"] = dict(epoch=epoch + 1, val=entry["val"],
                                  model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in entry.items()}) + "\n")
        v = entry["val"]
        print(f"{method} epoch {epoch + 1}/{epochs}: loss {loss:.4f}, val clean {v['clean']:.1f}% "
              f"PGD-20 {v['pgd20']:.1f}% (n={v['n']}), {seconds:.1f}s", file=sys.stderr)
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1,
                     generator=generator.get_state(), rng=rf.rng_state(), record=record,
                     config=config_record(args, method), method=method)
        if cure_state is not None:
            state.update(revision=cure_state["revision"].model.state_dict(),
                         revision_updates=cure_state["revision"].updates,
                         revision_generator=cure_state["generator"].get_state(), cure_step=cure_state["step"])
        rf.save_checkpoint(ckpt_path, **state)
    return model, (cure_state["revision"] if cure_state else None), record


def config_record(args, method):
    cfg = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    cfg.update(method=method, versions=versions())
    return cfg


def final_metrics(args, model, test, record, method, revision=None):
    """Evaluate the last and the best-on-validation model on the test split."""
    autoattack = args.autoattack
    prog = Progress(f"test {method}")
    last = rf.evaluate(model, test, args.attacks, args.eps_px, autoattack=autoattack, progress=prog)
    metrics = dict(method=method, dataset=args.dataset, model=args.model, width=args.width,
                   epochs=len(record["log"]), device=str(args.device), preset=args.preset, seed=args.seed,
                   seconds_per_epoch=sum(record["epoch_seconds"]) / max(1, len(record["epoch_seconds"])),
                   test=with_nrr(last))
    best = record.get("best")
    if best is not None and best["epoch"] != len(record["log"]):
        selected = copy.deepcopy(model)
        selected.load_state_dict(best["model"])
        metrics["test_best"] = with_nrr(rf.evaluate(selected, test, args.attacks, args.eps_px))
    if best is not None:
        metrics["best_epoch"] = best["epoch"]
    if revision is not None:
        metrics["test_revision"] = with_nrr(rf.evaluate(revision.model, test, args.attacks, args.eps_px))
    return metrics


def with_nrr(result):
    """Add NRR (Eq. 9) with the robust column the paper uses (CW when run, else the worst case)."""
    rob = result.get("cw", result.get("robust"))
    if rob is not None:
        result["nrr"] = rf.nrr(result["clean"], rob)
    return result


# -----------------------------------------------------------------------------
# Commands
# -----------------------------------------------------------------------------

def cmd_train(args):
    data, train_split, val, test = setup_data(args)
    model = None
    if args.method == "cure" and not args.init and args.warmup_epochs == 0:
        # Algorithm 1, line 2: CURE starts from a naturally trained model; train one first.
        nat_dir = os.path.join(args.out, "natural")
        nat_ckpt = os.path.join(nat_dir, "checkpoint.pt")
        done = os.path.exists(nat_ckpt) and torch.load(nat_ckpt, map_location="cpu",
                                                       weights_only=False)["epoch"] >= args.natural_epochs
        if done:
            model = setup_model(args, data)
            load_weights(nat_ckpt, model)
        else:
            print(f"no --init: natural pre-training for {args.natural_epochs} epochs into {nat_dir}",
                  file=sys.stderr)
            resume, args.resume = args.resume, True   # pre-training always continues where it stopped
            model = train(args, "natural", data, train_split, val, test, nat_dir)[0]
            args.resume = resume
    model, revision, record = train(args, args.method, data, train_split, val, test, args.out, model)
    metrics = final_metrics(args, model, test, record, args.method, revision)
    return finish(args, metrics)


def cmd_eval(args):
    if not args.init:
        raise UsageError("eval needs --init CKPT (the checkpoint to evaluate)")
    data, _, _, test = setup_data(args)
    model = setup_model(args, data)
    result = with_nrr(rf.evaluate(model, test, args.attacks, args.eps_px, autoattack=args.autoattack,
                                  progress=Progress("eval")))
    return finish(args, dict(method="eval", checkpoint=args.init, dataset=args.dataset, model=args.model,
                             width=args.width, device=str(args.device), test=result))


def cmd_bench(args):
    raise UsageError("bench is not available yet")


def main(argv=None):
    args = parse_args(argv)
    try:
        resolve(args)
        if args.method == "bench":
            return cmd_bench(args)
        if args.method == "eval":
            return cmd_eval(args)
        if args.method == "rift":
            return cmd_rift(args)
        return cmd_train(args)
    except UsageError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
