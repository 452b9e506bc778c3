"""Command line for robust_ft: train, fine-tune, evaluate and benchmark.

    python run.py METHOD DATASET [options]

METHOD:  natural | at | trades | cure | rift | eval | bench | compare | layerwise | analyze
DATASET: cifar10 | cifar100 | svhn | tinyimagenet | folder | synthetic
         (bench: step | mask | report | gpu; analyze: cka | eps | minpert, then the DATASET)

Examples:
    python run.py cure cifar10                          # the paper's CURE run (GPU)
    python run.py trades synthetic --preset quick       # the same pipeline, CPU-sized
    python run.py eval cifar10 --init runs/cure_cifar10_resnet18/checkpoint.pt
    python run.py rift cifar10 --init robustbench:Wong2020Fast   # a RobustBench model (requirements-zoo.txt)
    python run.py bench step
    python run.py layerwise cifar10                     # CURE Sec. 3: AT of some blocks only (U-1 ... U-234)
    python run.py analyze eps cifar10 --init runs/at_cifar10_resnet18/checkpoint.pt --init runs/cure_cifar10_resnet18/checkpoint.pt
    torchrun --nproc_per_node=4 run.py cure cifar10     # the same run on 4 GPUs (data parallel)

Every run writes to its run directory (--out): config.json, checkpoint.pt (atomically, every
epoch), log.jsonl (one line per epoch) and metrics.json, and prints the final metrics as one
JSON object on the last line of stdout. Bad input exits with code 2 and a one-line error.
"""
import argparse
import copy
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import robust_ft as rf

METHODS = ("natural", "at", "trades", "cure", "rift", "eval", "bench", "compare", "layerwise", "analyze")
ANALYSES = ("cka", "eps", "minpert")
LAYERWISE_BLOCKS = "1,2,3,4,12,23,34,123,234"   # CURE Sec. 3: the nine U-b the paper reports
BENCHES = ("step", "mask", "report", "gpu")
COMPARE_METHODS = ("at", "trades", "cure")

# Presets: `paper` is the papers' setting; `quick` is the same pipeline sized for a 2-core CPU.
PRESETS = {
    "paper": dict(
        model="resnet18", width=None,  # full width (64 channels in the first stage)
        epochs=200,                    # CURE Table 9; also Rice et al.'s AT schedule
        natural_epochs=200,            # natural pre-training for CURE (Alg. 1, line 2), same schedule
        batch_size=128,
        lr=0.1, natural_lr=0.1,        # Table 9, at batch 128 (scaled linearly with the batch size)
        train_size=None,               # the whole training split ...
        val_size=1000,                 # ... minus 1,000 images for selection (never the test split)
        test_size=None,                # evaluate on the full test split
        epoch_eval_size=1000,          # per-epoch clean/PGD-20 on this many validation images
        attack_steps=10,               # training attack: PGD-10, step eps/4 = 2/255 (Madry et al., TRADES)
        attacks="pgd20,pgd100,cw",     # final evaluation, then AutoAttack (standard) ...
        aa_size=None,                  # ... on the whole test split
        rift_epochs=10,                # RiFT fine-tuning: 10 epochs, lr 1e-3 (/10 after 5)
        mrc_size=1000,                 # adversarial training examples for MRC
    ),
    "quick": dict(
        model="resnet18", width=16, epochs=5,
        natural_epochs=15,             # natural training is cheap: give CURE a reasonable start
        batch_size=128,
        lr=0.05, natural_lr=0.1,       # at batch 128: adversarial stages 0.05 (the README's sweep), natural 0.1
        train_size=5000, val_size=500, test_size=1000, epoch_eval_size=500,
        attack_steps=5,                # PGD-5 (step 2/255) training attack to fit the CPU budget
        attacks="pgd20,cw", rift_epochs=4, mrc_size=256,
        aa_size=200,                   # AutoAttack on the first 200 test images (see README for its time)
    ),
}
# synthetic + quick: about a minute on a 2-core CPU, so no AutoAttack unless --autoattack is given
# (its Square attack alone makes 5,000 queries per image that survives the others: minutes on a CPU)
SYNTHETIC_QUICK = dict(
    width=8, epochs=3, natural_epochs=3, batch_size=32, train_size=800, val_size=200,
    test_size=100, epoch_eval_size=64, attack_steps=3, rift_epochs=2, mrc_size=64, autoattack=False, aa_size=32)
WEIGHT_DECAY = {  # per method, from each method's paper / official code
    "natural": 5e-4, "at": 5e-4,       # Rice et al. 2020
    "trades": 2e-4,                    # TRADES official code
    "cure": 5e-3,                      # CURE Table 9
    "rift": 5e-4,                      # RiFT fine-tuning (Sec. 4)
}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", help="|".join(METHODS))
    p.add_argument("dataset", help="|".join(rf.DATASETS) + " (bench: " + "|".join(BENCHES) + "; analyze: "
                   + "|".join(ANALYSES) + ")")
    p.add_argument("analyze_dataset", nargs="?", help="analyze: the dataset, after the analysis")
    p.add_argument("--preset", default="paper", help="paper | quick")
    p.add_argument("--model", help="|".join(rf.MODELS))
    p.add_argument("--width", type=int, help="channels of the first stage (default: the paper's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--natural-epochs", type=int, help="CURE: natural pre-training epochs when no --init")
    p.add_argument("--warmup-epochs", type=int, default=0,
                   help="CURE-Eff: clean warm-up epochs inside the --epochs budget (no --init needed)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate of the method asked for (default: the preset's, "
                   "given for batch 128 and scaled linearly with --batch-size)")
    p.add_argument("--milestones", help="epochs after which lr drops by 10, comma-separated, or 'none' "
                   "(default: half and three quarters of the stage's epochs, rounded half up: 100,150 of 200)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--eps", type=float, default=8.0, help="L-inf radius in pixel units /255 (default 8)")
    p.add_argument("--attack-steps", type=int, help="PGD steps of the training attack (step eps/4)")
    p.add_argument("--beta", type=float, help="TRADES beta (default 6) / CURE beta: the KL weight of Eq. 5 "
                   "(default 5, the official code's; 1 is Eq. 5 as printed)")
    p.add_argument("--cure-variant", default="paper", help="CURE: paper (Eq. 6 mask on every weight, eval-mode "
                   "revision, r_t decaying, d scaled to the run) | official (the official code's rgp_soft mask on the "
                   "conv1 tensors, train-mode revision, constant r, d as given)")
    p.add_argument("--percentile", type=float, help="CURE p (default: Table 9)")
    p.add_argument("--alpha", type=float, help="CURE alpha (default: Table 9)")
    p.add_argument("--gamma", type=float, help="CURE gamma (default: Table 9)")
    p.add_argument("--revision-rate", type=float, default=0.2, help="CURE r (Table 9)")
    p.add_argument("--revision-decay", type=float, default=0.999,
                   help="CURE d (Table 9); the paper variant scales it down for runs shorter than 200 epochs "
                        "(never below 0.5), the official variant uses it as given; both warm up as the official code")
    p.add_argument("--mask-classifier", action=argparse.BooleanOptionalAction, default=True,
                   help="CURE: apply the RGP mask to the classifier weight too")
    p.add_argument("--train-size", type=int, help="use only this many training images")
    p.add_argument("--val-size", type=int, help="validation images carved from the training split")
    p.add_argument("--test-size", type=int, help="evaluate on the first N test images")
    p.add_argument("--attacks", help="final evaluation attacks, comma-separated: " + ",".join(rf.EVAL_ATTACKS))
    p.add_argument("--autoattack", action=argparse.BooleanOptionalAction, default=None,
                   help="run AutoAttack (standard, L-inf) in the final evaluation (default: on when installed)")
    p.add_argument("--aa-size", type=int, help="AutoAttack on the first N test images (default: all; quick: 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="model and gradients in channels_last memory format (default: on CUDA)")
    p.add_argument("--amp", default="none", help="none | bf16: bf16 autocast for the training forwards and "
                   "the training attack (parameters, gradients, the RGP score and evaluation stay float32)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: TF32 for convolutions and matmuls (default on)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun on CUDA: SyncBatchNorm, batch statistics over the global batch "
                        "(default on; CPU processes keep per-rank statistics)")
    p.add_argument("--data-dir", default="data", help="dataset root (torchvision download / ImageFolder)")
    p.add_argument("--holdout-per-class", type=int, default=500,
                   help="folder datasets without test/: images per class held out as the test split")
    p.add_argument("--out", help="run directory (default runs/METHOD_DATASET_MODEL)")
    p.add_argument("--init", action="append", help="start from this checkpoint's weights; eval/rift/analyze: "
                   "robustbench:NAME for a RobustBench model (CIFAR-10/100, Linf); analyze takes it several times")
    p.add_argument("--model-dir", default="models",
                   help="RobustBench checkpoints, in its layout DIR/<dataset>/Linf/NAME.pt (default ./models)")
    p.add_argument("--init-weights", help="with --init robustbench:NAME: these weights (a state dict saved from "
                   "NAME, e.g. a rift run's OUT/model.pt) in NAME's architecture, instead of the zoo's checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    # RiFT
    p.add_argument("--module", help="RiFT: fine-tune this module (skips MRC)")
    p.add_argument("--mrc-only", action="store_true", help="RiFT: print the MRC ranking and stop")
    p.add_argument("--mrc-variant", default="paper", help="RiFT: paper | official")
    p.add_argument("--tolerance", type=float, default=0.1, help="RiFT: allowed PGD-10 drop (points)")
    p.add_argument("--cifar10c", help="corruptions from files, not generated: a CIFAR-10-C or CIFAR-100-C folder "
                   "(.npy) or a Tiny-ImageNet-C folder (<name>/<severity>/<wnid>/*.JPEG)")
    p.add_argument("--corruptions", action=argparse.BooleanOptionalAction, default=None,
                   help="also the accuracy under corruptions (default: on for rift, whose paper reports it; off "
                        "for the others)")
    p.add_argument("--severity", type=int, default=3, help="corruptions: the severity reported per corruption "
                   "and group (CURE Figs. 7, 9: 3); the mean is over severities 1-5")
    p.add_argument("--rift-epochs", type=int, help="RiFT: fine-tuning epochs (paper: 10)")
    p.add_argument("--mrc-size", type=int, help="RiFT: training images whose adversarial examples define L_rob")
    # layerwise and analyze
    p.add_argument("--blocks", default=LAYERWISE_BLOCKS, help="layerwise: the U-b to train, comma-separated "
                   "(digits 1-4: ResNet stages layer1-4, 5: the classifier; default " + LAYERWISE_BLOCKS + ")")
    p.add_argument("--reinit", action=argparse.BooleanOptionalAction, default=True,
                   help="layerwise: re-initialise the trained blocks first (CURE Fig. 2b; --no-reinit: Fig. 11)")
    p.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=False,
                   help="layerwise: the frozen blocks' BatchNorm statistics stay fixed too (a strict freeze; "
                   "the official runs let them adapt)")
    p.add_argument("--eps-list", default="0.25,0.5,1,2,3,4,5,6,7,8",
                   help="analyze eps: the radii (/255) of PGD-20 (step eps/4; CURE Fig. 5b: 0.25 to 8)")
    p.add_argument("--eps-max", type=float, default=16.0, help="analyze minpert: largest eps searched (/255)")
    p.add_argument("--tol", type=float, default=0.25, help="analyze minpert: bisection tolerance (/255)")
    p.add_argument("--restarts", type=int, default=1, help="analyze minpert: PGD random restarts per eps")
    # compare
    p.add_argument("--methods", help="compare: methods to train (default: " + ",".join(COMPARE_METHODS) +
                   "; with --ablation: none besides the ablation's rows)")
    p.add_argument("--ablation", action="store_true",
                   help="compare: CURE's ablation (Table 7: neither part, RGP only, revision only, both) plus "
                        "CURE with beta 1 and the official variant, from one natural checkpoint")
    p.add_argument("--rift", action="store_true", help="compare: apply RiFT to each method's result")
    # bench
    p.add_argument("--reps", type=int, default=10, help="bench: timed repetitions")
    return p.parse_args(argv)


def default_beta(method):
    """The KL weight a method gets when --beta is not given: CURE's official 5, TRADES' 6."""
    return rf.CureConfig.beta if method == "cure" else 6.0


def learning_rates(args, lr_128, natural_lr_128):
    """(lr of the method asked for, lr of CURE's natural pre-training): --lr where given, else the
    preset's values for batch 128 scaled linearly with the batch, lr x batch / 128 (Goyal et al.,
    2017), so a smaller batch takes proportionally smaller steps. `natural` itself trains at the
    natural lr."""
    scale = args.batch_size / 128
    natural_lr = natural_lr_128 * scale
    if args.lr is not None:
        return args.lr, (args.lr if args.method == "natural" else natural_lr)
    return (natural_lr if args.method == "natural" else lr_128 * scale), natural_lr


def parse_milestones(text, epochs):
    """--milestones "E1,E2,...": strictly increasing epochs inside the run ('none': a constant lr)."""
    if text.strip().lower() == "none":
        return ()
    try:
        drops = tuple(int(e) for e in text.split(","))
    except ValueError:
        raise UsageError(f"--milestones {text!r} must be whole epochs, comma-separated, or 'none'") from None
    if any(not 0 < e < epochs for e in drops) or list(drops) != sorted(set(drops)):
        raise UsageError(f"--milestones {text!r} must be strictly increasing epochs in [1, --epochs={epochs})")
    return drops


def resolve(args):
    """Check every value, fill the preset's defaults in place, and return the args."""
    if args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose one of {list(METHODS)}")
    args.analysis = None
    if args.method == "analyze":                  # analyze ANALYSIS DATASET
        if args.dataset not in ANALYSES:
            raise UsageError(f"unknown analysis {args.dataset!r}; choose one of {list(ANALYSES)}")
        if args.analyze_dataset is None:
            raise UsageError(f"analyze {args.dataset} needs a dataset after it; choose one of {list(rf.DATASETS)}")
        args.analysis, args.dataset = args.dataset, args.analyze_dataset
    elif args.analyze_dataset is not None:
        raise UsageError(f"unexpected {args.analyze_dataset!r} after the dataset (only analyze takes two)")
    args.inits = args.init or []
    if len(args.inits) > 1 and args.method != "analyze":
        raise UsageError(f"--init given {len(args.inits)} times; only analyze takes several")
    args.init = args.inits[0] if args.inits else None
    args.trainable = None                         # set by layerwise for its stages
    allowed = BENCHES if args.method == "bench" else rf.DATASETS
    if args.dataset not in allowed:
        raise UsageError(f"unknown {'benchmark' if args.method == 'bench' else 'dataset'} "
                         f"{args.dataset!r}; choose one of {list(allowed)}")
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {list(PRESETS)}")
    args.batch_size_given, args.lr_given = args.batch_size is not None, args.lr is not None
    preset = dict(PRESETS[args.preset])
    if args.preset == "quick" and args.dataset == "synthetic":
        preset.update(SYNTHETIC_QUICK)
    if args.method == "natural" and args.epochs is None:
        args.epochs = args.natural_epochs or preset["natural_epochs"]   # one length for natural training
    lr_128, natural_lr_128 = preset.pop("lr"), preset.pop("natural_lr")
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.lr, args.natural_lr = learning_rates(args, lr_128, natural_lr_128)
    if args.milestones is not None:       # else `rf.lr_milestones` of each stage's epochs: 100, 150 of 200
        args.milestones = list(parse_milestones(args.milestones, args.epochs))
    if args.model not in rf.MODELS:
        raise UsageError(f"unknown model {args.model!r}; choose one of {sorted(rf.MODELS)}")
    args.zoo = check_zoo(args)
    if args.eps < 0:
        raise UsageError(f"--eps {args.eps} must be >= 0 (pixel units /255, e.g. 8)")
    for name in ("epochs", "batch_size", "width", "train_size", "test_size", "val_size", "aa_size"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "val_size" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {v} must be positive")
    if not 0 < args.revision_rate <= 1:
        raise UsageError(f"--revision-rate {args.revision_rate} must be in (0, 1]")
    if not 0 <= args.revision_decay < 1:
        raise UsageError(f"--revision-decay {args.revision_decay} must be in [0, 1)")
    if not 0 <= args.warmup_epochs < max(args.epochs, 1):
        raise UsageError(f"--warmup-epochs {args.warmup_epochs} must be in [0, --epochs={args.epochs})")
    attacks = [a for a in args.attacks.split(",") if a]
    bad = [a for a in attacks if a not in rf.EVAL_ATTACKS]
    if bad:
        raise UsageError(f"unknown attack {bad[0]!r}; choose from {sorted(rf.EVAL_ATTACKS)}")
    args.attacks = attacks
    if args.autoattack is None:                # on by default, in both presets (quick: on a subset)
        args.autoattack = rf.autoattack_available()
        if not args.autoattack and args.method not in ("bench", "natural"):
            print("run.py: AutoAttack is not installed (pip install pyautoattack): evaluating without it",
                  file=sys.stderr)
    elif args.autoattack and not rf.autoattack_available():
        raise UsageError("--autoattack needs an AutoAttack package: pip install pyautoattack "
                         "(or the official one: pip install git+https://github.com/fra31/auto-attack)")
    args.weight_decay_given, args.beta_given = args.weight_decay, args.beta   # compare's stages need them
    if args.weight_decay is None:
        args.weight_decay = WEIGHT_DECAY.get(args.method, 5e-4)
    if args.beta is None:
        args.beta = default_beta(args.method)
    if args.cure_variant not in rf.CURE_VARIANTS:
        raise UsageError(f"unknown --cure-variant {args.cure_variant!r}; choose one of {list(rf.CURE_VARIANTS)}")
    if args.amp not in ("none", "bf16"):
        raise UsageError(f"unknown --amp {args.amp!r}; choose one of ['none', 'bf16']")
    if args.channels_last is None:
        args.channels_last = torch.device(args.device).type == "cuda"
    for name, low, high in (("percentile", 0, 100), ("alpha", 0, 1), ("gamma", 0, math.inf), ("beta", 0, math.inf)):
        v = getattr(args, name)
        if v is not None and not low <= v <= high:    # also rejects NaN
            raise UsageError(f"--{name} {v} must be in [{low}, {high}]")
    if args.method == "bench" and args.dataset == "gpu" and torch.device(args.device).type != "cuda":
        found = "" if torch.cuda.is_available() else " (no CUDA device found)"
        raise UsageError(f"bench gpu is the acceptance run for a CUDA device and --device is {args.device}{found}; "
                         "on a CPU check the install with: TRITON_INTERPRET=1 python -m pytest -q test_robust_ft.py")
    if args.corruptions is None:
        args.corruptions = args.method == "rift"
    if args.severity not in (1, 2, 3, 4, 5):
        raise UsageError(f"--severity {args.severity} must be one of [1, 2, 3, 4, 5]")
    if args.cifar10c is not None and not os.path.isdir(args.cifar10c):
        raise UsageError(f"--cifar10c {args.cifar10c!r}: no such folder")
    if args.mrc_variant not in ("paper", "official"):
        raise UsageError(f"unknown --mrc-variant {args.mrc_variant!r}; choose one of ['paper', 'official']")
    if args.method == "layerwise":
        if not args.model.startswith("resnet"):
            raise UsageError(f"layerwise trains ResNet stages (layer1-4); --model {args.model!r} has none: "
                             f"choose one of {[m for m in rf.MODELS if m.startswith('resnet')]}")
        try:
            args.block_sets = [rf.layerwise_blocks(b) for b in args.blocks.split(",")]
        except ValueError as e:
            raise UsageError(f"--blocks {args.blocks!r}: {e}") from None
    if args.method == "analyze":
        if not args.inits:
            raise UsageError(f"analyze {args.analysis} needs --init CKPT (once per model to compare)")
        try:
            args.eps_values = [float(e) for e in args.eps_list.split(",")]
        except ValueError:
            raise UsageError(f"--eps-list {args.eps_list!r} must be numbers (/255), comma-separated") from None
        for name, v in (("--eps-max", args.eps_max), ("--tol", args.tol), ("--restarts", args.restarts),
                        *(("--eps-list", e) for e in args.eps_values)):
            if not v > 0:
                raise UsageError(f"{name} {v} must be > 0")
    if args.out is None:
        what = {"bench": "", "analyze": f"_{args.analysis}"}.get(args.method, f"_{args.zoo or args.model}")
        args.out = os.path.join("runs", f"{args.method}_{args.dataset}{what}")
    args.eps_px = args.eps / 255          # divided by 255 once, here
    args.step_px = args.eps_px / 4        # training attack step eps/4 = 2/255 (Madry et al., TRADES)
    return args


# -----------------------------------------------------------------------------
# Processes: one, or one per GPU (or CPU process) under torchrun; rank 0 alone prints and writes
# -----------------------------------------------------------------------------

def setup_distributed(args):
    """Join torchrun's process group when WORLD_SIZE > 1: nccl with GPU LOCAL_RANK per rank, or gloo
    for CPU processes. Sets args.rank, args.local_rank, args.world_size, args.backend (None in one
    process) and args.sync_bn. Ranks > 0 compute silently: their prints go nowhere, their errors to stderr."""
    args.world_size, args.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))        # the process's index on its machine
    cuda = torch.device(args.device).type == "cuda"
    args.backend = None
    if args.world_size == 1:
        args.sync_bn = False
        return
    if args.method == "bench":
        raise UsageError("bench times one process: run it with python, not torchrun")
    if args.batch_size % args.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch and must be divisible by the "
                         f"{args.world_size} processes; choose a multiple of {args.world_size}")
    if args.sync_bn and not cuda:
        raise UsageError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernels); CPU processes "
                         "keep per-rank BatchNorm statistics: drop --sync-bn or use --device cuda")
    args.sync_bn = cuda if args.sync_bn is None else args.sync_bn
    if cuda:
        torch.cuda.set_device(args.local_rank)
        args.device = f"cuda:{args.local_rank}"
    args.backend = "nccl" if cuda else "gloo"
    # The optimisers import torch._dynamo at their first step. Imported while a process group exists,
    # it keeps references to the group that destroy_process_group() does not drop (torch 2.6 to 2.15
    # at least), so gloo's threads outlive the group and can abort the process at exit ("terminate
    # called without an active exception"). Imported before the group exists, it holds none.
    importlib.import_module("torch._dynamo")
    dist.init_process_group(args.backend)
    if args.rank > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)


