"""train.py's command line: the flags, built on abmll.Config, the presets and the checks.

As nanoGPT keeps its configurator.py and config/*.py beside train.py, the settings sit apart from
the loop. A flag that is a field of abmll.Config (the method's hyperparameters, the paper's names
and defaults) takes its default from it, and train.config(args) builds the Config back from the
flags; a preset only moves defaults, and a flag given on the command line wins over it. Every
check ends in one line that names the flag (exit status 2), before anything loads.

    args = parse_args(["--method", "reptile", "--preset", "paper", "--lr", "1e-4"])
"""

import argparse
import dataclasses
import math

import torch

import abmll
import benchmark
import data
import llama
import lora
import prune
from ranks import world_size

METHODS = ("pretrained", "pretrained-adapted", "lora", "structured", "reptile", "abmll")
UNTRAINED = ("pretrained", "pretrained-adapted")  # the second: a fresh LoRA (B = 0), test-adapted
RUN_ONLY = ("resume", "compare", "seeds", "device", "out", "fsdp")  # may change when a run resumes
# shape only the test, never training or validation: a resumed run may change them (config.json
# then records the new ones), and --resume on a finished run re-tests its best epoch with them
TEST_ONLY = ("prune", "prune_mode", "adapt_curve")
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # Meta's names of the layers an adapter wraps
C = abmll.Config  # every hyperparameter of the method: the defaults of its flags

# The defaults are the paper's (abmll.Config, Section 5.1.1, and the paper's text where the
# authors' code reads otherwise: README's table); "paper" keeps them all, for a GPU. "quick" fits a
# 2-core CPU in minutes (the default command in < 10: 12 training tasks an epoch, as each costs
# ~8.6 s and each evaluation ~100 s): it takes ~1/1000 of the paper's steps, and at the paper's
# learning rates the adapters barely move in so few (measured on nli: Structured LoRA 30.4% vs
# Pretrained 31.0% test accuracy), so it scales every learning rate by 10. "compare" is quick's
# training with an evaluation that can tell methods apart: >= 1,000 test and >= 300 validation
# examples per split and seed where the split has them (nli 1,030 / 318, cls 1,054 / 346).
# "official" is the authors' code (github zhang-liyi/llm-meta-learning) at the paper's budget.
_FAST = {k: 10 * getattr(C, k) for k in ("lr", "inner_lr", "outer_lr")}
PRESETS = {"quick": dict(epochs=2, tasks_per_epoch=12, max_query=16, max_examples=200, **_FAST),
           "paper": {},
           "compare": dict(epochs=2, tasks_per_epoch=20, max_query=250, max_val=60,
                           max_examples=200, **_FAST),
           "official": dict(targets="wq,wv,wo,w1,w2,w3", noise="activation", kl="mc",
                            weight_decay=0.0, inner_opt="persistent", reptile_anneal="linear",
                            prior_weight="beta/M", prompt="official", eval_noise="mean")}


def run_flags(p):
    g = p.add_argument_group("the run")
    g.add_argument("--method", default="abmll", help=f"one of {', '.join(METHODS)}")
    g.add_argument("--split", default=None, help="offline: cls, nli, para, mcqa, diag; MetaICL: "
                   "cls-45, cls-23, nli, para, mcqa (default nli; with --random-init: synthetic)")
    g.add_argument("--model", default="smollm2-135m", help="built-in name or a Meta / HF directory "
                   f"or .gguf file; with --random-init one of {', '.join(llama.CONFIGS)}")
    g.add_argument("--random-init", action="store_true", help="random weights of the --model "
                   "shape, a byte-level tokenizer (tokenizer.py's byte_level) and synthetic tasks "
                   "made in code (split 'synthetic'): no checkpoint, data or network. For speed "
                   "and memory (the run directory's speed.json); accuracy on random weights and "
                   "random labels means nothing")
    g.add_argument("--data-dir", default=None,
                   help="MetaICL-layout data (default: the offline benchmark)")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling, adapters and episodes")
    g.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="quick (CPU, "
                   "minutes), compare (quick with >= 1,000 test examples), paper (the paper's "
                   "text) or official (the authors' code); explicit flags override it")


