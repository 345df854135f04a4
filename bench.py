"""Speed and memory, side by side in one run: our forward against transformers', our LoRA step
against transformers + peft on the same weights, ABMLL's step against LoRA's, and each against
this machine's own matmul peak.

    python bench.py                              # CPU, smollm2-135m, batch 2 x 256, fp32 and bf16
    python bench.py --threads 1 --json out/b.json  # one thread: steadier on a busy shared machine
    python bench.py --malloc keep                # glibc keeps freed memory: no job pays fresh pages
    python bench.py --device cuda --model llama3-8b --random-init  # GPU: 8B, random bf16, 2 x 512
    python bench.py --model tiny --random-init --quick           # seconds: the smoke test's run
    python bench.py --plan --model llama3-8b --batch 2 --seq 512 --dtype bf16  # peaks (plan.py)

A run, in this file's order: 1) setup: our models on one set of weights (twins.py), each job's
loss and optimizer; 2) the reference: transformers + peft on the same weights, checked to give our
numbers before any step moves the adapters; 3) speed: the GEMM peak now, every job in the same
interleaved rounds (medians of --repeats), model FLOPs as a fraction of that peak; 4) memory:
bytes saved for backward, peak RSS (CUDA: peak allocated); 5) growth (bench_growth.py): ABMLL
over training tasks, both methods over sequence length; 6) the report. How each figure is measured: perf.py. A
speedup is their time / our time (> 1: we are faster); other ratios put ours (or ABMLL) in the
numerator. Without transformers + peft (or with --no-reference) their rows are skipped. On a CPU
with fp32 weights our steps also run in bf16: under torch.autocast around the forward (jobs
*_bf16) and on a bf16 copy of the frozen weights with fp32 adapters (*_bf16w). In bf16, ABMLL's
weight noise at its initial scale rounds away (tests/test_bench.py).

--json: one flat object. Per job (forward, scoring_forward, transformers_forward,
transformers_scoring_forward, and the steps in twins.ours, peft_lora_step, lora_step_bf16,
abmll_step_bf16): {job}_s, {job}_tokens_per_s; per step also {job}_flops, {job}_mfu (CUDA),
{job}_fraction_of_gemm_peak, {job}_saved_bytes and perf.peak_memory's {job}_peak_rss_bytes,
{job}_peak_rss_rise_bytes, {job}_cuda_peak_bytes; every job's {job}_minor_faults (one step after
the rounds: the fresh pages its steady state takes, perf.minor_faults); growth: abmll_tasks_{n}_*,
{lora,abmll}_seq_{T}_*; the ratios in bench_report.RATIOS.
"""

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Callable, NamedTuple

import torch

import abmll
import bench_report
import llama
import perf
import twins

# -----------------------------------------------------------------------------
# 1) setup: our models, the batch, the jobs


class Job(NamedTuple):
    loss: Callable  # one step's loss
    opt: torch.optim.Optimizer
    method: str  # "lora" / "abmll": how perf.model_flops counts the step
    against: str  # "fp32" / "bf16": the GEMM peak its FLOP/s are held against


@dataclass
class Setup:
    """What every section reads."""
    args: argparse.Namespace
    device: torch.device
    B: int
    T: int
    repeats: int
    peak_of: str  # "fp32" / "bf16": the weights' GEMM peak
    base: llama.Transformer
    models: dict  # job name -> a twin of base with that job's adapters (twins.ours)
    batch: dict
    cfg: abmll.Config = field(default_factory=abmll.Config)
    jobs: dict = field(default_factory=dict)  # name -> Job
    hf: object = None  # the reference: transformers' model and peft's, on the same weights
    peft: object = None
    peak: dict = field(default_factory=dict)  # key suffix -> "fp32" / "bf16" -> GEMM FLOP/s, now
    exclude: set = field(default_factory=set)  # every model's storages: resident, never "saved"


def base_model(args, device, dtype) -> llama.Transformer:
    if args.random_init:
        return llama.random_model(llama.ModelArgs.from_name(args.model), device, dtype)
    import fetch
    try:
        return llama.load(fetch.resolve_model(args.model), device=device, dtype=dtype)[0]
    except (llama.LoadError, fetch.FetchError) as e:
        sys.exit(f"error: --model: {e}")