def leave_process_group():
    """dist.destroy_process_group(), with gloo's worker threads joined while the GIL is free.

    A gloo thread that finishes a collective after Python has dropped the collective's tensor frees
    that tensor's Python object, and needs the GIL for it. Before torch 2.8 the process group's
    destructor joins those threads holding the GIL (fixed by pytorch/pytorch#154976), so both wait
    forever: an exit that hangs now and then. The gloo backend's own binding releases the GIL when
    it is destroyed, so hold it past destroy_process_group() and let it go last."""
    # No other reference to the group may outlive this call: the group's destructor must run inside
    # destroy_process_group(), while `gloo` still holds the backend.
    gloo = dist.group.WORLD._get_backend(torch.device("cpu")) if dist.get_backend() == "gloo" else None
    dist.destroy_process_group()
    del gloo                                  # the last reference: joins gloo's threads, GIL released


def writer(args):
    """Whether this process writes files: always in one process, rank 0 alone under torchrun."""
    return args.rank == 0


def rank_seed(seed, rank):
    """The seed of rank `rank`'s global generator (the training attacks' random starts): each rank
    its own stream, none equal to the initialisation's `seed`."""
    return seed + 1_000_003 * (rank + 1)


def from_rank0(args, obj):
    """Rank 0's `obj` on every rank (a decision must not depend on float noise between ranks)."""
    if args.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


# -----------------------------------------------------------------------------
# Small helpers: progress with ETA, run records
# -----------------------------------------------------------------------------

class Progress:
    """Progress of a loop on stderr: on a terminal `label [i/n] elapsed ETA`, rewritten in place at
    most twice a second; otherwise (nohup, slurm, torchrun logs) a plain line every 5% of the loop,
    so a log file holds about 20 lines per loop instead of a carriage-return update per step."""

    def __init__(self, label, interactive=None):
        self.label, self.start, self.last, self.step = label, time.time(), 0.0, -1
        self.interactive = sys.stderr.isatty() if interactive is None else interactive

    def __call__(self, i, n):
        now = time.time()
        if self.interactive and now - self.last < 0.5 and i < n:
            return
        step = i * 20 // n                                   # 5% steps
        if not self.interactive and step == self.step:
            return
        self.last, self.step = now, step
        elapsed = now - self.start
        line = f"{self.label} [{i}/{n}] {elapsed:.0f}s, ETA {elapsed / i * (n - i):.0f}s"
        if self.interactive:
            print(f"\r{line}   ", end="\n" if i == n else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def versions():
    return {"python": platform.python_version(), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()}


def failures(metrics):
    """(evaluation, attack, message) for every attack that raised, in every evaluation of a run."""
    evaluations = {id(v): (k, v) for k, v in reversed(metrics.items()) if isinstance(v, dict)}  # rift: test is after
    return [(key, name, msg) for key, value in evaluations.values() for name, msg in value.get("failed", {}).items()]


def finish(args, metrics):
    """Write OUT/metrics.json and print the same object as the last stdout line.

    If an attack failed, the metrics (with the others' results) are still written and printed,
    each failure is named in one line on stderr, and the exit code is 1.
    """
    if writer(args):
        os.makedirs(args.out, exist_ok=True)
        rf.save_json(os.path.join(args.out, "metrics.json"), metrics)
    print(json.dumps(metrics))
    failed = failures(metrics)
    for key, name, msg in failed:
        print(f"run.py: error: {name} failed in the {key} evaluation ({msg}); the other results are in "
              f"{os.path.join(args.out, 'metrics.json')}", file=sys.stderr)
    if failed:
        sys.exit(1)
    return metrics


def evaluate_into(args, metrics, key, model, split, autoattack=False):
    """metrics[key] = the evaluation of `model` on `split` (with NRR), saved as each attack finishes.

    After every attack, metrics.json is rewritten with `"status": "evaluating"` and one line goes to
    log.jsonl, so a crash loses nothing that finished; AutoAttack keeps its per-batch state in
    OUT/autoattack_KEY.json, so a rerun continues it.
    """
    os.makedirs(args.out, exist_ok=True)
    logged, last = set(), [time.time()]

    def on_result(partial):
        metrics[key] = with_nrr(dict(partial))
        if not writer(args):
            return
        rf.save_json(os.path.join(args.out, "metrics.json"), dict(metrics, status="evaluating"))
        now = time.time()
        for name in [*partial["counts"], *partial.get("failed", {})]:
            if name in logged:
                continue
            logged.add(name)
            n = partial.get("n_autoattack", partial["n"]) if name == "autoattack" else partial["n"]
            line = dict(evaluation=key, attack=name, n=n, seconds=now - last[0])
            if name in partial.get("failed", {}):
                line["failed"] = partial["failed"][name]
                print(f"{key}: {name} FAILED: {line['failed']}", file=sys.stderr)
            else:
                line["accuracy"] = partial[name]
                print(f"{key}: {name} {partial[name]:.2f}% (n={n}, {line['seconds']:.0f}s)", file=sys.stderr)
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
        last[0] = now

    result = rf.evaluate(model, split, args.attacks, args.eps_px, autoattack=autoattack, aa_size=args.aa_size,
                         aa_state_path=os.path.join(args.out, f"autoattack_{key}.json"), seed=args.seed,
                         progress=Progress(f"{key}"), on_result=on_result, rank=args.rank,
                         world_size=args.world_size)
    metrics[key] = with_nrr(result)
    return metrics[key]


# -----------------------------------------------------------------------------
# Data and model set-up
# -----------------------------------------------------------------------------

def setup_data(args):
    """Train / validation / test splits on the device, as the preset sizes them. Under torchrun the
    first process of each machine loads (and downloads) first, the others after it."""
    first = args.local_rank == 0
    if args.world_size > 1 and not first:
        dist.barrier()
    try:
        data = rf.load_data(args.dataset, args.data_dir, args.holdout_per_class, seed=args.seed)
    except RuntimeError as e:              # no download and no local copy: name the flag
        raise UsageError(f"{e} (--data-dir {args.data_dir})") from None
    if args.world_size > 1 and first:
        dist.barrier()
    train, val = rf.split_validation(data.train, args.val_size, seed=args.seed)
    if args.train_size is not None and args.train_size < len(train):
        train = train.subset(slice(0, args.train_size))
    test = data.test
    if args.test_size is not None and args.test_size < len(test):   # a fixed random subset (all classes)
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.test_size])
    dev = torch.device(args.device)
    return data, train.to(dev), val.to(dev), test.to(dev)