def budget_flags(p):
    g = p.add_argument_group("the budget", "defaults: the preset's; paper: all, 500 epochs")
    g.add_argument("--epochs", type=int, default=500, help="epochs")
    g.add_argument("--tasks-per-epoch", type=int, default=None,
                   help="training tasks per epoch, a fresh seeded sample each epoch")
    g.add_argument("--max-examples", type=int, default=None, help="examples kept per training task")
    g.add_argument("--max-query", type=int, default=None,
                   help="validation / test examples per held-out task")
    g.add_argument("--max-val", type=int, default=None,
                   help="validation examples per held-out task (default: --max-query)")
    g.add_argument("--max-held-out", type=int, default=None,
                   help="only the first N held-out tasks (smoke runs; default: all)")
    g.add_argument("--max-len", type=int, default=256,
                   help="tokens per example (long questions lose their start)")
    g.add_argument("--meta-batch", type=int, default=1, metavar="T", help="tasks per update, run "
                   "side by side (under torchrun, task j of each meta-batch on rank j %% world): "
                   "ABMLL's theta step on the mean of T tasks' outer gradients, Reptile's on the "
                   "mean of their deltas, Regular / Structured LoRA step k on the mean gradient "
                   "of T tasks' (pooled episodes') batch k; an epoch's last meta-batch is smaller "
                   "when T does not divide its tasks; each task draws its own seeded noise; needs "
                   "--inner-opt fresh. Default 1: an update per task")
    g.add_argument("--fsdp", action="store_true", help="shard the frozen base with FSDP2 across "
                   "ranks (torchrun, more than one process); the adapters stay replicated, "
                   "held-out tasks run on every rank")


# abmll.Config's fields that are flags (--inner-steps for inner_steps): each flag's type and default
# are the field's; %(default)g in a help is the field's default
CONFIG_HELP = {
    "rank": "LoRA rank (default %(default)s)",
    "alpha": "LoRA alpha, scaling alpha / rank (default %(default)g)",
    "log_c": "log-variance offset c, docs/design.md (default %(default)g)",
    "inner_steps": "K: steps per task and at test time (default %(default)s)",
    "lr": "Regular LoRA's learning rate (paper: %(default)g)",
    "inner_lr": "inner-loop / structured / test-time lr (paper: %(default)g)",
    "outer_lr": "ABMLL's outer-step lr (paper: %(default)g)",
    "reptile_eps": "Reptile's meta step size (default %(default)g)",
    "reptile_factors": "factors Reptile's meta step moves: AB (Reptile) or B (an ablation: A held "
                       "at theta's)",
    "beta": "weight of the KL and prior terms, Eq. 2 (default %(default)g)",
    "a0": "Gamma prior shape (default %(default)g)",
    "b0": "Gamma prior rate (default %(default)g)",
    "weight_decay": "AdamW's (library %(default)g, authors 0)",
}


def config_flags(p):
    g = p.add_argument_group("the method", "abmll.Config's fields: the paper's names and defaults; "
                             "quick and compare scale the three learning rates by 10")
    for f in dataclasses.fields(abmll.Config):
        if f.name in CONFIG_HELP:
            g.add_argument("--" + f.name.replace("_", "-"), type=f.type, default=f.default,
                           help=CONFIG_HELP[f.name])
    g.add_argument("--test-lr", type=float, default=None, help="test-time adaptation's lr, the "
                   "same for every method (default: --inner-lr)")


