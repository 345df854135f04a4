"""What ABMLL's training step costs over LoRA's, part by part: bench.py's steps with each part of
ABMLL taken out in turn, all in the same interleaved rounds, so that each part's cost is a paired
difference with a confidence interval rather than a profile's guess.

    python ablate.py                                    # smollm2-135m, batch 2 x 256, all threads
    python ablate.py --repeats 9 --json results/ablate-cpu.json
    python ablate.py --model tiny --random-init --repeats 3    # seconds: the test's run
    GOMP_SPINCOUNT=1000 python ablate.py --rng-only            # the draw alone, workers spin less

Per noise mode (weight: the paper's; activation: the authors'), the variants of the inner step
(NLL + beta KL(q(phi) || p(theta)), AdamW on phi):
    full         ABMLL's step as bench.py times it
    no noise     every draw of eps (kernels.standard_normal) replaced by a fill of the same buffer
    no KL        abmll.model_kl replaced by 0: the NLL's step through the sampled layers alone
    neither      both: what is left is the sampled layer's own work (weight noise: the extra
                 weight-sized GEMM g^T x per adapted layer and the weight-sized passes)
A part's cost is full minus the variant without it, paired round by round: the median over
rounds and a distribution-free ~95% interval for it (order statistics of the differences). The
extra GEMM is also timed alone (`gemm_floor_s`: torch.mm(g^T, x) for every adapted layer's
shape), and so is the serial noise draw against a parallel one in blocks on a thread pool
(`rng`): torch's CPU normal_ runs on one thread. On the 2-core machine of README's table the
blocked draw alone was anywhere from 1.1x slower to 1.6x faster from run to run, more often faster
with OpenMP's workers told to spin less (GOMP_SPINCOUNT=1000), and inside the step no faster: our
reading is that torch's OpenMP worker, spinning after each parallel op, holds the second core.
The fill, the 0 and the pool are measurements only: nothing here changes a computed number.
"""

import argparse
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import torch

import abmll
import bench
import kernels
import perf
import prof
from lora import BayesLoRALinear

MODES = {"weight": "abmll_step", "activation": "abmll_step_act"}
VARIANTS = ("full", "no noise", "no KL", "neither")
# the ratio targets of issue 17: ABMLL step over LoRA step, per noise mode
TARGETS = {"weight": 1.2, "activation": 1.05}


@contextmanager
def ablated(variant: str):
    """kernels.standard_normal and/or abmll.model_kl replaced for the duration."""
    normal, kl = kernels.standard_normal, abmll.model_kl
    if variant in ("no noise", "neither"):
        kernels.standard_normal = lambda shape, gen, dtype, device: torch.ones(
            shape, dtype=dtype, device=device)
    if variant in ("no KL", "neither"):
        abmll.model_kl = lambda model, wrt=None: torch.zeros((), dtype=torch.float64)
    try:
        yield
    finally:
        kernels.standard_normal, abmll.model_kl = normal, kl


def median_interval(xs: list[float]) -> tuple[float, float, float]:
    """(median, low, high): order statistics k and n - k + 1 of xs, the widest k whose
    binomial coverage of the median is >= 95% (all of xs when n is too small for that)."""
    xs, n = sorted(xs), len(xs)
    k = 1
    while k + 1 <= n // 2 and 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n >= 0.95:
        k += 1
    return statistics.median(xs), xs[k - 1], xs[n - k]


def step_times(S, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of LoRA and of each mode's variants, interleaved rounds."""
    fns = {"lora": bench.step_fn(S.jobs["lora_step"].loss, S.jobs["lora_step"].opt)}
    for mode, job in MODES.items():
        step = bench.step_fn(S.jobs[job].loss, S.jobs[job].opt)
        for v in VARIANTS:
            fns[f"{mode}/{v}"] = partial(ablated_step, step, v)
    return perf.interleaved_times(fns, repeats, S.device)


def ablated_step(step, variant: str):
    with ablated(variant):
        return step()


def adapted_shapes(model) -> list[tuple[int, int]]:
    """(d_out, d_in) of every BayesLoRALinear in the model."""
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, BayesLoRALinear)]


def gemm_floor(S, repeats: int) -> float:
    """Seconds for g^T x of every adapted layer, N = batch x seq tokens: the weight gradient
    weight noise needs in backward and LoRA never makes."""
    N, shapes = S.B * S.T, adapted_shapes(S.models["abmll_step"])
    operands = {s: (torch.randn(N, s[0], device=S.device), torch.randn(N, s[1], device=S.device))
                for s in set(shapes)}

    def run():
        for s in shapes:
            g, x = operands[s]
            torch.mm(g.T, x)
    return statistics.median(perf.interleaved_times({"g": run}, repeats, S.device)["g"])