def load_weights(path, model, option="--init", hint="check --model and --width"):
    """A run's checkpoint.pt (its "model" entry) or a plain state dict from `path` into `model`."""
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path!r}: no such checkpoint file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    try:
        rf.load_state_dict_checked(model, state, source=f"checkpoint {path!r}", hint=hint)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ckpt


def setup_model(args, data):
    if args.zoo:
        model = zoo_model(args, data)
    else:
        model = rf.build_model(args.model, data.num_classes, args.width, data.mean, data.std)
        if args.init:
            load_weights(args.init, model)
    model = model.to(args.device)
    # channels_last weights make cuDNN pick NHWC kernels (faster with tensor cores) and give
    # channels_last gradients, which the fused RGP mask reads as they are (no copies)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


# --- RobustBench models: --init robustbench:NAME (eval and rift) -------------------------------------

ZOO_PREFIX = "robustbench:"
ZOO_DATASETS = ("cifar10", "cifar100", "folder", "synthetic")   # folder, synthetic: when the class counts match


def check_zoo(args):
    """--init robustbench:NAME: the checks that need no data. Returns NAME, or None for a file --init."""
    if not (args.init or "").startswith(ZOO_PREFIX):
        if args.init_weights:
            raise UsageError("--init-weights needs --init robustbench:NAME (a checkpoint of this project's "
                             "models goes in --init itself)")
        return None
    name = args.init[len(ZOO_PREFIX):]
    if args.method not in ("eval", "rift", "analyze"):
        raise UsageError(f"--init {args.init!r} works with eval, rift and analyze, not {args.method!r}")
    if args.dataset not in ZOO_DATASETS:
        raise UsageError(f"--init {args.init!r} needs a dataset in {list(ZOO_DATASETS)}, not {args.dataset!r}")
    zoos = [args.dataset] if args.dataset in rf.ROBUSTBENCH_CLASSES else list(rf.ROBUSTBENCH_CLASSES)
    try:
        if not any(name in rf.robustbench_zoo(d) for d in zoos):
            rf.robustbench_entry(name, zoos[0])          # raises, naming the zoo's models
    except (ImportError, ValueError) as e:               # not installed, or an unknown NAME
        raise UsageError(str(e)) from None
    return name


def zoo_dataset(args, num_classes):
    """The RobustBench zoo NAME comes from: the dataset's own for cifar10 and cifar100; for folder and
    synthetic data, the zoo (CIFAR-10 or CIFAR-100) holding NAME whose class count is the data's."""
    if args.dataset in rf.ROBUSTBENCH_CLASSES:
        return args.dataset
    holding = [d for d in rf.ROBUSTBENCH_CLASSES if args.zoo in rf.robustbench_zoo(d)]
    for d in holding:
        if rf.ROBUSTBENCH_CLASSES[d] == num_classes:
            return d
    counts = " or ".join(f"{rf.ROBUSTBENCH_CLASSES[d]} ({d})" for d in holding)
    raise UsageError(f"--init {args.init!r} has {counts} classes, the {args.dataset} data has {num_classes}")


def zoo_model(args, data):
    """--init robustbench:NAME: the zoo model, with its checkpoint from --model-dir (downloaded there
    when missing and online) or with --init-weights in its architecture. Sets args.zoo_dataset."""
    args.zoo_dataset = zoo_dataset(args, data.num_classes)
    if args.init_weights:
        model = rf.robustbench_architecture(args.zoo, args.zoo_dataset)
        load_weights(args.init_weights, model, "--init-weights", hint=f"it must be a state dict of {args.init}")
        return model
    return rf.load_robustbench_model(args.zoo, args.zoo_dataset, args.model_dir)


def model_record(args):
    """The model fields of metrics.json: this project's model and width, or the zoo model and the
    file its weights came from."""
    if not args.zoo:
        return dict(model=args.model, width=args.width)
    weights = args.init_weights or ", ".join(rf.robustbench_files(args.zoo, args.zoo_dataset, args.model_dir))
    return dict(model=args.init, width=None, weights=weights)


def setup_device(args):
    """The GPU settings that keep the method exact: cuDNN autotuning and TF32 (10-bit mantissa
    inputs, float32 accumulation) for convolutions and matmuls on CUDA. Returns them for the record."""
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    # On a CPU, channels_last is only the GPU path checked: oneDNN's backward of a strided 1x1
    # convolution in channels_last (ResNet shortcuts) aborts with a double free on some x86 CPUs
    # (seen on an AMD EPYC with torch 2.14.1 and 2.15.0), so it runs on PyTorch's own kernels there.
    onednn = cuda or not args.channels_last
    if not cuda:
        torch.backends.mkldnn.enabled = onednn
    return dict(cudnn_benchmark=cuda, tf32=cuda and args.tf32, channels_last=args.channels_last, amp=args.amp,
                onednn=onednn)


def mask_function(device):
    """CURE's RGP mask on `device`: on CUDA the fused Triton kernels, checked against the plain path
    on first use (`kernels.CheckedFusedMask`, which falls back by itself); elsewhere `rf.rgp_mask_`."""
    if torch.device(device).type == "cuda":
        import kernels
        return kernels.CheckedFusedMask()
    return rf.rgp_mask_


def mask_path(mask_fn):
    """Which mask path ran: "fused", "plain" or "plain after a fused mismatch"."""
    return getattr(mask_fn, "path", None) or "plain"


def autocast(amp, device):
    """bf16 autocast on `device` when amp == "bf16" (else a context that does nothing): the forwards,
    and so the training attack, run in bf16; parameters, their gradients and the optimiser stay float32.

    The cast-weight cache is off: the TRADES/CURE attack's first forward runs under no_grad, and
    PyTorch 2.6 then reuses those detached casts in the training forward, so the
    parameters get no gradient (autograd.grad raises; backward() leaves .grad None, silently).
    """
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16",
                          cache_enabled=False)


def with_amp(step, amp, device):
    """`step` under `autocast(amp, device)`."""
    if amp == "none":
        return step

    def step_bf16(model, optimizer, x, y):
        with autocast(amp, device):
            return step(model, optimizer, x, y)
    return step_bf16


# -----------------------------------------------------------------------------
# Training: one loop for natural, AT, TRADES and CURE
# -----------------------------------------------------------------------------

@dataclass
class CureRun:
    """What a CURE run carries from step to step besides the model and the optimiser."""
    cfg: rf.CureConfig
    revision: rf.Revision
    schedule: rf.CureSchedule
    coin: torch.Generator          # the revision draws (seeded alike on every rank)
    mask_fn: object                # rf.rgp_mask_ or the fused kernels' checked dispatcher
    updated: dict = field(default_factory=dict)   # updated entries per masked tensor, this epoch


def cure_run(cfg, model, total_steps, seed, device):
    """A fresh CureRun for a run of `total_steps` CURE steps from `model`."""
    return CureRun(cfg, rf.cure_revision(model, cfg), rf.CureSchedule.for_run(cfg, total_steps),
                   torch.Generator().manual_seed(seed), mask_function(device))


def method_step(args, method, cure=None, average=None):
    """The per-batch step for `method`, a function (model, optimizer, x, y) -> loss; `cure` is the
    CureRun of a CURE run; `average` is `rf.gradient_averager`'s (None in one process)."""
    eps, step_size, k = args.eps_px, args.step_px, args.attack_steps
    if method == "natural":
        return lambda m, o, x, y: rf.natural_step(m, o, x, y, average)
    if method == "at":
        return lambda m, o, x, y: rf.at_step(m, o, x, y, eps, step_size, k, average)
    if method == "trades":
        return lambda m, o, x, y: rf.trades_step(m, o, x, y, eps, step_size, k, args.beta, average)
    return lambda m, o, x, y: rf.cure_step(m, o, x, y, cure.revision, cure.cfg, cure.schedule, cure.coin,
                                           eps, step_size, k, cure.mask_fn, cure.updated, average)


def cure_config(args, model):
    cfg = rf.cure_defaults(args.model, args.dataset)
    exclude = () if args.mask_classifier else (rf.classifier_name(model),)
    return rf.CureConfig(
        percentile=cfg.percentile if args.percentile is None else args.percentile,
        alpha=cfg.alpha if args.alpha is None else args.alpha,
        gamma=cfg.gamma if args.gamma is None else args.gamma,
        beta=args.beta, rate=args.revision_rate, decay=args.revision_decay, exclude=exclude,
        variant=args.cure_variant)