def protocol_flags(p):
    g = p.add_argument_group("the paper's text (defaults) or the authors' code (--preset official)")
    g.add_argument("--targets", default=",".join(C.targets), help="adapted linear layers, comma-"
                   f"separated, of {','.join(TARGETS)} (paper: wq,wv,wo; authors: + w1,w2,w3)")
    g.add_argument("--noise", choices=lora.NOISE, default=C.noise, help="ABMLL's sample: on the "
                   "weights (paper) or on the adapted layers' outputs (authors)")
    g.add_argument("--kl", choices=lora.KL, default=C.kl, help="KL(q(phi)||p(phi|theta)): closed "
                   "form, or the authors' one-sample estimate (activation noise only)")
    g.add_argument("--inner-opt", choices=["fresh", "persistent"], default="fresh",
                   help="ABMLL's / Reptile's inner AdamW: fresh per task, or one carried across "
                   "tasks (authors); test time is always fresh")
    g.add_argument("--reptile-anneal", choices=["none", "linear"], default="none",
                   help="Reptile's eps: constant, or eps (1 - epoch / epochs) (authors)")
    g.add_argument("--prior-weight", choices=["beta", "beta/M"], default="beta",
                   help="weight of -log p(theta): beta, or beta / number of training tasks "
                   "(authors)")
    g.add_argument("--prompt", choices=sorted(data.PROMPTS), default="paper",
                   help="Appendix A.3's or the authors'")
    g.add_argument("--eval-noise", choices=["sample", "mean"], default="sample", help="ABMLL's "
                   "scoring: --eval-samples samples (paper) or the posterior mean (authors)")
    g.add_argument("--outer-grad", choices=["kl", "fo"], default=C.outer_grad, help="theta's "
                   "gradient: the KL and prior (paper, authors), or + grad_phi NLL on a query "
                   "batch (first-order MAML ablation)")
    g.add_argument("--outer-opt", choices=["adamw", "sgd"], default=C.outer_opt, help="ABMLL's "
                   "theta optimizer: AdamW (paper, authors), or plain gradient descent (an "
                   "ablation: its step is --outer-lr x beta x the KL's gradient, so the size of "
                   "--outer-lr goes with 1 / beta)")


def eval_flags(p):
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-samples", type=int, default=1,
                   help="weight samples averaged when scoring ABMLL")
    g.add_argument("--eval-batch", type=int, default=8, help="examples per scoring batch")
    g.add_argument("--prune", type=int, nargs="*", default=None,
                   help="pruning study at these percents (bare --prune: 0 1 10 20 30)")
    g.add_argument("--prune-mode", nargs="+", choices=prune.PRUNE_MODES, default=["activation"],
                   help="what --prune prunes, one or more of: activation (decoder-layer outputs), "
                   "weight, adapted (every adapted layer's outputs, the authors'), channel (whole "
                   "hidden channels)")
    g.add_argument("--adapt-curve", type=int, nargs="+", default=None, metavar="K",
                   help="also score the test examples after K test-time steps for each K (e.g. 0 1 "
                   "2 5 10), the same K for every method")


def system_flags(p):
    g = p.add_argument_group("device and run directories")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--out", default="runs", help="root of the run directories")
    g.add_argument("--resume", action="store_true", help="continue the run in its directory; "
                   "on a finished run, test its best epoch again (with other --prune, "
                   "--prune-mode or --adapt-curve, the only flags that may change)")
    g.add_argument("--compare", action="store_true",
                   help="run every method for each of --seeds (resumable)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for --compare")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train and evaluate ABMLL and its baselines "
                                "(Section 5).")
    for flags in (run_flags, budget_flags, config_flags, protocol_flags, eval_flags, system_flags):
        flags(p)
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's defaults
    args = p.parse_args(argv)  # a flag given wins over its preset
    check_run(args, p)
    check_counts(args, p)
    check_device(args, p)
    check_args(args, p)
    check_parallel(args, p, world_size())
    return args