def make_batch(vocab: int, B: int, T: int, device, seed: int = 0) -> dict:
    """Random prompts whose last token is the answer: the logits at T-2 are scored against
    token T-1."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (B, T), generator=g)
    return {"tokens": tokens.to(device), "answer_pos": torch.full((B,), T - 2, device=device),
            "answer_ids": tokens[:, -1].to(device)}


def our_loss(model, batch, method: str, cfg: abmll.Config, amp=None):
    """abmll.lora_step's (method "lora") or abmll_inner_step's ("abmll") loss. Autocast covers
    the network's forward only, as torch.amp advises; the KL stays in fp32 (kernels.py's KL sums
    reject bf16 operands)."""
    with amp or nullcontext():
        loss = abmll.nll_loss(model, batch)
    if method == "abmll":
        loss = loss + cfg.beta * abmll.model_kl(model, wrt="phi")
    return loss


def step_fn(loss_fn, opt):
    """One training step of loss_fn(), as abmll._step takes it: zero_grad, backward, AdamW."""
    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def adamw(params, lr):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr)


def our_jobs(S: Setup) -> dict[str, Job]:
    """Each model's training step; with bf16 twins, LoRA's and ABMLL's also under bf16 autocast
    (the same model and optimizer)."""
    jobs, amp = {}, torch.autocast("cpu", dtype=torch.bfloat16)
    autocast_twin = {"lora_step": "lora_step_bf16", "abmll_step": "abmll_step_bf16"}
    for name, model in S.models.items():
        method = name.split("_")[0]
        if method == "lora":
            opt = adamw(model.parameters(), S.cfg.lr)
        else:  # the inner step's: phi
            opt = adamw(abmll.param_groups(model)["phi"].values(), S.cfg.inner_lr)
        against = "bf16" if name.endswith("_bf16w") else S.peak_of
        # activation noise is counted as LoRA's useful work: its extra low-rank products are not
        flops_as = "lora" if name == "abmll_step_act" else method
        jobs[name] = Job(partial(our_loss, model, S.batch, method, S.cfg), opt, flops_as, against)
        if name in autocast_twin and "lora_step_bf16w" in S.models:
            loss = partial(our_loss, model, S.batch, method, S.cfg, amp)
            jobs[autocast_twin[name]] = Job(loss, opt, method, "bf16")
    return jobs


def setup(args) -> tuple[Setup, dict]:
    """The models, the batch, our jobs, and R: the run's facts, the first keys of --json."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # tensors say cuda:0: live_tensor_bytes
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    B, T = args.batch, args.seq or (512 if device.type == "cuda" else 256)
    torch.manual_seed(0)
    base = base_model(args, device, dtype)
    if T > base.args.max_seq_len:
        sys.exit(f"error: --seq {T} exceeds the model's max_seq_len {base.args.max_seq_len}")
    models = twins.ours(base, bf16_weights=device.type == "cpu" and dtype == torch.float32)
    S = Setup(args, device, B, T, 2 if args.quick else args.repeats,
              "fp32" if dtype == torch.float32 else "bf16", base, models,
              make_batch(base.args.vocab_size, B, T, device))
    S.jobs = our_jobs(S)
    R = {"model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
         "batch": B, "seq": T, "repeats": S.repeats, "threads": torch.get_num_threads(),
         "torch": torch.__version__,
         "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         "load_avg_1m": os.getloadavg()[0], "date": datetime.now().isoformat(timespec="seconds"),
         "reference": twins.reference_available() and not args.no_reference,
         "malloc": args.malloc}
    return S, R


# -----------------------------------------------------------------------------
# 2) the reference: transformers + peft on our weights


def reference(S: Setup, R: dict):
    """peft's LoRA step joins the jobs; before any step, theirs must compute our numbers."""
    S.hf, S.peft = twins.hf_twin(S.base), twins.peft_lora(twins.hf_twin(S.base))
    tokens = S.batch["tokens"]
    labels = torch.full_like(tokens, -100)  # transformers' usual labels: it shifts them itself
    labels[:, -1] = S.batch["answer_ids"]

    def peft_loss():
        return S.peft(input_ids=tokens, labels=labels, use_cache=False).loss

    opt = adamw(S.peft.parameters(), S.cfg.lr)
    S.jobs["peft_lora_step"] = Job(peft_loss, opt, "lora", S.peak_of)
    with torch.no_grad():  # same weights, same numbers: B = 0 adapters leave the base model's loss
        theirs = S.hf(input_ids=tokens, use_cache=False).logits.float()
        R["forward_max_abs_diff"] = (S.base(tokens).float() - theirs).abs().max().item()
        ours = S.jobs["lora_step"].loss().item()
        R["lora_loss_abs_diff_vs_peft"] = abs(ours - peft_loss().item())