def train(args, method, data, train_split, val, out, init_model=None):
    """Train `method` into run directory `out`, resuming from out/checkpoint.pt with --resume.

    Returns (model, revision or None, record) where record holds per-epoch logs and timings.
    """
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise UsageError(f"{out!r} already holds a run; pass --resume to continue it or choose another --out")
    if writer(args):
        rf.save_json(os.path.join(out, "config.json"), config_record(args, method))
    torch.manual_seed(args.seed)
    model = init_model if init_model is not None else setup_model(args, data)
    if args.world_size > 1:
        if args.sync_bn:           # BatchNorm statistics over the global batch (CUDA only)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        rf.broadcast_(list(model.state_dict().values()), args.world_size)   # one start on every rank
        torch.manual_seed(rank_seed(args.seed, args.rank))                  # each rank its own attack noise
    if args.trainable is not None:         # the layer-wise study: only these blocks train
        if args.reinit:                    # (a resumed run then loads its own weights over these)
            rf.reinitialize_(model, [p for p in args.trainable if p not in rf.LAYERWISE_STEM],
                             torch.Generator().manual_seed(args.seed))
        rf.freeze_all_but(model, args.trainable)
        if args.freeze_bn:
            rf.freeze_bn_(model, args.trainable)
    average = rf.gradient_averager(model, args.world_size)   # None in one process
    epochs = args.epochs if method != "natural" or args.method == "natural" else args.natural_epochs
    # --weight-decay, --lr and --milestones apply to the method asked for; CURE's natural
    # pre-training keeps its own.
    own = method == args.method
    weight_decay = args.weight_decay if own else WEIGHT_DECAY[method]
    base_lr = args.lr if own else args.natural_lr
    milestones = args.milestones if own and args.milestones is not None else rf.lr_milestones(epochs)
    optimizer = rf.make_optimizer(model, base_lr, weight_decay)
    generator = torch.Generator().manual_seed(args.seed)            # data order and augmentation
    steps_per_epoch = max(1, len(train_split) // args.batch_size)
    cure = None
    if method == "cure":
        cfg = cure_config(args, model)
        total = (epochs - args.warmup_epochs) * steps_per_epoch       # CURE steps: r_t reaches r/10 at the end
        cure = cure_run(cfg, model, total, args.seed + 1, args.device)
        print(f"CURE ({cfg.variant} variant): p={cfg.percentile} alpha={cfg.alpha} gamma={cfg.gamma} beta={cfg.beta} "
              f"r={cfg.rate} d={cure.schedule.run_decay:.6f} (paper d={cfg.decay}, {total} steps)", file=sys.stderr)
    record = dict(log=[], epoch_seconds=[], best=None)
    from_trained = init_model is not None or args.init is not None   # judged from its first epoch on
    stats = TrainingStats(model, optimizer, cure)
    start_epoch = 0
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=args.device, weights_only=False)
        rf.load_state_dict_checked(model, ck["model"], f"checkpoint {ckpt_path!r}")
        optimizer.load_state_dict(ck["optimizer"])
        generator.set_state(ck["generator"])
        restore_rng(args, ck)
        record = ck["record"]
        start_epoch = ck["epoch"]
        if cure is not None:
            cure.revision.model.load_state_dict(ck["revision"])
            cure.revision.updates = ck["revision_updates"]
            # checkpoints written before the key was named revision_coin still resume
            cure.coin.set_state(ck["revision_coin"] if "revision_coin" in ck else ck["revision_generator"])
            cure.schedule.t = ck["cure_step"]
            if "stats" in ck:              # (checkpoints written before the per-phase shares have none)
                stats.load_state_dict(ck["stats"])
        print(f"resumed {out} at epoch {start_epoch}/{epochs}", file=sys.stderr)
    step_fn = method_step(args, method, cure, average)
    shard = dict(rank=args.rank, world_size=args.world_size)
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        lr = rf.step_lr(base_lr, epoch, milestones)
        warm = method == "cure" and epoch < args.warmup_epochs               # CURE-Eff warm-up
        fn = with_amp(method_step(args, "natural", average=average) if warm else step_fn, args.amp, args.device)
        if cure is not None:
            cure.updated.clear()
        loss = rf.train_epoch(model, optimizer, fn, train_split, args.batch_size, lr, generator,
                              Progress(f"{method} epoch {epoch + 1}/{epochs}"), **shard)
        seconds = time.time() - t0
        entry = dict(epoch=epoch + 1, lr=lr, loss=loss, seconds=seconds, **stats.epoch_end())
        eval_split = val.subset(slice(0, args.epoch_eval_size))
        entry["val"] = rf.evaluate(model, eval_split, ["pgd20"], args.eps_px, seed=args.seed, **shard)
        if cure is not None:
            if warm:
                cure.revision = rf.cure_revision(model, cure.cfg)    # revise from where adversarial training starts
                stats.phase_end("warm-up")          # natural steps: the update counts start with CURE's
            else:
                entry["val_revision"] = rf.evaluate(cure.revision.model, eval_split, ["pgd20"], args.eps_px,
                                                    seed=args.seed, **shard)
                numel = dict(rf.masked_parameters(model))
                entry["updated_fraction"] = {n: float(c) / (numel[n].numel() * steps_per_epoch)
                                             for n, c in cure.updated.items()}
                phase = rf.training_phase(epoch - args.warmup_epochs, epochs - args.warmup_epochs)
                last = epoch + 1 == epochs or phase != rf.training_phase(epoch + 1 - args.warmup_epochs,
                                                                           epochs - args.warmup_epochs)
                if last:                   # the phase ends with this epoch
                    entry["update_shares"] = stats.phase_end(PHASES[phase])
        if from_trained and note_collapse(args, record, method, epoch + 1, entry["val"], "validation",
                                          data.num_classes):
            entry["collapsed"] = record["collapsed"]
        record["log"].append(entry)
        record["epoch_seconds"].append(seconds)
        key = "clean" if method == "natural" else "pgd20"   # selection metric on the validation split
        if record["best"] is None or entry["val"][key] >= record["best"]["val"][key]:
            record["best"] = dict(epoch=epoch + 1, val=entry["val"],
                                  model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        if writer(args):
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps({k: v for k, v in entry.items()}) + "\n")
        v = entry["val"]
        print(f"{method} epoch {epoch + 1}/{epochs}: loss {loss:.4f}, val clean {v['clean']:.1f}% "
              f"PGD-20 {v['pgd20']:.1f}% (n={v['n']}), {seconds:.1f}s", file=sys.stderr)
        rng = rf.rng_state()
        rng_per_rank = None
        if args.world_size > 1:    # every rank's attack noise, so --resume continues each exactly
            rng_per_rank = [None] * args.world_size
            dist.all_gather_object(rng_per_rank, rng)
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1,
                     generator=generator.get_state(), rng=rng, rng_per_rank=rng_per_rank, record=record,
                     config=config_record(args, method), method=method)
        if cure is not None:
            state.update(revision=cure.revision.model.state_dict(), revision_updates=cure.revision.updates,
                         revision_coin=cure.coin.get_state(), cure_step=cure.schedule.t,
                         stats=stats.state_dict())
        if writer(args):
            rf.save_checkpoint(ckpt_path, **state)
    # which RGP mask path ran in this process (CURE only): fused, plain, or plain after a mismatch
    record["mask_path"] = None if cure is None else (
        "official (plain)" if cure.cfg.variant == "official" else mask_path(cure.mask_fn))
    return model, (cure.revision if cure else None), record


PHASES = ("initial", "middle", "final")   # thirds of the (CURE) epochs, CURE Figs. 6b and 10


class TrainingStats:
    """What a training run logs about its gradients besides the loss, taken by an optimiser step
    pre-hook, where p.grad holds the step's final gradient for every method (averaged over the
    ranks; CURE's after its mask, as `cure_update_` applies it):
    - every epoch, the mean |g| of each block's conv2 weights (CURE Fig. 6a; `rf.conv2_names`);
    - CURE: per masked entry, the steps in which it was updated (its gradient kept by the mask),
      read at the end of each phase as the share updated at least once and never (Figs. 6b, 10).
    On the device, read once per epoch (magnitudes) and once per phase (shares): 1 + 2 launches per
    conv2 tensor, and 2 per masked tensor for CURE, per step; CURE's counts are int32 per entry."""

    def __init__(self, model, optimizer, cure=None):
        params = dict(model.named_parameters())
        self.conv2_names = rf.conv2_names(model)
        self.conv2 = [params[n] for n in self.conv2_names]
        device = next(model.parameters()).device
        self.magnitudes = torch.zeros(len(self.conv2), device=device)
        self.masked_names = [n for n, _ in rf.cure_masked(model, cure.cfg)] if cure is not None else []
        self.masked = [params[n] for n in self.masked_names]
        self.counts = [torch.zeros_like(p, dtype=torch.int32) for p in self.masked]
        self.steps, self.phase_steps = 0, 0
        optimizer.register_step_pre_hook(self._step)

    def _step(self, optimizer, args, kwargs):      # returns None: the step's arguments unchanged
        if any(p.grad is not None for p in self.conv2):
            self.magnitudes.add_(rf.gradient_magnitudes([p.grad for p in self.conv2]))
        if self.masked:
            rf.count_updates_(self.counts, [p.grad for p in self.masked])
        self.steps += 1
        self.phase_steps += 1

    def epoch_end(self):
        """{"grad_magnitude": {conv2 name: mean |g| over this epoch's steps}} (empty without conv2)."""
        if not self.conv2 or not self.steps:
            return {}
        values = (self.magnitudes / self.steps).tolist()
        self.magnitudes.zero_()
        self.steps = 0
        return {"grad_magnitude": dict(zip(self.conv2_names, values))}

    def phase_end(self, phase):
        """The shares of a phase that just ended; the counts start again."""
        shares = rf.update_shares({phase: dict(zip(self.masked_names, self.counts))}, {phase: self.phase_steps})[phase]
        for c in self.counts:
            c.zero_()
        steps, self.phase_steps = self.phase_steps, 0
        return dict(phase=phase, steps=steps, updated={n: v["updated"] for n, v in shares.items()},
                    never={n: v["never"] for n, v in shares.items()})

    def state_dict(self):
        return dict(counts=[c.cpu() for c in self.counts], phase_steps=self.phase_steps)

    def load_state_dict(self, state):
        for c, saved in zip(self.counts, state["counts"]):
            c.copy_(saved)
        self.phase_steps = state["phase_steps"]


def restore_rng(args, ck):
    """The global generators as the checkpoint left them: this rank's own state when the run had
    as many processes; otherwise (another process count) each rank is reseeded, and only the
    attacks' random starts differ from an uninterrupted run."""
    per_rank = ck.get("rng_per_rank")
    if args.world_size == 1:
        rf.set_rng_state(ck["rng"])
    elif per_rank is not None and len(per_rank) == args.world_size:
        rf.set_rng_state(per_rank[args.rank])
    else:
        torch.manual_seed(rank_seed(args.seed + ck["epoch"], args.rank))
        print(f"the checkpoint was written by {len(per_rank or [None])} process(es), this run has "
              f"{args.world_size}: the attacks' random starts are reseeded (data order, weights, optimiser "
              f"and CURE's revision continue exactly)", file=sys.stderr)


def note_collapse(args, record, method, epoch, result, images, num_classes, which=""):
    """The first collapse of a run: when `result` (measured on `images` images) shows one
    (`rf.collapsed`) and `record` holds none yet, say on stderr, in one line, that `method` (`which`
    model of it, if given) collapsed at `epoch`, with the flags that move it, and store
    record["collapsed"]. Returns that entry, or None."""
    if "collapsed" in record or "clean" not in result or not rf.collapsed(result, num_classes):
        return None
    lr = args.lr if method != "rift" or args.lr_given else 1e-3      # RiFT fine-tunes at 1e-3 by default
    levers = f"--lr (now {lr:g})" if method == args.method else "--lr"
    if method in ("trades", "cure"):
        levers += f" or --beta (now {args.beta:g})"
    print(f"run.py: warning: {method}{which} collapsed at epoch {epoch}: one class takes {result['top_class_share']:.1f}% "
          f"of the predictions on {result['n']} {images} images, clean accuracy {result['clean']:.1f}% "
          f"(chance {100 / num_classes:.1f}%); lower {levers}", file=sys.stderr)
    record["collapsed"] = dict(epoch=epoch, top_class_share=result["top_class_share"], clean=result["clean"],
                               on=images + which)
    return record["collapsed"]


def config_record(args, method):
    cfg = {k: v for k, v in vars(args).items()
           if isinstance(v, (int, float, str, bool, list, type(None))) and k not in ("rank", "local_rank")}
    cfg.update(method=method, versions=versions(), device_settings=args.device_settings)
    return cfg


def final_metrics(args, model, test, record, method, num_classes, revision=None):
    """Evaluate the last model (with AutoAttack when on), the best-on-validation one and CURE's
    revision model on the test split, saving metrics.json as each attack finishes. A collapse
    (`rf.collapsed`), seen during training or now on the test split, is recorded as "collapsed"."""
    best = record.get("best")
    metrics = dict(method=method, dataset=args.dataset, model=args.model, width=args.width,
                   epochs=len(record["log"]), device=str(args.device), preset=args.preset, seed=args.seed,
                   seconds_per_epoch=sum(record["epoch_seconds"]) / max(1, len(record["epoch_seconds"])),
                   train_seconds=sum(record["epoch_seconds"]), mask_path=record.get("mask_path"),
                   device_settings=args.device_settings, world_size=args.world_size, backend=args.backend)
    if best is not None:
        metrics["best_epoch"] = best["epoch"]
    evaluate_into(args, metrics, "test", model, test, autoattack=args.autoattack)
    note_collapse(args, record, method, len(record["log"]), metrics["test"], "test", num_classes)
    if "collapsed" in record:
        metrics["collapsed"] = record["collapsed"]
    if best is not None and best["epoch"] != len(record["log"]):
        selected = copy.deepcopy(model)
        selected.load_state_dict(best["model"])
        evaluate_into(args, metrics, "test_best", selected, test)
    if revision is not None:
        evaluate_into(args, metrics, "test_revision", revision.model, test)
    return metrics


def nrr_robust(result):
    """The robust accuracy NRR (Eq. 9) is taken against: CW when it ran (the paper's), else the
    per-example worst case; None when no attack covered the split."""
    return result.get("cw", result.get("worst"))


def with_nrr(result):
    """Add NRR (Eq. 9) against `nrr_robust`, and "nrr_autoattack" against AutoAttack (Tables 7-8),
    with the clean accuracy of the same images; beside each, CURE Table 8's SUM = Nat + Rob
    ("sum", "sum_autoattack")."""
    rob = nrr_robust(result)
    if rob is not None and "clean" in result:
        result["nrr"] = rf.nrr(result["clean"], rob)
        result["sum"] = result["clean"] + rob
    if "autoattack" in result:
        clean = result.get("clean_autoattack", result["clean"])
        result["nrr_autoattack"] = rf.nrr(clean, result["autoattack"])
        result["sum_autoattack"] = clean + result["autoattack"]
    return result


# -----------------------------------------------------------------------------
# Commands
# -----------------------------------------------------------------------------

def cmd_train(args):
    start = time.time()
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
            model = train(args, "natural", data, train_split, val, nat_dir)[0]
            args.resume = resume
    model, revision, record = train(args, args.method, data, train_split, val, args.out, model)
    metrics = final_metrics(args, model, test, record, args.method, data.num_classes, revision)
    if args.corruptions:
        corruptions_into(args, metrics["test"], model, test, corruption_files(args))
    metrics["wall_seconds"] = time.time() - start   # this invocation (a resumed run: since resuming)
    return finish(args, metrics)


def corruption_files(args):
    """--cifar10c's corrupted test set ({name: {severity: Split}}), or None to generate them."""
    try:
        return rf.load_corrupted(args.cifar10c, num=args.test_size) if args.cifar10c else None
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--cifar10c: {e}") from None


def corruptions_into(args, record, model, test, files):
    """Accuracy under corruptions into `record`: "corruption" (the mean over corruptions and severities)
    and "corruptions" (per corruption and group, over severities 1-5 and at --severity)."""
    r = rf.corruption_accuracy(model, test, files=files, seed=args.seed)
    at = {name: accs[args.severity] for name, accs in r["severity"].items() if args.severity in accs}
    record["corruption"] = r["mean"]
    record["corruptions"] = dict(
        n=r["n"], source=args.cifar10c or "generated", per_type={name: r[name] for name in r["severity"]},
        groups=r["groups"], severity=args.severity, per_type_at_severity=at, groups_at_severity=rf.corruption_groups(at),
        by_severity={name: {str(s): a for s, a in accs.items()} for name, accs in r["severity"].items()})
    print(f"corruptions ({record['corruptions']['source']}): mean {r['mean']:.2f}%; at severity {args.severity}: "
          + ", ".join(f"{g} {a:.1f}" for g, a in record["corruptions"]["groups_at_severity"].items()), file=sys.stderr)
    return record