def check_run(args, p):
    """--method, and --split, which --random-init makes 'synthetic'."""
    if args.method not in METHODS:
        p.error(f"--method: unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    if args.random_init:
        if args.model not in llama.CONFIGS:
            p.error(f"--model {args.model!r} with --random-init must be one of "
                    f"{', '.join(llama.CONFIGS)}")
        if args.split not in (None, data.SYNTHETIC) or args.data_dir is not None:
            p.error(f"--random-init trains on synthetic tasks made in code (split "
                    f"{data.SYNTHETIC!r}): drop "
                    + ("--data-dir" if args.data_dir is not None else f"--split {args.split}"))
        args.split = data.SYNTHETIC
    args.split = args.split or "nli"
    known = args.split in data.PAPER_SPLITS or args.split in benchmark.OFFLINE_HELD_OUT
    if not args.random_init and not known:
        p.error(f"--split: unknown split {args.split!r}; the paper's: "
                f"{', '.join(data.PAPER_SPLITS)}; the offline benchmark's: "
                f"{', '.join(benchmark.OFFLINE_HELD_OUT)}")


def check_counts(args, p):
    """--targets (a list from here on), the counts, --adapt-curve and --prune (sorted)."""
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        p.error(f"--targets: unknown module {unknown[0]!r}; choose from {','.join(TARGETS)}"
                if unknown else "--targets: name at least one module")
    if args.kl == "mc" and args.noise == "weight":
        p.error("--kl mc: the one-sample KL is the authors' estimate on the layer outputs; it "
                "needs --noise activation")
    for flag in ("epochs", "tasks_per_epoch", "max_examples", "max_query", "max_val",
                 "inner_steps", "rank", "eval_samples", "eval_batch", "max_len", "meta_batch"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    if args.adapt_curve is not None and min(args.adapt_curve) < 0:
        p.error(f"--adapt-curve: steps must be >= 0, got {args.adapt_curve}")
    if args.prune is not None and not args.prune:
        args.prune = list(prune.PRUNE_LEVELS)
    if args.prune is not None:
        if any(not 0 <= x < 100 for x in args.prune):
            p.error(f"--prune: percents must be in [0, 100), got {args.prune}")
        args.prune = sorted(set(args.prune))


def check_device(args, p):
    """--device names a device this machine has; --dtype auto becomes fp32 or bf16."""
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.dtype == "auto":
        args.dtype = "fp32" if args.device == "cpu" else "bf16"


def check_parallel(args, p, world: int):
    """--meta-batch, --fsdp and torchrun's world size together (exit 2)."""
    trains = args.compare or args.method not in UNTRAINED
    if args.fsdp and world == 1:
        p.error("--fsdp shards the base across ranks and needs more than one process: "
                "torchrun --nproc-per-node N train.py ...")
    if trains and world > args.meta_batch:
        p.error(f"world size {world} > --meta-batch {args.meta_batch}: a rank would have no task; "
                f"pass --meta-batch {world} or more (a multiple of {world} keeps every rank busy)")
    if trains and args.meta_batch > 1 and args.inner_opt == "persistent" and (
            args.compare or args.method in ("abmll", "reptile")):
        p.error(f"--inner-opt persistent carries one inner AdamW from task to task, which tasks "
                f"run side by side (--meta-batch {args.meta_batch}) do not have; pass --inner-opt "
                f"fresh")
    if trains and args.outer_opt == "sgd" and args.inner_opt == "persistent" and (
            args.compare or args.method == "abmll"):
        p.error("--outer-opt sgd: the persistent inner AdamW is a group of the outer AdamW; pass "
                "--inner-opt fresh")
    if args.fsdp and args.prune and "weight" in args.prune_mode:
        p.error("--fsdp: --prune-mode weight ranks each whole weight matrix, which FSDP splits "
                "across ranks; prune another mode or run without --fsdp")


def check_args(args, p):
    """The numeric hyperparameters, once the presets have filled them: one line naming the flag
    (exit 2). Each test is written as `lo < v < hi`, which nan fails too."""
    inf = math.inf
    if args.test_lr is None:
        args.test_lr = args.inner_lr
    if args.max_held_out is not None and args.max_held_out < 1:
        p.error(f"--max-held-out must be >= 1, got {args.max_held_out}")
    for k in ("lr", "inner_lr", "outer_lr", "test_lr", "a0", "b0", "alpha"):
        v = getattr(args, k)
        if not 0 < v < inf:
            p.error(f"--{k.replace('_', '-')} must be a finite number > 0, got {v}")
    for k in ("beta", "weight_decay"):
        v = getattr(args, k, 0.0)
        if not 0 <= v < inf:
            p.error(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v}")
    if not -inf < args.log_c < inf:
        p.error(f"--log-c must be a finite number, got {args.log_c}")
    if args.reptile_factors not in ("AB", "B"):
        p.error(f"--reptile-factors must be AB or B, got {args.reptile_factors!r}")
    if not 0 < args.reptile_eps <= 1:
        p.error(f"--reptile-eps must be in (0, 1], got {args.reptile_eps}")
