"""The GPU check as one prepared script: speed and peak memory of the 8B shape on one CUDA GPU,
beside the memory planner's prediction, in well under 10 minutes, with no network, checkpoint or
data set.

    python3 gpu_check.py --out "$OUT"                            # one CUDA GPU: llama3-8b, bf16
    python3 gpu_check.py --device cpu --model tiny --out out/gc  # the same steps on a CPU, ~1 min
    DEVICE=cpu MODEL=tiny OUT=out/gc python3 gpu_check.py        # the same, from the environment

Parts, each a subprocess with its own time limit inside one total budget (--budget, 420 s), each
one's result written to --out as soon as it ends, so that a part that fails or runs out of time
leaves the others' results:
  plan    bench.py --plan for the same shape, without and with --activation-checkpointing (fake
          tensors, CPU work: on CUDA it runs beside the GPU parts) -> plan.json, plan-ckpt.json
  bench   bench.py --device cuda --model llama3-8b --random-init --batch 2 --seq 512 (bf16):
          forward, LoRA and ABMLL steps, tokens/s, MFU, CUDA peak per step -> bench.json (if it
          fails with transformers + peft as the reference, once more with --no-reference)
  train   train.py --random-init (random weights, byte-level tokenizer, synthetic tasks) with
          --method lora, then abmll: 2 epochs x 20 tasks x K = 5 = 200 steps of 2 x 512 tokens
          each, with validation and test on 2 held-out tasks -> train-lora.json, train-abmll.json
          (the run's speed.json, final.json, metrics)
  summary summary.json, rewritten after every part, and a table at the end: tokens/s, MFU (model
          FLOPs over the nominal bf16 peak, perf.py's count), CUDA peak allocated against the
          planner's prediction
Every part's output goes to gpu_check.log; the run directories stay in a temporary folder. --out
holds at most 7 files (the device tool brings back 8). Accuracy on random weights and random
labels means nothing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GIB = 2**30
CAPS = {"bench": 200, "train-lora": 100, "train-abmll": 120, "plan": 180}  # s, within --budget
RESERVE = 10  # seconds kept for the summary


class Check:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "gpu_check.log"
        self.log.write_text("")
        self.t0, self.deadline = time.time(), time.time() + args.budget
        self.S = {"model": args.model, "device": args.device, "batch": 2, "seq": args.seq,
                  "dtype": args.dtype, "budget_s": args.budget, "python": sys.version.split()[0],
                  "parts": {}}

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE

    def note(self, text: str):
        with open(self.log, "a") as f:
            f.write(text)
        print(text, end="", flush=True)

    def save(self):
        self.S["elapsed_s"] = time.time() - self.t0
        import resume  # train.py's atomic JSON write: a kill leaves the last summary whole
        resume.write_json(self.out / "summary.json", self.S)

    def run(self, name: str, cmd: list[str], cap: float) -> dict:
        """cmd under min(cap, what is left of the budget), its output appended to the log; a
        too-short slot skips."""
        limit = min(cap, self.left())
        if limit < 15:
            part = {"skipped": f"budget: {max(limit, 0):.0f} s left"}
        else:
            self.note(f"\n=== {name}: {' '.join(cmd)}  (limit {limit:.0f} s)\n")
            t = time.time()
            with open(self.log, "a") as f:
                try:
                    rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                        timeout=limit, env=self.env).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            part = {"rc": rc, "wall_s": round(time.time() - t, 1), "limit_s": round(limit)}
            if rc != 0:  # its last line: a one-line error, or a traceback's last
                tail = self.log.read_text().rpartition(f"=== {name}: ")[2]
                lines = tail.strip().splitlines()[1:]
                part["error"] = lines[-1][:300] if lines else ""
        self.S["parts"][name] = part
        self.note(f"=== {name}: {part}\n")
        self.save()
        return part

    @property
    def env(self):
        return {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_plans(c: Check, tmp: Path) -> dict:
    """Both planner runs in the background (CPU only), each with its own log:
    name -> (process, log, start)."""
    a, procs = c.args, {}
    for name, extra in (("plan", []), ("plan-ckpt", ["--activation-checkpointing"])):
        cmd = [sys.executable, "bench.py", "--plan", "--model", a.model, "--batch", "2",
               "--seq", str(a.seq), "--dtype", a.dtype, "--device", a.device,
               "--json", str(c.out / f"{name}.json"), *extra]
        log = open(tmp / f"{name}.log", "w")
        c.note(f"\n=== {name} (background): {' '.join(cmd)}\n")
        # leave cores to the GPU parts' host side
        env = c.env | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs[name] = (proc, log, time.time())
    return procs


def finish_plans(c: Check, procs: dict):
    for name, (proc, log, t) in procs.items():
        try:
            rc = proc.wait(timeout=max(1, min(CAPS["plan"] - (time.time() - t), c.left())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        log.close()
        c.note(f"\n=== {name} output:\n" + Path(log.name).read_text())
        c.S["parts"][name] = {"rc": rc, "wall_s": round(time.time() - t, 1)}
        c.note(f"=== {name}: {c.S['parts'][name]}\n")
        path = c.out / f"{name}.json"
        if rc == 0 and not path.exists():
            c.S["parts"][name]["rc"] = f"exit 0 but no {name}.json"
        elif rc == 0:
            R = json.loads(path.read_text())
            c.S[name] = {k: v for k, v in R.items() if k.endswith("_peak_bytes")}
    c.save()


def bench_part(c: Check):
    a = c.args
    cmd = [sys.executable, "bench.py", "--device", a.device, "--model", a.model, "--random-init",
           "--batch", "2", "--seq", str(a.seq), "--json", str(c.out / "bench.json")]
    cmd += ["--quick"] * a.quick + ["--no-reference"] * a.no_reference
    part = c.run("bench", cmd, CAPS["bench"])
    tail = c.log.read_text().rpartition("=== bench: ")[0][-4000:]  # its output, traceback and all
    failed = part.get("rc") not in (0, "timeout", None) and not a.no_reference
    if failed and any(w in tail for w in ("transformers", "peft", "hf_twin")):
        # the reference broke: ours alone, once more
        part = c.run("bench-no-reference", cmd + ["--no-reference"], CAPS["bench"])
    path = c.out / "bench.json"
    if part.get("rc") == 0 and not path.exists():
        part["rc"] = "exit 0 but no bench.json"
    if part.get("rc") == 0:
        R = json.loads(path.read_text())
        keep = ("_s", "_tokens_per_s", "_mfu", "_fraction_of_gemm_peak", "_cuda_peak_bytes",
                "_saved_bytes")
        sweeps = ("abmll_tasks", "lora_seq", "abmll_seq")
        c.S["bench"] = {k: v for k, v in R.items() if k.endswith(keep) and not k.startswith(sweeps)}
        facts = ("device_name", "torch", "gemm_bf16_flops", "gemm_fp32_flops",
                 "nominal_bf16_peak_flops", "reference", "transformers", "peft")
        c.S["bench"] |= {k: R.get(k) for k in facts}
        c.save()


def train_part(c: Check, method: str, runs: Path):
    a = c.args
    cmd = [sys.executable, "train.py", "--random-init", "--model", a.model, "--device", a.device,
           "--method", method, "--dtype", "bf16" if a.dtype == "bf16" else "fp32",
           "--epochs", str(a.epochs), "--tasks-per-epoch", str(a.tasks_per_epoch),
           "--max-query", "8", "--max-held-out", "2", "--max-len", str(a.seq), "--out", str(runs)]
    name = f"train-{method}"
    part = c.run(name, cmd, CAPS[name])
    rundir = runs / "synthetic" / method / "seed0"
    written = all((rundir / f).exists() for f in ("speed.json", "final.json"))
    if part.get("rc") == 0 and not written:
        part["rc"] = "exit 0 but no speed.json / final.json"
    if part.get("rc") != 0:
        c.save()
        return
    history = (rundir / "metrics.jsonl").read_text().splitlines()
    T = {"speed": json.loads((rundir / "speed.json").read_text()),
         "final": json.loads((rundir / "final.json").read_text()),
         "history": [json.loads(line) for line in history]}
    sp = T["speed"]
    if sp["train_steps"]:
        import llama
        import perf  # the FLOP count of one step, as bench.py counts it (torch only; no CUDA here)

        seq = sp["train_tokens"] / sp["train_steps"] / 2  # synthetic prompts: 2 x --max-len a step
        T["tokens_per_step"] = sp["train_tokens"] / sp["train_steps"]
        margs = llama.ModelArgs.from_name(a.model)
        T["flops_per_step"] = perf.model_flops(margs, 2, round(seq), 2, method)
        peak = perf.nominal_bf16_peak(sp["device_name"])
        if peak and sp["train_s"]:
            T["mfu"] = T["flops_per_step"] * sp["train_steps"] / sp["train_s"] / peak
    (c.out / f"{name}.json").write_text(json.dumps(T, indent=1))
    c.S[name] = {k: v for k, v in T.items() if k != "history"}
    c.save()


def gib(v):
    if v is None:
        return "-"
    return f"{v / GIB:.2f} GiB" if v >= GIB else f"{v / 2**20:.1f} MiB"


def num(v, f="{:.3f}"):
    return "-" if v is None else f.format(v)


def summary_rows(S: dict) -> list[dict]:
    """One row per measured step: tokens/s, MFU, CUDA peak allocated, the planner's peak and
    their ratio."""
    B, plan, ckpt, rows = S.get("bench", {}), S.get("plan", {}), S.get("plan-ckpt", {}), []
    for label, k, v in (("bench LoRA step", "lora_step", "lora"),
                        ("bench ABMLL step", "abmll_step", "abmll_weight"),
                        ("bench ABMLL step, activation noise", "abmll_step_act",
                         "abmll_activation"),
                        ("bench peft LoRA step", "peft_lora_step", "lora"),
                        ("bench forward (all logits)", "forward", None)):
        if f"{k}_s" in B:
            rows.append({"run": label, "step_s": B[f"{k}_s"],
                         "tokens_per_s": B.get(f"{k}_tokens_per_s"), "mfu": B.get(f"{k}_mfu"),
                         "of_gemm_peak": B.get(f"{k}_fraction_of_gemm_peak"),
                         "peak_bytes": B.get(f"{k}_cuda_peak_bytes"), "plan": v})
    for m, v in (("lora", "lora"), ("abmll", "abmll_weight")):
        T = S.get(f"train-{m}")
        if T:
            sp = T["speed"]
            gemm = B.get("gemm_bf16_flops" if S["dtype"] == "bf16" else "gemm_fp32_flops")
            rate = None
            if T.get("flops_per_step"):
                rate = T["flops_per_step"] * sp["train_steps"] / sp["train_s"]
            rows.append({"run": f"train.py {m}, {sp['train_steps']} steps",
                         "step_s": sp["train_s"] / sp["train_steps"] if sp["train_steps"] else None,
                         "tokens_per_s": sp["train_tokens_per_s"], "mfu": T.get("mfu"),
                         "of_gemm_peak": rate / gemm if rate and gemm else None,
                         "peak_bytes": sp.get("cuda_peak_allocated_bytes"),
                         "reserved_bytes": sp.get("cuda_peak_reserved_bytes"), "plan": v})
    for r in rows:
        v = r.pop("plan")
        r["planned_bytes"] = plan.get(f"plan_{v}_peak_bytes") if v else None
        r["planned_ckpt_bytes"] = ckpt.get(f"plan_{v}_peak_bytes") if v else None
        r["measured_over_planned"] = (r["peak_bytes"] / r["planned_bytes"]
                                      if r["peak_bytes"] and r["planned_bytes"] else None)
    return rows


def print_summary(S: dict):
    B = S.get("bench", {})
    print(f"\n# gpu_check {S['model']} on {B.get('device_name') or S['device']} ({S['dtype']}), "
          f"batch 2 x {S['seq']}, torch {B.get('torch', '?')}, "
          f"{S['elapsed_s']:.0f} s of a {S['budget_s']} s budget")
    cols = ["run", "step", "tokens/s", "MFU", "of GEMM peak", "peak allocated", "planned",
            "measured / planned", "planned, checkpointing"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in S["rows"]:
        cells = [r["run"], num(r["step_s"] and r["step_s"] * 1e3, "{:,.1f} ms"),
                 num(r["tokens_per_s"], "{:,.0f}"), num(r["mfu"]), num(r["of_gemm_peak"]),
                 gib(r["peak_bytes"]), gib(r["planned_bytes"]), num(r["measured_over_planned"]),
                 gib(r["planned_ckpt_bytes"])]
        print("| " + " | ".join(cells) + " |")
    for m in ("lora", "abmll"):
        T = S.get(f"train-{m}")
        if T:
            f = T["final"]
            reserved = gib(T["speed"].get("cuda_peak_reserved_bytes"))
            print(f"train.py {m}: test accuracy {f['test_acc']:.3f} "
                  f"(chance {f['test_chance']:.3f}; random weights and labels: means nothing), "
                  f"peak reserved {reserved}, run {T['speed']['run_s']:.0f} s")
    for name, label in (("plan", "planner"), ("plan-ckpt", "planner, activation checkpointing")):
        if S.get(name):
            peaks = [f"{v} {gib(S[name].get(f'plan_{v}_peak_bytes'))}"
                     for v in ("lora", "abmll_weight", "abmll_activation")]
            print(f"{label}: " + ", ".join(peaks))
    done = [f"{k} " + (f"rc {p['rc']} {p['wall_s']:.0f} s" if "rc" in p else p["skipped"])
            for k, p in S["parts"].items()]
    print("parts: " + ", ".join(done))
    for k, p in S["parts"].items():
        if p.get("error"):
            print(f"{k}: {p['error']}")


def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description="The GPU check: bench.py and train.py --random-init "
                                "at the 8B shape, beside the planner's prediction, in one "
                                "time-limited run.")
    p.add_argument("--out", default=env("OUT") or "out/gpu-check",
                   help="where the JSON files and the log go (default: $OUT, else out/gpu-check)")
    p.add_argument("--device", default=env("DEVICE") or "cuda",
                   help="cuda (default: $DEVICE, else cuda) or cpu")
    p.add_argument("--model", default=env("MODEL") or "llama3-8b",
                   help="a llama.CONFIGS shape (default: $MODEL, else llama3-8b)")
    p.add_argument("--seq", type=int, default=512,
                   help="tokens per sequence, batch 2 (default 512)")
    p.add_argument("--epochs", type=int, default=2, help="train.py epochs (default 2)")
    p.add_argument("--tasks-per-epoch", type=int, default=20,
                   help="train.py tasks per epoch, K = 5 steps each (default 20)")
    p.add_argument("--budget", type=float, default=420, help="seconds for everything (default 420)")
    p.add_argument("--no-reference", action="store_true",
                   help="bench.py without transformers + peft")
    args = p.parse_args(argv)
    import llama  # torch, no CUDA

    if args.model not in llama.CONFIGS:
        p.error(f"--model {args.model!r} must be one of {', '.join(llama.CONFIGS)}")
    cuda = args.device.startswith("cuda")
    args.dtype = "bf16" if cuda else "float32"
    args.quick = not cuda  # on a CPU a smoke run: bench --quick
    return args


def nvidia_smi(c: Check):
    """The GPU's name, memory and driver into the summary and the log, where nvidia-smi exists."""
    if not shutil.which("nvidia-smi"):
        return
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        c.S["nvidia_smi"] = out
    except (OSError, subprocess.TimeoutExpired) as e:
        c.S["nvidia_smi"] = f"failed: {e}"
    c.note(f"nvidia-smi: {c.S['nvidia_smi']}\n")


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    c = Check(args)
    nvidia_smi(c)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        plans = start_plans(c, Path(tmp))
        if not cuda:  # on a CPU they would slow the timed parts
            finish_plans(c, plans)
        bench_part(c)
        for method in ("lora", "abmll"):
            train_part(c, method, Path(tmp) / "runs")
        if cuda:
            finish_plans(c, plans)
    c.S["rows"] = summary_rows(c.S)
    c.save()
    print_summary(c.S)
    parts = {k: v.get("rc") == 0 for k, v in c.S["parts"].items()}
    parts["bench"] = parts.pop("bench", False) or parts.pop("bench-no-reference", False)
    return 0 if all(parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