def cmd_eval(args):
    if not args.init:
        raise UsageError("eval needs --init CKPT or --init robustbench:NAME (the model to evaluate)")
    data, _, _, test = setup_data(args)
    model = setup_model(args, data)
    metrics = dict(method="eval", checkpoint=args.init, dataset=args.dataset, **model_record(args),
                   device=str(args.device), world_size=args.world_size, backend=args.backend)
    evaluate_into(args, metrics, "test", model, test, autoattack=args.autoattack)
    if args.corruptions:
        corruptions_into(args, metrics["test"], model, test, corruption_files(args))
    return finish(args, metrics)


# -----------------------------------------------------------------------------
# RiFT: MRC ranking, fine-tune the least robust-critical module, interpolate, evaluate
# -----------------------------------------------------------------------------

def cmd_rift(args):
    start = time.time()
    if not args.init:
        raise UsageError("rift needs --init CKPT (an AT, TRADES or CURE checkpoint) or --init robustbench:NAME")
    data, train_split, val, test = setup_data(args)
    model = setup_model(args, data).eval()
    rf.broadcast_(list(model.state_dict().values()), args.world_size)      # one start on every rank
    if args.module is not None and args.module not in rf.rift_modules(model):
        raise UsageError(f"unknown --module {args.module!r}; choose one of {rf.rift_modules(model)}")
    shard = dict(rank=args.rank, world_size=args.world_size)
    result = dict(method="rift", checkpoint=args.init, dataset=args.dataset, **model_record(args),
                  device=str(args.device), world_size=args.world_size, backend=args.backend)
    if args.mrc_only:                  # the ranking alone (every rank computes it: it is not sharded)
        mrc = rf.rift_mrc(model, train_split, args.mrc_size, args.eps_px, args.step_px, variant=args.mrc_variant,
                          batch_size=args.batch_size, seed=args.seed, progress=Progress("MRC"))
        print_mrc(mrc)
        result.update(mrc=mrc, mrc_examples=min(args.mrc_size, len(train_split)), module=from_rank0(args, rf.non_robust_critical_module(mrc)),
                      wall_seconds=time.time() - start)
        return finish(args, result)
    bars = {}
    found = rf.rift(model, train_split, val, args.module, args.eps_px, args.step_px, args.mrc_size,
                    mrc_variant=args.mrc_variant, epochs=args.rift_epochs, lr=args.lr if args.lr_given else 1e-3,
                    weight_decay=args.weight_decay, batch_size=args.batch_size, tolerance=args.tolerance,
                    seed=args.seed, progress=lambda stage, i, n: bars.setdefault(stage, Progress(stage))(i, n),
                    **shard)
    if found.mrc:
        print_mrc(found.mrc)
        result.update(mrc=found.mrc, mrc_examples=min(args.mrc_size, len(train_split)))
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(found.state)
    result.update(module=found.module, alphas=found.alphas, alpha=found.alpha, tolerance=args.tolerance)
    files = corruption_files(args) if args.corruptions else None
    for key, m in (("before", model), ("after", tuned)):   # one seed: the same random starts, paired
        evaluate_into(args, result, key, m, test, autoattack=args.autoattack)
        if args.corruptions:
            corruptions_into(args, result[key], m, test, files)
    tuned = [(r | dict(n=len(val)), "validation", " (the fine-tuned weights, alpha 1)")
             for r in found.alphas if r["alpha"] == 1.0]
    for r, images, which in [*tuned, (result["after"], "test", "")]:     # theta_FT, then what RiFT returns
        note_collapse(args, result, "rift", args.rift_epochs, r, images, data.num_classes, which)
    result.update(test=result["after"], wall_seconds=time.time() - start)
    if args.zoo:   # also a plain state dict (on the CPU), the form RobustBench's loaders and --init-weights read
        result["state_dict"] = os.path.join(args.out, "model.pt")
    if writer(args):
        os.makedirs(args.out, exist_ok=True)
        rf.save_checkpoint(os.path.join(args.out, "checkpoint.pt"), model=found.state, alpha=found.alpha,
                           module=found.module, config=config_record(args, "rift"))
        if args.zoo:
            rf.save_checkpoint(result["state_dict"],
                               **{k: v.detach().cpu().contiguous() for k, v in found.state.items()})
    print_rift(result)
    return finish(args, result)


def print_mrc(mrc):
    print("MRC ranking (lowest = non-robust-critical):", file=sys.stderr)
    for name, value in mrc.items():
        print(f"  {value:10.5f}  {name}", file=sys.stderr)


def print_rift(result):
    """The alpha sweep on the validation split, then before/after on the test split."""
    for row in result["alphas"]:
        print(f"  alpha {row['alpha']:.1f}: val clean {row['clean']:.2f}%  PGD-10 {row['pgd10']:.2f}%",
              file=sys.stderr)
    print(f"RiFT on {result['module']}: alpha {result['alpha']}", file=sys.stderr)
    print(f"{'':8}{'clean':>8}{'PGD-20':>8}{'CW':>8}{'corrupt':>9}", file=sys.stderr)
    for label in ("before", "after"):
        r = result[label]
        print(f"{label:8}{r['clean']:8.2f}{r.get('pgd20', float('nan')):8.2f}{r.get('cw', float('nan')):8.2f}"
              f"{r.get('corruption', float('nan')):9.2f}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Benchmarks: `bench step` (TRADES vs CURE step) and `bench mask` (fused vs plain RGP mask)
# -----------------------------------------------------------------------------

def official_style_cure_step(model, optimizer, x, y, revision, cfg, schedule, coin, eps, step_size, steps):
    """The official CURE code's structure, RE-CREATED FOR THE BENCHMARK (the paper variant's maths):
    four backward passes (CE nat, CE adv, KL, L_CR) into .grad with copies in between, and a
    NumPy percentile per tensor after a device-to-host copy of every gradient. The one place in
    run.py that differentiates by itself: it times the official structure, not ours."""
    import kernels
    x_adv = rf.pgd(model, x, y, eps, step_size, steps, loss="kl")
    rev_nat, rev_adv = revision.targets(x, x_adv)
    _, ce_nat, ce_adv, kl, l_cr = rf.cure_losses(model, x, x_adv, y, rev_nat, rev_adv)
    terms = [ce_nat, ce_adv, cfg.beta * kl, cfg.gamma * l_cr]
    grads = []
    for term in terms:
        optimizer.zero_grad()
        term.backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = grads[0][i] + grads[2][i] + grads[3][i]
    masked = [i for i, p in enumerate(params) if p.ndim >= 2]
    kernels.numpy_rgp_mask_([params[i].grad for i in masked], [grads[0][i] for i in masked],
                            [grads[1][i] for i in masked], cfg.alpha, cfg.percentile)
    rf.cure_update_(model, optimizer, [p.grad for p in params], revision, cfg, schedule, coin)   # SGD, Eq. 7
    return (terms[0] + terms[2] + terms[3]).detach()


def bench_step(args):
    """Time one training step of TRADES, of CURE, and of the official CURE structure."""
    on_cuda = torch.device(args.device).type == "cuda"
    width = 16 if args.width is None else args.width
    batch = args.batch_size if args.batch_size_given else 64
    result = dict(bench="step", device=str(args.device),
                  device_name=torch.cuda.get_device_name(args.device) if on_cuda else cpu_name(),
                  model=args.model, width=width, batch=batch, attack_steps=args.attack_steps, reps=args.reps,
                  threads=torch.get_num_threads(), amp=args.amp)
    steps = report_steps(args, width, batch, args.reps, torch.cuda.synchronize if on_cuda else (lambda: None), args.amp)
    for name, ms in steps["ms"].items():
        result[f"{name}_ms"] = ms
        print(f"{name}: {ms:.1f} ms per step (median of {args.reps})", file=sys.stderr)
    result.update(ratio=steps["ratio"], ratio_official=steps["ratio_official"], phases_ms=steps["phases_ms"])
    return result


def bench_mask(args):
    """Time the RGP mask on the parameter shapes of ResNet-18 and WRN-34-10 (random gradients)."""
    import kernels
    shapes = {}
    for name in ("resnet18", "resnet50", "wrn34_10"):
        with torch.device("meta"):
            shapes[name] = [tuple(p.shape) for _, p in rf.masked_parameters(rf.build_model(name))]
    return dict(bench="mask", **kernels.bench_mask(shapes, percentile=30.0, alpha=0.1, reps=args.reps,
                                                   device=args.device))


# --- bench report: the GPU report in one command (reduced width on a CPU) -------------------------

class PhaseTimer:
    """Wall time per named phase, with a device sync at each boundary (so GPU work is attributed)."""

    def __init__(self, sync):
        self.sync, self.times, self.last = sync, {}, None

    def start(self):
        self.sync()
        self.last = time.perf_counter()

    def __call__(self, phase):
        self.sync()
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + 1000 * (now - self.last)
        self.last = now


def trades_step_phases(model, opt, x, y, eps, step_size, steps, beta, timer):
    """`rf.trades_step`'s parts, each timed: the attack, the loss's forwards, backward and SGD."""
    timer.start()
    x_adv = rf.pgd(model, x, y, eps, step_size, steps, loss="kl")
    timer("attack")
    loss = rf.trades_loss(model(x), model(x_adv), y, beta)
    timer("forwards")
    rf.sgd_update(model, opt, loss)
    timer("backward, optimiser")


def cure_step_phases(model, opt, x, y, cure, eps, step_size, steps, timer):
    """`rf.cure_step`'s parts, each timed: attack, revision targets, gradients, mask, update."""
    timer.start()
    x_adv = rf.pgd(model, x, y, eps, step_size, steps, loss="kl")
    timer("attack")
    rev_nat, rev_adv = cure.revision.targets(x, x_adv)
    timer("revision forwards")
    g, g_nat, g_score, _ = rf.cure_gradients(model, x, x_adv, y, rev_nat, rev_adv, cure.cfg)
    timer("forwards, 3 backward passes")
    rf.cure_mask_(model, g, g_nat, g_score, cure.cfg, cure.mask_fn)
    timer("mask")
    rf.cure_update_(model, opt, g, cure.revision, cure.cfg, cure.schedule, cure.coin)
    timer("optimiser, revision update")


def report_mask(models, width_scale, batch, device, reps):
    """(a) plain, NumPy and fused masks on the gradients of real backward passes, bit-exact check."""
    import kernels
    rows = {}
    for name in models:
        torch.manual_seed(0)
        width = max(1, round(rf.MODELS[name][1] * width_scale))
        model = rf.build_model(name, 10, width).to(device).train()
        x, y = torch.rand(batch, 3, 32, 32, device=device), torch.randint(10, (batch,), device=device)
        x_adv = (x + 8 / 255 * torch.randn_like(x)).clamp(0, 1)
        cfg = rf.cure_defaults(name, "cifar10")
        g, g_nat, g_score, _ = rf.cure_gradients(model, x, x_adv, y, *rf.Revision(model).targets(x, x_adv), cfg)
        sel = [i for _, i in rf.cure_masked(model, cfg)]
        rows[name] = dict(width=width, **kernels.bench_mask_row([g[i] for i in sel], [g_nat[i] for i in sel],
                                                                [g_score[i] for i in sel], reps=reps))
    return rows


def report_steps(args, width, batch, reps, sync, amp):
    """(b) + (e): one step of TRADES, CURE and the official structure; CURE's and TRADES' phases."""
    torch.manual_seed(args.seed)
    model = setup_model_for_bench(args, width)
    x, y = torch.rand(batch, 3, 32, 32, device=args.device), torch.randint(10, (batch,), device=args.device)
    opt = rf.make_optimizer(model, 0.01, 5e-4)
    # a paper-length run's schedule (d = 0.999), so the revision decay is the paper's
    cure = cure_run(rf.cure_defaults(args.model, "cifar10"), model, rf.PAPER_STEPS, 0, args.device)
    eps, step_size, k = args.eps_px, args.step_px, args.attack_steps
    steps = {
        "trades": lambda: rf.trades_step(model, opt, x, y, eps, step_size, k, 6.0),
        "cure": lambda: rf.cure_step(model, opt, x, y, cure.revision, cure.cfg, cure.schedule, cure.coin,
                                     eps, step_size, k, cure.mask_fn),
        "cure_official": lambda: official_style_cure_step(model, opt, x, y, cure.revision, cure.cfg, cure.schedule,
                                                          cure.coin, eps, step_size, k),
    }
    phases = {"trades": PhaseTimer(sync), "cure": PhaseTimer(sync)}
    phased = {"trades": lambda: trades_step_phases(model, opt, x, y, eps, step_size, k, 6.0, phases["trades"]),
              "cure": lambda: cure_step_phases(model, opt, x, y, cure, eps, step_size, k, phases["cure"])}
    times = {name: [] for name in steps}
    # 2 warm-up rounds; candidates interleaved, so that background load or clock changes hit all alike
    for rep in range(-2, reps):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            with autocast(amp, args.device):
                fn()
            sync()
            if rep >= 0:
                times[name].append(1000 * (time.perf_counter() - t0))
        if rep >= 0:
            for fn in phased.values():
                with autocast(amp, args.device):
                    fn()
    ms = {name: statistics.median(ts) for name, ts in times.items()}
    return dict(ms=ms, ratio=ms["cure"] / ms["trades"], ratio_official=ms["cure_official"] / ms["trades"],
                phases_ms={n: {p: t / reps for p, t in timer.times.items()} for n, timer in phases.items()})


def setup_model_for_bench(args, width, name=None):
    model = rf.build_model(name or args.model, 10, width).to(args.device).train()
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def report_throughput(args, name, width, batch, steps, sync):
    """(c) images per second of a natural, AT, TRADES and CURE epoch of `steps` batches (augmentation,
    the step, the loss kept on the device), the method's training attack as in run.py."""
    data = rf.synthetic_data(num_train=batch * steps, num_test=1, seed=args.seed)
    split = data.train.to(args.device)
    result = {}
    for method in ("natural", "at", "trades", "cure"):
        torch.manual_seed(args.seed)
        model = setup_model_for_bench(args, width, name)
        opt = rf.make_optimizer(model, 0.01, 5e-4)
        cure = cure_run(rf.cure_defaults(name, "cifar10"), model, steps, 0, args.device)
        fn = with_amp(method_step(args, method, cure), args.amp, args.device)
        gen = torch.Generator().manual_seed(0)
        rf.train_epoch(model, opt, fn, split.subset(slice(0, batch)), batch, 0.01, gen)     # warm-up
        sync()
        t0 = time.perf_counter()
        rf.train_epoch(model, opt, fn, split, batch, 0.01, gen)
        sync()
        result[method] = batch * steps / (time.perf_counter() - t0)
    return result


def bench_report(args):
    """The GPU report: (a) masks on real gradients, (b) steps in fp32 and bf16, (c) epoch throughput,
    (d) projected wall-clock of the paper runs, (e) where a CURE step's time goes. Full width and
    batch 128 on CUDA; on a CPU 1/8 of the width and batch 16 (minutes, not hours)."""
    on_cuda = torch.device(args.device).type == "cuda"
    if not on_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # the fused kernels' bit-exact check, interpreted
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    # --width scales both models by the same factor (e.g. 8 for resnet18 = 1/8 of 64, WRN 20 of 160)
    scale = args.width / rf.MODELS[args.model][1] if args.width is not None else (1.0 if on_cuda else 1 / 8)
    batch = args.batch_size if args.batch_size_given else (128 if on_cuda else 16)
    reps = args.reps
    widths = {name: max(1, round(rf.MODELS[name][1] * scale)) for name in ("resnet18", "resnet50", "wrn34_10", args.model)}
    report = dict(bench="report", device=str(args.device),
                  device_name=torch.cuda.get_device_name(args.device) if on_cuda else cpu_name(),
                  threads=torch.get_num_threads(), batch=batch, widths=widths, attack_steps=args.attack_steps,
                  reps=reps, device_settings=args.device_settings, versions=versions())
    print("(a) RGP mask on real gradients", file=sys.stderr)
    report["mask"] = report_mask(("resnet18", "resnet50", "wrn34_10"), scale, batch, args.device, reps)
    print("(b, e) training steps", file=sys.stderr)
    report["step"] = {amp: report_steps(args, widths[args.model], batch, reps, sync, amp) for amp in ("none", "bf16")}
    print("(c) epoch throughput", file=sys.stderr)
    steps = max(2, reps)
    report["images_per_s"] = {name: report_throughput(args, name, widths[name], batch, steps, sync)
                              for name in ("resnet18", "wrn34_10")}
    # (d) the paper runs: 200 natural + 200 CURE epochs over 49,000 images (1,000 held out for validation)
    images = 200 * (49_000 - 49_000 % 128)
    report["projection_hours"] = {
        f"python run.py cure cifar10 --model {name}": (images / ips["natural"] + images / ips["cure"]) / 3600
        for name, ips in report["images_per_s"].items()}
    report["projection_note"] = ("training only (no per-epoch validation or final evaluation), from (c) at "
                                 + ("full width" if on_cuda else f"widths {widths}, batch {batch}: NOT the paper's models"))
    os.makedirs(args.out, exist_ok=True)
    rf.save_json(os.path.join(args.out, "report.json"), report)
    print_report(report)
    return report


def print_report(r):
    """One table on stderr: the report's headline numbers."""
    lines = [f"bench report on {r['device_name']} ({r['device']}), batch {r['batch']}, widths {r['widths']}"]
    for name, m in r["mask"].items():
        fused = f"{m['fused_ms']:.3f} ms ({m['fused_gb_per_s']:.0f} GB/s)" if m["fused_ms"] else "not timed"
        lines.append(f"  mask {name:9} plain {m['plain_ms']:8.2f} ms  numpy {m['numpy_ms']:8.2f} ms  fused {fused}"
                     f"  bit-exact {m['bit_exact']}")
    for amp, st in r["step"].items():
        ms = st["ms"]
        lines.append(f"  step [{amp:4}] TRADES {ms['trades']:8.1f} ms  CURE {ms['cure']:8.1f} ms ({st['ratio']:.2f}x)"
                     f"  official {ms['cure_official']:8.1f} ms ({st['ratio_official']:.2f}x)")
    for name, ips in r["images_per_s"].items():
        lines.append(f"  {name:9} images/s " + "  ".join(f"{m} {v:7.1f}" for m, v in ips.items()))
    for run_, hours in r["projection_hours"].items():
        lines.append(f"  projected: {run_}: {hours:.1f} h ({r['projection_note']})")
    print("\n".join(lines), file=sys.stderr)


# --- bench gpu: the acceptance run on a CUDA card, one command -------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def gpu_versions(device):
    """The card, driver and software a GPU result was measured with."""
    import kernels
    props = torch.cuda.get_device_properties(device)
    try:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(index)],
                                capture_output=True, text=True, timeout=60).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown (nvidia-smi did not answer)"
    return dict(device_name=props.name, capability=f"sm_{props.major}{props.minor}",
                memory_gib=round(props.total_memory / 2 ** 30, 1), driver=driver, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), torch=torch.__version__,
                triton=getattr(kernels.triton, "__version__", None), python=platform.python_version())