# -----------------------------------------------------------------------------
# 3) speed


def forward(model, tokens, **kw):
    def f():
        with torch.no_grad():
            model(tokens, **kw)
    return f


def thread_counts(S: Setup) -> dict[str, int]:
    """Key suffix -> CPU threads: the full count ("", today's keys) and, on a CPU with more than
    one thread, one thread ("_1t") in the same rounds."""
    full = torch.get_num_threads()
    one = S.device.type == "cpu" and full > 1 and not S.args.no_1t
    return {"": full, **({"_1t": 1} if one else {})}


def at_threads(fn, n: int):
    """fn run with n torch CPU threads, the previous count restored after."""
    def f():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return f


def speed(S: Setup, R: dict):
    """This machine's dense matmul peak now, then every job in the same interleaved rounds, at
    each thread count of `thread_counts` (a round runs every job at N threads, then at 1): median
    seconds, tokens/s, model FLOPs and their fraction of that count's peak (MFU: of a GPU's
    nominal peak), and each job's scaling, its 1-thread time over its N-thread time."""
    n = 1024 if S.args.quick else (8192 if S.device.type == "cuda" else 2048)
    counts = thread_counts(S)
    R["thread_counts"] = list(counts.values())
    for x, t in counts.items():
        S.peak[x] = {p: at_threads(partial(perf.gemm_flops, S.device, getattr(torch, dt), n,
                                           max(S.repeats, 5)), t)()
                     for p, dt in (("fp32", "float32"), ("bf16", "bfloat16"))}
        R[f"gemm_fp32_flops{x}"], R[f"gemm_bf16_flops{x}"] = S.peak[x]["fp32"], S.peak[x]["bf16"]
    if S.device.type == "cuda":
        R["nominal_bf16_peak_flops"] = perf.nominal_bf16_peak(R["device_name"])
    tokens, at = S.batch["tokens"], S.batch["answer_pos"][:, None]
    timed = {"forward": forward(S.base, tokens),
             "scoring_forward": forward(S.base, tokens, logits_at=at)}
    if S.hf is not None:  # theirs for scoring at its best: logits of the last two positions only
        timed["transformers_forward"] = forward(S.hf, tokens, use_cache=False)
        timed["transformers_scoring_forward"] = forward(S.hf, tokens, use_cache=False,
                                                        logits_to_keep=2)
    timed.update({k: step_fn(job.loss, job.opt) for k, job in S.jobs.items()})
    rounds = {(k, x): at_threads(f, t) for x, t in counts.items() for k, f in timed.items()}
    for (k, x), t in perf.medians(rounds, S.repeats, S.device).items():
        R[f"{k}_s{x}"] = t
        R[f"{k}_tokens_per_s{x}"] = S.B * S.T / t
    R["forward_flops"] = perf.model_flops(S.base.args, S.B, S.T, S.B * S.T, None)
    for x in counts:
        R[f"forward_fraction_of_gemm_peak{x}"] = (R["forward_flops"] / R[f"forward_s{x}"]
                                                  / S.peak[x][S.peak_of])
        for k, job in S.jobs.items():
            R[f"{k}_flops"] = perf.model_flops(S.base.args, S.B, S.T, S.B, job.method)
            peak = S.peak[x][job.against]
            R[f"{k}_fraction_of_gemm_peak{x}"] = R[f"{k}_flops"] / R[f"{k}_s{x}"] / peak
    for k, f in timed.items():  # after the rounds: the steady state's fresh pages (perf.py)
        R[f"{k}_minor_faults"] = perf.minor_faults(f)
        if "_1t" in counts:
            R[f"{k}_thread_scaling"] = R[f"{k}_s_1t"] / R[f"{k}_s"]
        if R.get("nominal_bf16_peak_flops") and k in S.jobs:
            R[f"{k}_mfu"] = R[f"{k}_flops"] / R[f"{k}_s"] / R["nominal_bf16_peak_flops"]


# -----------------------------------------------------------------------------
# 4) memory