def rng(shape=(576, 576), block: int = 1 << 16, reps: int = 100) -> dict:
    """Milliseconds to draw eps of `shape`: torch.randn on one thread, and in blocks of `block`
    entries shared between this thread and a pool of the others, each measured alone and right
    after a GEMM of the layer's size (which wakes torch's OpenMP workers)."""
    threads, rows = torch.get_num_threads(), max(1, block // shape[1])
    pool = ThreadPoolExecutor(max(1, threads - 1))
    out = torch.empty(shape)
    views = [out[i:i + rows] for i in range(0, shape[0], rows)]

    def fill(part):
        for k, v in part:
            v.normal_(generator=torch.Generator().manual_seed(k))

    def blocked():
        parts = [list(enumerate(views))[t::threads] for t in range(threads)]
        pending = [pool.submit(fill, p) for p in parts[1:]]
        fill(parts[0])
        for f in pending:
            f.result()

    def serial():
        torch.randn(shape, generator=torch.Generator().manual_seed(0))

    x, w = torch.randn(512, shape[1]), torch.randn(*shape)
    times = {k: [] for k in ("serial", "blocked", "serial_after_gemm", "blocked_after_gemm")}
    for _ in range(reps):
        for name, f in (("serial", serial), ("blocked", blocked)):
            times[name].append(perf.seconds(f, torch.device("cpu")))
            x @ w.T
            times[f"{name}_after_gemm"].append(perf.seconds(f, torch.device("cpu")))
    pool.shutdown()
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out.update(shape=list(shape), block=block, threads=threads)
    return out


def run(args) -> dict:
    S, R = bench.setup(bench.parse_args(args.bench_argv))
    times = step_times(S, args.repeats)
    lora = times["lora"]
    out = {**R, "repeats": args.repeats, "lora_step_s": statistics.median(lora), "modes": {}}
    for mode in MODES:
        t = {v: times[f"{mode}/{v}"] for v in VARIANTS}
        parts = {"noise": (t["full"], t["no noise"]), "KL": (t["full"], t["no KL"]),
                 "sampled layer": (t["neither"], lora), "all": (t["full"], lora)}
        out["modes"][mode] = {
            "step_s": {v: statistics.median(ts) for v, ts in t.items()},
            "ratio_vs_lora": median_interval([a / b for a, b in zip(t["full"], lora)]),
            "target": TARGETS[mode],
            "parts_s": {p: median_interval([x - y for x, y in zip(a, b)])
                        for p, (a, b) in parts.items()}}
    if "abmll_step" in S.models and S.device.type == "cpu":
        out["gemm_floor_s"] = gemm_floor(S, args.repeats)
        d_in = max(s[1] for s in adapted_shapes(S.models["abmll_step"]))
        out["rng"] = rng((d_in, d_in))
    return out


def print_report(P: dict):
    lora = P["lora_step_s"]
    print(f"# ablate.py {P['date']}  {P['model']}  batch {P['batch']} x {P['seq']}  threads "
          f"{P['threads']}  {P['repeats']} rounds  load {P['load_avg_1m']:.2f}  torch {P['torch']}")
    print(f"LoRA step: {lora * 1e3:,.1f} ms (median)\n")
    print("| noise | ABMLL / LoRA (95% CI) | target | budget over LoRA | noise draws | KL | "
          "sampled layer | all |\n|---|---|---|---|---|---|---|---|")
    for mode, m in P["modes"].items():
        r = m["ratio_vs_lora"]
        cells = [f"{p[0] * 1e3:,.0f} ms ({p[1] * 1e3:,.0f} to {p[2] * 1e3:,.0f})"
                 for p in m["parts_s"].values()]
        print(f"| {mode} | {r[0]:.3f} ({r[1]:.3f} to {r[2]:.3f}) | {m['target']} | "
              f"{(m['target'] - 1) * lora * 1e3:,.0f} ms | " + " | ".join(cells) + " |")
    if "gemm_floor_s" in P:
        print(f"\nweight noise's extra GEMM g^T x, every adapted layer, timed alone: "
              f"{P['gemm_floor_s'] * 1e3:,.1f} ms")
    if "rng" in P:
        g = P["rng"]
        print(f"eps of {g['shape'][0]} x {g['shape'][1]}: torch.randn {g['serial']:.3f} ms "
              f"({g['serial_after_gemm']:.3f} right after a GEMM); in blocks of {g['block']:,} "
              f"on {g['threads']} threads {g['blocked']:.3f} ms ({g['blocked_after_gemm']:.3f})")


def main(argv=None):
    p = argparse.ArgumentParser(description="ABMLL's step cost over LoRA's, part by part "
                                "(paired ablations in interleaved rounds).")
    p.add_argument("--repeats", type=int, default=9, help="interleaved rounds (default 9)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--rng-only", action="store_true", help="only the serial against the blocked "
                   "draw of a 576 x 576 eps (no model)")
    args, rest = p.parse_known_args(argv)
    if args.repeats < 2:
        sys.exit("error: --repeats must be >= 2")
    prof.set_threads(args.threads)
    if args.rng_only:  # seconds: the draw alone, e.g. under another OpenMP setting
        import os
        g = rng()
        env = {k: os.environ.get(k, "unset") for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        print(f"{env}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in g.items()
                                     if isinstance(v, float)))
        return g
    args.bench_argv = [*rest, "--no-reference"]  # bench.py's model flags: --model, --batch, --seq
    P = run(args)
    print_report(P)
    prof.write(args.json, P)
    return P


if __name__ == "__main__":
    main()