def cuda_tests(out, timeout):
    """The suite's `cuda` tests in a child process without TRITON_INTERPRET, so that the kernels are
    compiled for this card; its output goes to OUT/cuda_tests.txt."""
    test_file = os.path.join(HERE, "test_robust_ft.py")
    if not os.path.exists(test_file):
        return dict(passed=False, summary=f"{test_file} not found: the cuda tests need the repository's test file")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = os.path.join(out, "cuda_tests.txt")
    with open(log, "w") as f:
        try:
            code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", test_file],
                                  stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = [line.strip() for line in open(log) if line.strip()]
    summary = lines[-1] if lines else "no output"
    if code is None:
        summary = f"stopped after {timeout} s; last line: {summary}"
    return dict(command="python -m pytest -q test_robust_ft.py -m cuda", returncode=code, summary=summary,
                passed=code == 0 and " passed" in summary and "skipped" not in summary, log="cuda_tests.txt")


def fused_vs_plain_training(args, masks, steps, width, batch):
    """CURE for `steps` steps of `batch` synthetic images, once per mask function in `masks`, each run
    from the same seed under deterministic algorithms, so that the runs can differ only through
    their masks. Returns each run's median step time and mask path, and whether the final model
    states (parameters and BatchNorm buffers) are equal bit for bit."""
    on_cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    split = rf.synthetic_data(num_train=batch * steps, num_test=1, seed=args.seed).train.to(args.device)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    runs = {}
    try:
        for name, mask_fn in masks.items():
            torch.manual_seed(args.seed)
            model = setup_model_for_bench(args, width)
            opt = rf.make_optimizer(model, 0.1, 5e-4)
            cure = cure_run(rf.cure_defaults(args.model, "cifar10"), model, steps, args.seed, args.device)
            cure.mask_fn = mask_fn
            step, times = with_amp(method_step(args, "cure", cure), args.amp, args.device), []

            def timed(m, o, x, y):
                sync()
                t0 = time.perf_counter()
                loss = step(m, o, x, y)
                sync()
                times.append(1000 * (time.perf_counter() - t0))
                return loss

            loss = rf.train_epoch(model, opt, timed, split, batch, 0.1, torch.Generator().manual_seed(args.seed))
            runs[name] = dict(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                              step_ms=statistics.median(times[1:] or times), mask_path=mask_path(mask_fn), loss=loss)
            print(f"  {name} mask: {len(times)} steps, {runs[name]['step_ms']:.1f} ms per step (median), "
                  f"path {runs[name]['mask_path']}, mean loss {loss:.4f}", file=sys.stderr)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]
    first, *others = [r["state"] for r in runs.values()]
    differing = sorted({k for other in others for k in first if not torch.equal(first[k], other[k])})
    return dict(steps=steps, width=width, batch=batch, model=args.model, amp=args.amp,
                identical=not differing, differing=differing,
                **{name: {k: v for k, v in r.items() if k != "state"} for name, r in runs.items()})


