"""Where a training step's time goes, and which of it does not scale with threads: torch.profiler's
self CPU time per operator of bench.py's steps, at one thread and at the machine's full count.

    python prof.py                                   # smollm2-135m, batch 2 x 256, 1 and N threads
    python prof.py --jobs lora_step abmll_step --steps 3 --json results/profile-cpu.json
    python prof.py --model tiny --random-init --steps 1    # seconds: the test's run

The jobs are bench.py's (the same models, batch, loss and AdamW): lora_step, abmll_step (weight
noise), abmll_step_act (activation noise), lora_step_bf16 (autocast) by default. Per job and thread
count: one warm-up step, then --steps profiled steps; an operator's figure is its self time
(its own work, not its children's) per step. Operators are also pooled into kinds (KINDS: the
GEMMs, the random numbers, elementwise arithmetic, copies and casts, the rest), so a line says
e.g. "normal_: 9% of the step at 2 threads, scaling 1.0x" - the part that stays serial.
Profiling adds a few microseconds per operator call: compare thread counts and jobs, not these
times with bench.py's.
"""

import argparse
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import bench

DEFAULT_JOBS = ("lora_step", "abmll_step", "abmll_step_act", "lora_step_bf16")
# operator kind -> the aten names (without "aten::") it pools; the rest is "other"
KINDS = {
    "gemm": {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear",
             "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward"},
    "random": {"normal_", "randn", "uniform_", "random_"},
    "copy/cast": {"copy_", "_to_copy", "to", "clone", "contiguous", "cat", "index", "index_select",
                  "embedding_dense_backward", "fill_", "zero_", "zeros", "empty", "empty_like",
                  "zeros_like", "full"},
    "elementwise": {"mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "exp", "exp_",
                    "rsqrt", "pow", "mean", "sum", "silu", "silu_backward", "neg", "cos", "sin",
                    "softmax", "_softmax", "_log_softmax", "_log_softmax_backward_data", "dot",
                    "lerp_", "addcmul_", "addcdiv_", "sqrt", "maximum", "where", "nll_loss_forward",
                    "nll_loss_backward", "_foreach_mul_", "_foreach_add_", "_foreach_addcmul_",
                    "_foreach_addcdiv_", "_foreach_sqrt", "_foreach_div_", "_foreach_lerp_",
                    "_fused_adamw_", "_foreach_add", "_foreach_mul", "_foreach_div", "_foreach_sub",
                    "_foreach_neg", "_foreach_pow", "_foreach_sqrt_", "_foreach_maximum_"},
}


def kind(op: str) -> str:
    name = op.removeprefix("aten::")
    return next((k for k, names in KINDS.items() if name in names), "other")


def profile_step(step, steps: int) -> dict:
    """{"wall_s": per step, "ops": {operator: {"self_s", "calls"} per step}} after one warm-up."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            step()
    ops, total = {}, 0.0
    for e in p.key_averages():
        if e.self_cpu_time_total > 0:
            ops[e.key] = {"self_s": e.self_cpu_time_total / 1e6 / steps, "calls": e.count / steps}
            total += e.self_cpu_time_total / 1e6 / steps
    return {"profiled_s": total, "ops": ops}


def by_kind(ops: dict) -> dict:
    out = defaultdict(float)
    for op, v in ops.items():
        out[kind(op)] += v["self_s"]
    return dict(out)


def run(args) -> dict:
    S, R = bench.setup(bench.parse_args(args.bench_argv))
    full = torch.get_num_threads()
    counts = sorted({full, 1}, reverse=True)
    out = {"model": R["model"], "batch": S.B, "seq": S.T, "steps": args.steps,
           "threads": counts, "torch": torch.__version__, "date": R["date"],
           "load_avg_1m": R["load_avg_1m"], "jobs": {}}
    for name in args.jobs:
        if name not in S.jobs:
            sys.exit(f"error: --jobs: {name!r} is not one of bench.py's jobs here: "
                     f"{', '.join(S.jobs)}")
        job, per = S.jobs[name], {}
        for n in counts:
            step = bench.step_fn(job.loss, job.opt)
            per[str(n)] = bench.at_threads(lambda: profile_step(step, args.steps), n)()
            per[str(n)]["kinds"] = by_kind(per[str(n)]["ops"])
        out["jobs"][name] = per
    return out


def print_report(P: dict, top: int):
    n, one = str(P["threads"][0]), "1"
    print(f"# prof.py {P['date']}  {P['model']}  batch {P['batch']} x {P['seq']}  {P['steps']} "
          f"profiled steps  threads {' and '.join(map(str, P['threads']))}  "
          f"load {P['load_avg_1m']:.2f}  torch {P['torch']}")
    for name, per in P["jobs"].items():
        a, b = per[n], per[one]
        scaling = b["profiled_s"] / a["profiled_s"]
        print(f"\n## {name}: {a['profiled_s'] * 1e3:,.0f} ms at {n} threads, "
              f"{b['profiled_s'] * 1e3:,.0f} ms at 1 (scaling {scaling:.2f}x)")
        print(f"| kind / operator | ms at {n} | share | ms at 1 | scaling |\n|---|---|---|---|---|")
        rows = [(k, a["kinds"].get(k, 0.0), b["kinds"].get(k, 0.0)) for k in (*KINDS, "other")]
        ops = sorted(a["ops"], key=lambda o: -a["ops"][o]["self_s"])[:top]
        rows += [(f"`{o}` ({a['ops'][o]['calls']:.0f} calls)", a["ops"][o]["self_s"],
                  b["ops"].get(o, {}).get("self_s", 0.0)) for o in ops]
        for label, ta, tb in rows:
            scale = f"{tb / ta:.2f}x" if ta > 0 else "-"
            share = ta / a["profiled_s"]
            print(f"| {label} | {ta * 1e3:,.1f} | {share:.1%} | {tb * 1e3:,.1f} | {scale} |")


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-operator profile of bench.py's steps at 1 and N "
                                "threads.")
    p.add_argument("--jobs", nargs="+", default=list(DEFAULT_JOBS), help="bench.py job names")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per job and thread count")
    p.add_argument("--top", type=int, default=12, help="operators listed per job")
    p.add_argument("--threads", type=int, help="the full count (default: torch's choice)")
    p.add_argument("--json", help="also write the figures to this file")
    args, rest = p.parse_known_args(argv)
    if args.steps < 1:
        sys.exit("error: --steps must be >= 1")
    set_threads(args.threads)
    args.bench_argv = [*rest, "--no-reference"]  # bench.py's model flags: --model, --batch, --seq
    P = run(args)
    print_report(P, args.top)
    write(args.json, P)
    return P


def set_threads(n: int | None):
    """--threads: torch's CPU thread count, if given (this tool's and ablate.py's)."""
    if n is not None:
        if n < 1:
            sys.exit("error: --threads must be >= 1")
        torch.set_num_threads(n)


def write(path: str | None, P: dict):
    """--json: the figures, written atomically, if a path is given."""
    if path:
        from pathlib import Path

        import resume
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        resume.write_json(Path(path), P)


if __name__ == "__main__":
    main()