def memory(S: Setup, R: dict):
    """Each step's bytes saved for backward, and one step's peak RSS (CUDA: peak allocated)."""
    theirs = [m for m in (S.hf, S.peft) if m is not None]
    S.exclude = perf.resident_ptrs(S.base, *S.models.values(), *theirs)
    for k, job in S.jobs.items():
        R[f"{k}_saved_bytes"] = perf.saved_bytes(job.loss, S.exclude)
        peaks = perf.peak_memory(step_fn(job.loss, job.opt), S.device)  # peak_rss_bytes, ...
        R.update({f"{k}_{m}": v for m, v in peaks.items()})


# -----------------------------------------------------------------------------
# 5) growth: bench_growth.py


def run(args) -> dict:
    """The sections in order, every figure into one flat dict (the keys of --json)."""
    t0 = time.perf_counter()
    S, R = setup(args)
    if R["reference"]:
        reference(S, R)
    R["setup_s"] = time.perf_counter() - t0
    speed(S, R)
    memory(S, R)
    import bench_growth  # it imports this module: resolved at call time
    bench_growth.over_tasks(S, R)
    bench_growth.over_seq(S, R)
    bench_report.ratios(R)
    return R


# -----------------------------------------------------------------------------
# 6) the report: the ratios and the table (bench_report.py), --json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark our forward, LoRA and ABMLL steps against "
                                "transformers + peft.")
    p.add_argument("--model", default="smollm2-135m", help="built-in name or checkpoint path; "
                   f"with --random-init one of {', '.join(llama.CONFIGS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--random-init", action="store_true",
                   help="random weights of the named shape, no checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   type=lambda s: {"fp32": "float32", "bf16": "bfloat16"}.get(s, s),
                   help="weight dtype (default: float32 on CPU, bfloat16 on CUDA; fp32, bf16 also "
                   "accepted)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: 256 on CPU, 512 on CUDA)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds after the warm-up; figures are medians")
    p.add_argument("--threads", type=int, help="torch CPU threads, the full count (default: "
                   "torch's choice, one per core); on a CPU every speed figure is also measured "
                   "at one thread, in the same rounds (keys *_1t)")
    p.add_argument("--no-1t", action="store_true", help="skip the one-thread figures (half the "
                   "speed section's time)")
    p.add_argument("--quick", action="store_true",
                   help="2 rounds, short growth sweeps, a small GEMM: a smoke run")
    p.add_argument("--no-reference", action="store_true",
                   help="skip transformers + peft even when installed")
    p.add_argument("--malloc", choices=["default", "keep"], default="default", help="keep: glibc "
                   "keeps freed memory for reuse, as a caching allocator does (perf.keep_freed_"
                   "memory), so no job pays for fresh pages; default: glibc as a user has it")
    p.add_argument("--json", help="also write every figure to this file, one flat JSON object")
    p.add_argument("--plan", action="store_true", help="only predict the peak memory of a LoRA and "
                   "ABMLL step (plan.py): built-in shapes, no weights, no GPU; --device cuda plans "
                   "CUDA's foreach AdamW")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="with --plan: each decoder layer recomputed in backward")
    args = p.parse_args(argv)
    args.random_init |= args.plan  # --plan needs shapes only
    return args


def check(args):
    """A flag a user got wrong: one line, which flag and why."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        sys.exit(f"error: --device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available() and not args.plan:
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    if args.random_init and args.model not in llama.CONFIGS:
        sys.exit(f"error: --model {args.model!r} with --random-init or --plan must be one of "
                 f"{', '.join(llama.CONFIGS)}")
    too_small = min(args.batch, args.repeats, args.threads or 1) < 1
    if too_small or (args.seq is not None and args.seq < 4):
        sys.exit("error: --batch, --repeats and --threads must be >= 1, --seq >= 4")
    if args.activation_checkpointing and not args.plan:
        sys.exit("error: --activation-checkpointing is a --plan option (the benchmark has none)")


def main():
    args = parse_args()
    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan:
        import plan
        return plan.main(args)
    if args.malloc == "keep" and not perf.keep_freed_memory():
        sys.exit("error: --malloc keep needs glibc's mallopt, which this system lacks")
    R = run(args)
    if R["reference"]:
        import peft
        import transformers
        R["transformers"], R["peft"] = transformers.__version__, peft.__version__
    bench_report.print_table(R)
    bench_report.print_growth(R)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(R, f, indent=1)


if __name__ == "__main__":
    main()