def bench_gpu(args):
    """The acceptance run on a CUDA card: the suite's cuda tests, a deterministic CURE run with the
    fused mask and again with the plain one (same final state), and `bench report` at full width.
    Writes OUT/metrics.json after every stage, so that a run cut short still says where it got."""
    import kernels
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    result = dict(bench="gpu", device=str(args.device), versions=gpu_versions(args.device), stages={})
    checks = {}

    def stage(i, name, fn):
        print(f"[bench gpu {i}/3, {time.perf_counter() - start:.0f} s] {name}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:                 # record it and go on: the other stages still say something
            result[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        result["stages"][name] = round(time.perf_counter() - t0, 1)
        rf.save_json(os.path.join(args.out, "metrics.json"), result)

    print("  " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), file=sys.stderr)
    stage(1, "cuda_tests", lambda: cuda_tests(args.out, timeout=300))
    checks["cuda tests"] = result["cuda_tests"].get("passed", False)
    print(f"  {result['cuda_tests'].get('summary', result['cuda_tests'].get('error'))}", file=sys.stderr)
    width = args.width or rf.MODELS[args.model][1]
    batch = args.batch_size if args.batch_size_given else 128
    stage(2, "fused_vs_plain", lambda: fused_vs_plain_training(
        args, {"fused": kernels.CheckedFusedMask(), "plain": rf.rgp_mask_}, steps=200, width=width, batch=batch))
    fvp = result["fused_vs_plain"]
    checks["fused and plain runs identical"] = fvp.get("identical", False) and \
        fvp.get("fused", {}).get("mask_path") == "fused"
    report_args = argparse.Namespace(**vars(args))
    report_args.out = os.path.join(args.out, "report")
    stage(3, "report", lambda: bench_report(report_args))
    checks["report"] = "error" not in result["report"]
    result["checks"] = checks
    result["passed"] = all(checks.values())
    result["minutes"] = round((time.perf_counter() - start) / 60, 2)
    print(f"[bench gpu done, {result['minutes']} min] " + ", ".join(f"{k}: {'ok' if v else 'FAILED'}"
                                                               for k, v in checks.items()), file=sys.stderr)
    return result


def cmd_bench(args):
    if args.dataset == "gpu":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before cuBLAS starts: deterministic GEMMs
    result = {"step": bench_step, "mask": bench_mask, "report": bench_report, "gpu": bench_gpu}[args.dataset](args)
    finished = finish(args, result)
    if args.dataset == "gpu" and not result["passed"]:
        sys.exit(1)                      # the metrics name the failed check
    return finished


# -----------------------------------------------------------------------------
# compare: one natural start, each method from it under the same budget, then RiFT; table + plots
# -----------------------------------------------------------------------------

def sub_run(args, method, out, **changes):
    """A copy of `args` for one stage of `compare`, resuming whatever that stage left behind."""
    sub = argparse.Namespace(**vars(args))
    sub.method, sub.out, sub.resume = method, out, True
    sub.weight_decay = args.weight_decay_given if args.weight_decay_given is not None else WEIGHT_DECAY.get(method, 5e-4)
    sub.beta = args.beta_given if args.beta_given is not None else default_beta(method)
    if method == "natural":        # the natural stage keeps its own lr and schedule
        sub.lr, sub.milestones = args.natural_lr, None
    for k, v in changes.items():
        setattr(sub, k, v)
    return sub


def complete(out):
    """A stage's metrics when it is complete: its metrics.json exists, is not a partial one written
    during the evaluation, and no attack failed in it (a rerun resumes the stage otherwise)."""
    path = os.path.join(out, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            metrics = json.load(f)
        if "status" not in metrics and not failures(metrics):
            return metrics
    return None


def run_stage(sub, command):
    done = complete(sub.out)
    if done is not None:
        print(f"compare: {sub.out} is complete, skipping", file=sys.stderr)
        return done
    return command(sub)


# The ablation: stage directory -> (row label, what changes from the default CURE stage). The first four
# are the CURE paper's Table 7 (RGP and revision each on or off); "neither" is TRADES-style training
# with CURE's beta and weight decay. Then Eq. 5 as printed (beta 1) and the official code's variant.
ABLATION = {
    "cure_neither": ("CURE, neither part (p 0, gamma 0)", dict(percentile=0.0, gamma=0.0)),
    "cure_rgp": ("CURE, RGP only (gamma 0)", dict(gamma=0.0)),
    "cure_revision": ("CURE, revision only (p 0)", dict(percentile=0.0)),
    "cure": ("CURE, RGP and revision", {}),
    "cure_beta1": ("CURE, beta 1 (Eq. 5 as printed)", dict(beta=1.0)),
    "cure_official": ("CURE, official variant (rgp_soft)", dict(cure_variant="official")),
}
# CURE paper, Table 7 (ResNet-18, CIFAR-10, full scale): clean, PGD-20, CW, AutoAttack, NRR against AA.
# The check marks are lost from the paper's text; the order is neither, RGP only, revision only, both
# (the first row is the paper's TRADES row of Table 1, the last its CURE row).
PAPER_TABLE7 = {
    "cure_neither": (82.41, 52.76, 50.43, 48.37, 60.95),
    "cure_rgp": (81.27, 53.20, 51.33, 49.06, 61.18),
    "cure_revision": (83.28, 51.57, 50.96, 47.35, 60.37),
    "cure": (86.76, 54.90, 52.48, 49.69, 63.19),
}


def compare_methods(args):
    """The stages `compare` trains after the natural one: --methods (default: at, trades, cure; with
    --ablation none), then the ablation's stages. Returns (stages, {stage: changes to its args})."""
    given = args.methods if args.methods is not None else ("" if args.ablation else ",".join(COMPARE_METHODS))
    methods = [m for m in given.split(",") if m]
    bad = [m for m in methods if m not in COMPARE_METHODS]
    if bad or not (methods or args.ablation):
        raise UsageError(f"unknown --methods entry {bad[0] if bad else ''!r}; choose from {list(COMPARE_METHODS)}")
    changes = {m: {} for m in methods}
    if args.ablation:
        changes.update({stage: change for stage, (_, change) in ABLATION.items()})
    return list(changes), changes


def cmd_compare(args):
    stages, changes = compare_methods(args)
    os.makedirs(args.out, exist_ok=True)
    nat_dir = os.path.join(args.out, "natural")
    natural = run_stage(sub_run(args, "natural", nat_dir, epochs=args.natural_epochs, init=None), cmd_train)
    nat_ckpt = os.path.join(nat_dir, "checkpoint.pt")
    rows = {"natural": natural}
    for stage in stages:
        method = stage.split("_")[0]                       # cure_rgp etc. are CURE stages
        rows[stage] = run_stage(sub_run(args, method, os.path.join(args.out, stage), init=nat_ckpt,
                                        **changes[stage]), cmd_train)
        if args.rift:
            rows[f"{stage}+rift"] = run_stage(
                sub_run(args, "rift", os.path.join(args.out, f"{stage}_rift"),
                        init=os.path.join(args.out, stage, "checkpoint.pt")), cmd_rift)
    results = dict(dataset=args.dataset, preset=args.preset, model=args.model, width=args.width,
                   epochs=args.epochs, natural_epochs=args.natural_epochs, seed=args.seed,
                   device=str(args.device), rows=rows)
    if args.ablation:
        columns = ("clean", "pgd20", "cw", "autoattack", "nrr_autoattack")
        results["paper_table7"] = {ABLATION[k][0]: dict(zip(columns, v)) for k, v in PAPER_TABLE7.items()}
    plots = []
    if writer(args):
        rf.save_json(os.path.join(args.out, "results.json"), results)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(results_table(results))
        plots = make_plots(args.out, rows, stages)
    summary = dict(method="compare", dataset=args.dataset, out=args.out, plots=plots,
                   table={name: table_row(r) for name, r in rows.items()})
    return finish(args, summary)


def is_ablation(rows):
    """Whether `rows` hold the ablation (any of its stages besides the plain `cure`)."""
    return any(stage in rows for stage in ABLATION if stage != "cure")


def row_label(name, ablation):
    """A table's name for a stage: in an ablation, its label; else the stage name itself."""
    base, plus, rest = name.partition("+")
    return ABLATION[base][0] + plus + rest if ablation and base in ABLATION else name


def table_row(metrics):
    """The paper's columns for one run: clean, PGD-20, PGD-100, CW, AutoAttack, NRR, minutes."""
    test = metrics.get("test", metrics.get("after", {}))
    row = {k: test.get(k) for k in ("n", "clean", "pgd20", "pgd100", "cw", "autoattack", "n_autoattack",
                                    "pgd20_official", "cw_official")}
    row["nrr_robust"] = nrr_robust(test)
    row["nrr"] = rf.nrr(row["clean"], row["nrr_robust"]) if row["nrr_robust"] is not None else None   # Eq. 9
    row["nrr_autoattack"] = test.get("nrr_autoattack")                      # against AA (Tables 7-8)
    row["corruption"] = test.get("corruption")                              # mean over corruptions
    row["minutes"] = metrics.get("wall_seconds", 0.0) / 60
    row["collapsed"] = metrics.get("collapsed")
    return row


def results_table(results):
    cols = [("clean", "Clean"), ("pgd20", "PGD-20"), ("pgd100", "PGD-100"), ("cw", "CW-inf"),
            ("autoattack", "AutoAttack"), ("nrr", "NRR (Eq. 9, CW)"), ("nrr_autoattack", "NRR (AA)"),
            ("minutes", "wall-clock min")]
    official = (("pgd20_official", "PGD-20, official step"), ("cw_official", "CW, official step"),
                ("corruption", "corruptions (mean)"))
    cols += [(k, label) for k, label in official
             if any(table_row(m)[k] is not None for m in results["rows"].values())]    # when evaluated
    first = table_row(next(iter(results["rows"].values())))
    aa_n = first["n_autoattack"]
    ns = {name: table_row(m)["n"] for name, m in results["rows"].items()}
    n = max(set(ns.values()), key=list(ns.values()).count)         # the usual count; others are named
    other = "".join(f"; {name}: {k} images" for name, k in ns.items() if k != n)
    lines = [f"Test split: {n} images{other}" + (f" (AutoAttack and NRR (AA): the first {aa_n})" if aa_n else "")
             + f"; {results['dataset']}, {results['model']} width {results['width']}, "
             f"{results['epochs']} epochs per method from one natural checkpoint "
             f"({results['natural_epochs']} epochs), preset {results['preset']}, device {results['device']}.",
             "", "| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, metrics in results["rows"].items():
        row = table_row(metrics)
        cells = ["-" if row[k] is None else f"{row[k]:.2f}" for k, _ in cols]
        if row["n_autoattack"] is not None and row["autoattack"] is not None:
            cells[4] += f" (n={row['n_autoattack']})"
        label = row_label(name, is_ablation(results["rows"]))
        if row["collapsed"]:
            c = row["collapsed"]
            label += f" **(collapsed at epoch {c['epoch']}: {c['top_class_share']:.0f}% one class)**"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "paper_table7" in results:
        lines += ["", "The CURE paper's Table 7 (ResNet-18, CIFAR-10, full width, 200 epochs; NRR against "
                  "AutoAttack), for comparison:", "",
                  "| row | Clean | PGD-20 | CW-inf | AutoAttack | NRR (AA) |", "|---|---|---|---|---|---|"]
        for label, r in results["paper_table7"].items():
            lines.append(f"| {label} | " + " | ".join(f"{r[k]:.2f}" for k in
                                                     ("clean", "pgd20", "cw", "autoattack", "nrr_autoattack")) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out, name):
    """Write `fig` to OUT/name (tight layout, 110 dpi), close it, and return the path."""
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def make_plots(out, rows, methods):
    """The papers' figures from the runs' records; returns the PNG paths written."""
    plt = _pyplot()
    paths = []

    def save(fig, name):
        paths.append(_save(fig, out, name))

    fig, ax = plt.subplots(figsize=(5, 4))                       # Figure 1: clean vs robust
    for name, metrics in rows.items():
        row = table_row(metrics)
        if row["nrr_robust"] is None:                                # no attack covered the test split
            continue
        ax.scatter(row["clean"], row["nrr_robust"], s=40)
        ax.annotate(name, (row["clean"], row["nrr_robust"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="clean accuracy (%)", ylabel="robust accuracy: CW-inf, else the worst case (%)",
           title="Clean vs robust accuracy")
    ax.grid(alpha=0.3)
    save(fig, "clean_vs_robust.png")

    fig, ax = plt.subplots(figsize=(5, 4))                       # Figure 5c: robust accuracy per epoch
    for m in methods:
        log = read_log(os.path.join(out, m, "log.jsonl"))
        ax.plot([e["epoch"] for e in log], [e["val"]["pgd20"] for e in log], marker="o",
                label=row_label(m, is_ablation(rows)))
        if m == "cure":
            ax.plot([e["epoch"] for e in log if "val_revision" in e],
                    [e["val_revision"]["pgd20"] for e in log if "val_revision" in e],
                    marker="x", linestyle="--", label="cure (revision model)")
    ax.set(xlabel="epoch", ylabel="validation PGD-20 accuracy (%)", title="Robust accuracy per epoch")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "robust_per_epoch.png")

    logs = {m: read_log(os.path.join(out, m, "log.jsonl")) for m in ["natural", *methods]
            if os.path.exists(os.path.join(out, m, "log.jsonl"))}
    logs = {m: [e for e in log if "grad_magnitude" in e] for m, log in logs.items()}
    logs = {m: log for m, log in logs.items() if log}
    if logs:                                                     # Figure 6a: gradient magnitude of each conv2
        names = list(next(iter(logs.values()))[0]["grad_magnitude"])
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 3), sharey=True, squeeze=False)
        for ax, name in zip(axes[0], names):
            for m, log in logs.items():
                ax.plot([e["epoch"] for e in log], [e["grad_magnitude"][name] for e in log], marker=".",
                        label=row_label(m, is_ablation(rows)))
            ax.set(title=name.replace(".weight", ""), xlabel="epoch", yscale="log")
            ax.title.set_fontsize(8)
            ax.grid(alpha=0.3)
        axes[0][0].set(ylabel="mean |gradient| (per step, epoch mean)")
        axes[0][-1].legend(fontsize=6)
        save(fig, "grad_magnitudes.png")

    if "cure" in methods:                                        # Figures 6b and 10: updated entries per phase
        phases = [e["update_shares"] for e in read_log(os.path.join(out, "cure", "log.jsonl"))
                  if "update_shares" in e]
        if phases:
            names = list(phases[0]["updated"])
            fig, ax = plt.subplots(figsize=(max(7, 0.25 * len(names)), 4))
            width = 0.8 / len(phases)
            for j, ph in enumerate(phases):
                ax.bar([i + j * width for i in range(len(names))], [100 * ph["updated"][n] for n in names], width,
                       label=f"{ph['phase']} ({ph['steps']} steps)")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], [n.replace(".weight", "") for n in names],
                          rotation=90, fontsize=6)
            ax.set(ylabel="entries updated at least once (%)",
                   title="CURE: share of each tensor's entries the RGP mask let through at least once, per third of training")
            ax.title.set_fontsize(8)
            ax.legend(fontsize=7)
            save(fig, "cure_updated_fraction.png")

    ablation = [n for n in ABLATION if n in rows]
    if is_ablation(rows):                                                 # Table 7 as bars: what each part does
        cols = [("clean", "clean"), ("pgd20", "PGD-20"), ("cw", "CW-inf"), ("nrr", "NRR (CW)")]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(ablation)
        for j, name in enumerate(ablation):
            row = table_row(rows[name])
            ax.bar([i + j * width for i in range(len(cols))], [row[k] or 0.0 for k, _ in cols], width,
                   label=ABLATION[name][0])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))], [c[1] for c in cols])
        ax.set(ylabel="test accuracy (%)", title="CURE ablation (Table 7) at this run's scale")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        save(fig, "cure_ablation.png")

    rift_rows = {n: r for n, r in rows.items() if n.endswith("+rift") and "alphas" in r}
    if rift_rows:                                                # RiFT: accuracy vs interpolation factor
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, r in rift_rows.items():
            a = [t["alpha"] for t in r["alphas"]]
            ax.plot(a, [t["clean"] for t in r["alphas"]], marker="o", label=f"{name} clean")
            ax.plot(a, [t["pgd10"] for t in r["alphas"]], marker="x", linestyle="--", label=f"{name} PGD")
        ax.set(xlabel="interpolation factor alpha", ylabel="validation accuracy (%), PGD-10 dashed",
               title="RiFT interpolation")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "rift_interpolation.png")

    corrupted = {n: r.get("test", r.get("after", {})).get("corruptions") for n, r in rows.items()}
    corrupted = {n: c for n, c in corrupted.items() if c}
    if corrupted:                                    # CURE Figs. 9 and 7: per corruption, per group
        first = next(iter(corrupted.values()))
        fig, (ax, ax_g) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw=dict(width_ratios=[4, 1]))
        width = 0.8 / len(corrupted)
        for j, (name, c) in enumerate(corrupted.items()):
            label = row_label(name, is_ablation(rows))
            types, groups = list(c["per_type_at_severity"]), list(c["groups_at_severity"])
            ax.bar([i + j * width for i in range(len(types))], list(c["per_type_at_severity"].values()), width,
                   label=label)
            ax_g.bar([i + j * width for i in range(len(groups))], list(c["groups_at_severity"].values()), width)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(types))], [t.replace("_", " ") for t in types],
                      rotation=60, ha="right", fontsize=7)
        ax_g.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, rotation=60, ha="right")
        ax.set(ylabel="test accuracy (%)",
               title=f"Corruptions at severity {first['severity']} ({first['source']}, {first['n'] // 5} images each)")
        ax_g.set(title="per group")
        ax.legend(fontsize=7)
        for a in (ax, ax_g):
            a.grid(alpha=0.3, axis="y")
        save(fig, "corruptions.png")
    return paths


# -----------------------------------------------------------------------------
# layerwise: CURE Section 3, adversarial training of some blocks only, from one natural checkpoint
# -----------------------------------------------------------------------------

def cmd_layerwise(args):
    """ST (the natural model), SAT (Madry AT of everything from it) and one AT run per U-b in
    --blocks, in which only the stem, the listed stages (re-initialised unless --no-reinit) and,
    for digit 5, the classifier train (`rf.layerwise_blocks`); the rest stays as the natural model
    left it. Writes results.json, results.md, layerwise_accuracy.png (Fig. 2b / 11) and
    layerwise_robust_per_epoch.png (Fig. 4). A rerun skips every finished stage."""
    os.makedirs(args.out, exist_ok=True)
    nat_dir = os.path.join(args.out, "natural")
    if args.init:                          # the natural checkpoint given: evaluate it as the ST row
        natural = run_stage(sub_run(args, "eval", nat_dir, init=args.init), cmd_eval)
        nat_ckpt = args.init
    else:
        natural = run_stage(sub_run(args, "natural", nat_dir, epochs=args.natural_epochs, init=None), cmd_train)
        nat_ckpt = os.path.join(nat_dir, "checkpoint.pt")
    rows = {"ST": natural,
            "SAT": run_stage(sub_run(args, "at", os.path.join(args.out, "SAT"), init=nat_ckpt), cmd_train)}
    for blocks, prefixes in zip(args.blocks.split(","), args.block_sets):
        name = f"U-{blocks}"
        rows[name] = run_stage(sub_run(args, "at", os.path.join(args.out, name), init=nat_ckpt,
                                       trainable=list(prefixes)), cmd_train)
    results = dict(dataset=args.dataset, model=args.model, width=args.width, epochs=args.epochs, preset=args.preset,
                   seed=args.seed, device=str(args.device), reinit=args.reinit, freeze_bn=args.freeze_bn,
                   trained={f"U-{b}": list(p) for b, p in zip(args.blocks.split(","), args.block_sets)},
                   rows={name: table_row(m) for name, m in rows.items()})
    if writer(args):
        rf.save_json(os.path.join(args.out, "results.json"), results)
        lines = [f"CURE's layer-wise study (Sec. 3): {args.dataset}, {args.model} width {args.width}, "
                 f"{args.epochs} AT epochs per row from one natural checkpoint, trained blocks "
                 f"{'re-initialised' if args.reinit else 'not re-initialised'}; the stem always trains, the "
                 f"classifier only with digit 5; test split: {results['rows']['ST']['n']} images.", "",
                 "| row | trained | Clean | PGD-20 | CW-inf | NRR (Eq. 9, CW) |", "|---|---|---|---|---|---|"]
        for name, row in results["rows"].items():
            trained = "everything" if name == "SAT" else "-" if name == "ST" else ", ".join(results["trained"][name])
            cells = ["-" if row[k] is None else f"{row[k]:.2f}" for k in ("clean", "pgd20", "cw", "nrr")]
            lines.append(f"| {name} | {trained} | " + " | ".join(cells) + " |")
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        plots = layerwise_plots(args.out, results, [n for n in rows if n != "ST"])
    else:
        plots = []
    return finish(args, dict(method="layerwise", dataset=args.dataset, out=args.out, plots=plots,
                             table=results["rows"]))


def layerwise_plots(out, results, trained_rows):
    """CURE Fig. 2b (clean and robust accuracy per row) and Fig. 4 (validation PGD-20 per epoch)."""
    plt = _pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4))
    names = list(rows)
    for j, (key, label) in enumerate((("clean", "clean"), ("nrr_robust", "robust (CW-inf, else worst case)"))):
        ax.bar([i + 0.4 * j for i in range(len(names))], [rows[n][key] or 0.0 for n in names], 0.4, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names)
    ax.set(ylabel="test accuracy (%)", title="Layer-wise study: adversarial training of some blocks only")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    paths = [_save(fig, out, "layerwise_accuracy.png")]
    fig, ax = plt.subplots(figsize=(5, 4))
    for name in trained_rows:
        log = read_log(os.path.join(out, name, "log.jsonl"))
        ax.plot([e["epoch"] for e in log], [e["val"]["pgd20"] for e in log], marker=".", label=name)
    ax.set(xlabel="epoch", ylabel="validation PGD-20 accuracy (%)", title="Robust accuracy per epoch")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out, "layerwise_robust_per_epoch.png"))
    return paths


# -----------------------------------------------------------------------------
# analyze: CURE's analyses of trained models (CKA, accuracy across eps, minimum perturbation)
# -----------------------------------------------------------------------------

def analysis_models(args, data):
    """{label: model in eval mode} for every --init: a run's checkpoint (its config.json beside it
    names the architecture, else --model/--width) or robustbench:NAME. Labels: the run directory's
    name, or NAME."""
    models = {}
    for init in args.inits:
        sub = argparse.Namespace(**vars(args))
        sub.init = init
        sub.zoo = check_zoo(sub)
        config = os.path.join(os.path.dirname(init), "config.json")
        if not sub.zoo and os.path.isfile(config):
            with open(config) as f:
                saved = json.load(f)
            sub.model, sub.width = saved.get("model", sub.model), saved.get("width", sub.width)
        label = sub.zoo or os.path.basename(os.path.dirname(os.path.abspath(init))) or init
        if label in models:
            label = init
        models[label] = setup_model(sub, data).eval()
    return models


def cmd_analyze(args):
    data, _, _, test = setup_data(args)
    models = analysis_models(args, data)
    analyse = {"cka": analyze_cka, "eps": analyze_eps, "minpert": analyze_minpert}[args.analysis]
    start = time.time()
    results, lines = analyse(args, models, test)
    results.update(analysis=args.analysis, dataset=args.dataset, n=len(test), inits=args.inits,
                   seed=args.seed, device=str(args.device), seconds=time.time() - start)
    plots = []
    if writer(args):
        os.makedirs(args.out, exist_ok=True)
        rf.save_json(os.path.join(args.out, "results.json"), results)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        plots = ANALYSIS_PLOTS[args.analysis](args.out, results)
    print("\n".join(lines), file=sys.stderr)
    return finish(args, dict(method="analyze", analysis=args.analysis, dataset=args.dataset, out=args.out,
                             plots=plots, seconds=results["seconds"]))


def analyze_cka(args, models, test):
    """CURE Fig. 3 / Fig. 12: per model, linear CKA between every layer's clean features and every
    layer's PGD-20 features (step eps/4): exact on one batch, else the official script's minibatch
    estimator (unbiased HSIC per batch; noisy, even outside [0, 1], for small batches)."""
    # one batch: exact linear CKA; more: the official script's minibatch estimator (constant memory)
    estimator = "full" if len(test) <= args.batch_size else "minibatch"
    results = dict(eps=args.eps, steps=20, estimator=estimator, models={})
    for label, model in models.items():
        names = rf.block_names(model) if hasattr(model, "layer1") else rf.layer_names(model)   # ResNets, else every layer
        matrix = rf.cka_clean_vs_adversarial(model, test, names, args.eps_px, args.eps_px / 4, 20,
                                             args.batch_size, args.seed, cross=True, estimator=estimator)
        results["models"][label] = dict(names=names, map=matrix, diagonal={n: matrix[n][n] for n in names})
        print(f"cka {label}: " + ", ".join(f"{n} {matrix[n][n]:.3f}" for n in names), file=sys.stderr)
    names = next(iter(results["models"].values()))["names"]
    lines = [f"Linear CKA of clean vs PGD-20 (eps {args.eps}/255) features, layer by layer, on {len(test)} test "
             f"images of {args.dataset} ({estimator} estimator, batches of {args.batch_size})", "",
             "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, r in results["models"].items():
        lines.append(f"| {label} | " + " | ".join(f"{r['diagonal'].get(n, float('nan')):.3f}" for n in names) + " |")
    return results, lines


def analyze_eps(args, models, test):
    """CURE Fig. 5b: PGD-20 accuracy (step eps/4, random start) for each eps in --eps-list."""
    results = dict(eps=args.eps_values, models={})
    for label, model in models.items():
        row = {}
        for e in args.eps_values:
            r = rf.evaluate(model, test, ["pgd20"], e / 255, e / 255 / 4, args.batch_size, seed=args.seed)
            row[str(e)], row["clean"] = r["pgd20"], r["clean"]
        results["models"][label] = row
        print(f"eps {label}: " + ", ".join(f"{e}: {row[str(e)]:.1f}" for e in args.eps_values), file=sys.stderr)
    lines = [f"PGD-20 accuracy (%) by eps (/255), step eps/4, on {len(test)} test images of {args.dataset}", "",
             "| model | clean | " + " | ".join(str(e) for e in args.eps_values) + " |",
             "|---" * (len(args.eps_values) + 2) + "|"]
    for label, row in results["models"].items():
        lines.append(f"| {label} | {row['clean']:.2f} | " + " | ".join(f"{row[str(e)]:.2f}" for e in args.eps_values)
                     + " |")
    return results, lines


def analyze_minpert(args, models, test):
    """CURE Fig. 8: per image the smallest L-inf eps at which PGD-20 (step eps/4, --restarts random
    starts) fools the model, by bisection to --tol up to --eps-max (`rf.minimum_perturbation`)."""
    results = dict(eps_max=args.eps_max, tol=args.tol, steps=20, restarts=args.restarts, models={})
    for label, model in models.items():
        values = []
        for i, (x, y) in enumerate(rf.batches(test, args.batch_size)):
            values.append(rf.minimum_perturbation(model, x, y, args.eps_max / 255, args.tol / 255, 20, args.restarts,
                                                  0.25, rf.batch_generator(args.seed, i, x.device)).cpu())
        eps = torch.cat(values).double() * 255
        finite = eps[torch.isfinite(eps)]
        results["models"][label] = dict(
            values=[None if not math.isfinite(v) else v for v in eps.tolist()],
            median=float(eps.median()), mean_fooled=float(finite[finite > 0].mean()) if (finite > 0).any() else None,
            wrong_clean=float((eps == 0).double().mean() * 100), not_fooled=float((~torch.isfinite(eps)).double().mean() * 100))
        r = results["models"][label]
        print(f"minpert {label}: median {r['median']:.2f}/255, {r['not_fooled']:.1f}% not fooled by "
              f"{args.eps_max}/255", file=sys.stderr)
    lines = [f"Minimum L-inf perturbation (/255) for PGD-20 to fool each model, by bisection to {args.tol}/255 up to "
             f"{args.eps_max}/255, {args.restarts} restart(s), on {len(test)} test images of {args.dataset}", "",
             "| model | median | mean over the fooled (eps > 0) | misclassified clean (%) | not fooled (%) |",
             "|---|---|---|---|---|"]
    for label, r in results["models"].items():
        mean = "-" if r["mean_fooled"] is None else f"{r['mean_fooled']:.2f}"
        lines.append(f"| {label} | {r['median']:.2f} | {mean} | {r['wrong_clean']:.1f} | {r['not_fooled']:.1f} |")
    results["examples"] = dict(images=test.x[:6].cpu().tolist(), labels=test.y[:6].tolist())
    return results, lines


def plot_cka(out, results):
    plt = _pyplot()
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), squeeze=False)
    for ax, (label, r) in zip(axes[0], models.items()):
        names = r["names"]
        image = ax.imshow([[r["map"][a][b] for b in names] for a in names], vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set(title=label, xlabel="PGD features")
    axes[0][0].set(ylabel="clean features")
    fig.subplots_adjust(wspace=0.35)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="linear CKA")
    path = os.path.join(out, "cka.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_eps(out, results):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, row in results["models"].items():
        ax.plot(results["eps"], [row[str(e)] for e in results["eps"]], marker="o", label=label)
    ax.set(xlabel="eps (/255)", ylabel="PGD-20 accuracy (%)", title="Robustness across perturbation strengths")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return [_save(fig, out, "accuracy_vs_eps.png")]


def plot_minpert(out, results):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, r in results["models"].items():
        values = [v for v in r["values"] if v is not None]
        ax.hist(values, bins=20, range=(0, results["eps_max"]), histtype="step", linewidth=1.5, label=label)
    ax.set(xlabel="minimum L-inf perturbation (/255)", ylabel="images", title="Perturbation needed to fool each model")
    ax.legend(fontsize=7)
    paths = [_save(fig, out, "minimum_perturbation.png")]
    images = results["examples"]["images"]
    fig, axes = plt.subplots(1, len(images), figsize=(1.9 * len(images), 2.4), squeeze=False)
    for i, (ax, image) in enumerate(zip(axes[0], images)):
        ax.imshow(torch.tensor(image, dtype=torch.uint8).permute(1, 2, 0).numpy())
        ax.axis("off")
        text = "\n".join(f"{label[:10]}: " + ("inf" if r["values"][i] is None else f"{r['values'][i]:.2f}")
                         for label, r in results["models"].items())
        ax.set_title(text, fontsize=6)
    paths.append(_save(fig, out, "minimum_perturbation_examples.png"))
    return paths


ANALYSIS_PLOTS = {"cka": plot_cka, "eps": plot_eps, "minpert": plot_minpert}


def read_log(path, evaluations=False):
    """The per-epoch entries of a run's log.jsonl (the evaluation lines have no "epoch"), or with
    `evaluations` every line."""
    with open(path) as f:
        return [e for e in map(json.loads, filter(str.strip, f)) if evaluations or "epoch" in e]


def main(argv=None):
    args = parse_args(argv)
    try:
        resolve(args)
        setup_distributed(args)
        args.device_settings = setup_device(args)
        command = {"bench": cmd_bench, "eval": cmd_eval, "rift": cmd_rift, "compare": cmd_compare,
                   "layerwise": cmd_layerwise, "analyze": cmd_analyze}
        result = command.get(args.method, cmd_train)(args)
    except UsageError as e:                 # bad input: the same on every rank, so rank 0 alone says it
        if os.environ.get("RANK", "0") == "0":
            print(f"run.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError, RuntimeError) as e:   # may be one rank's own: each says it
        where = f" (rank {args.rank})" if getattr(args, "world_size", 1) > 1 else ""
        print(f"run.py: error{where}: {e}", file=sys.__stderr__ if where else sys.stderr)
        sys.exit(2)
    if dist.is_initialized():
        # Every rank got here. Leave together (the barrier holds the other ranks until rank 0 has
        # written its files), and free the group's threads before the interpreter shuts down.
        dist.barrier()
        leave_process_group()
    return result


if __name__ == "__main__":
    main()
