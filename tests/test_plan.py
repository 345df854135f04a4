"""plan.py: the predicted peak of a training step against a real one on this CPU, the 8B plan
without the 8B weights, and bench.py --plan's flags. Small random models, one thread."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import bench
import llama
import perf
import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a wider tiny model, rank-128 adapters on every linear: the weights, the adapters, AdamW's state
# (~20% of the peak) and the activations (20-40%) each big enough that leaving one out breaks 15%
SMALL = dataclasses.replace(llama.ModelArgs(**llama.CONFIGS["tiny"]), dim=256, hidden_dim=512,
                            vocab_size=4096, n_heads=8, n_kv_heads=4)
KW = dict(rank=128, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
B, T = 4, 64
JOBS = [(v, False) for v in plan.VARIANTS] + [("abmll_activation", True)]  # True: checkpointing
MEASURE = """
import json, sys, torch, llama, plan
margs, kw, B, T, jobs = json.loads(sys.argv[1])
print(json.dumps([plan.measure(llama.ModelArgs(**margs), v, B, T, torch.float32, ck, **kw)
                  for v, ck in jobs]))
"""


@pytest.fixture(scope="module")
def measured() -> dict:
    """Each job's measured peak (RSS rise, mmap threshold fixed), in a process of its own."""
    arg = json.dumps([dataclasses.asdict(SMALL), KW, B, T, JOBS])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", MEASURE, arg], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(zip(JOBS, json.loads(out.stdout.splitlines()[-1])))


@pytest.mark.parametrize("variant,ckpt", JOBS)
def test_prediction_within_15pc_of_the_measured_peak(measured, variant, ckpt):
    p = plan.plan(SMALL, variant, B, T, torch.float32, ckpt, **KW)
    ratio = p["peak_bytes"] / measured[variant, ckpt]
    assert 0.85 <= ratio <= 1.15, (p, measured[variant, ckpt])


@pytest.mark.parametrize("variant", plan.VARIANTS)
def test_count_equals_torchs_cpu_allocator(variant):
    """Above what is resident, the fake run's count is the real run's allocations (within 1%), as
    the profiler sees them in torch's CPU allocator (kernels' own scratch included)."""
    margs = llama.ModelArgs.from_name("tiny")
    p = plan.plan(margs, variant, 2, 32, torch.float32)
    torch.manual_seed(0)
    model, opt, loss_fn, _ = plan.setup(margs, variant, torch.float32, 2, 32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            bench.step_fn(loss_fn, opt)()
    now = peak = 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"):
        now += n
        peak = max(peak, now)
    assert abs(p["peak_bytes"] - p["start_bytes"] - peak) <= 0.01 * peak, (p, peak)


def test_plans_llama3_8b_without_its_weights():
    margs = llama.ModelArgs.from_name("llama3-8b")
    with torch.device("meta"):
        n = sum(t.numel() for t in llama.Transformer(margs).parameters())
    R = {}
    t0 = time.perf_counter()
    def run():
        R.update(plan.plan(margs, "lora", 2, 512, torch.bfloat16, steps=1))
    rss = perf.peak_memory(run, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    assert R["weight_bytes"] == 2 * n  # the frozen base, in bf16
    # fp32 adapters, rank 8 on wq (4096 -> 4096), wv (4096 -> 1024), wo (4096 -> 4096) of 32 blocks
    assert R["adapter_bytes"] == 4 * 32 * 8 * (2 * 4096 + 4096 + 1024 + 2 * 4096)
    assert R["peak_bytes"] > R["weight_bytes"] + 2 * 2**30  # activations of 2 x 512 tokens: GiBs
    assert seconds < 120
    if "peak_rss_rise_bytes" in rss:  # Linux: the process's peak RSS is reset before
        assert rss["peak_rss_rise_bytes"] < 2**30, rss  # 16 GB of weights are never allocated


def test_checkpointing_keeps_less():
    deep = dataclasses.replace(SMALL, n_layers=4)
    off, on = (plan.plan(deep, "lora", 8, 128, torch.float32, c, steps=1)["peak_bytes"]
               for c in (False, True))
    assert on < 0.8 * off


def bench_plan(monkeypatch, tmp_path, *argv) -> dict:
    out = tmp_path / "plan.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--plan", *argv, "--json", str(out)])
    bench.main()
    return json.loads(out.read_text())


def test_bench_plan_writes_the_three_predictions(monkeypatch, tmp_path, capsys):
    R = bench_plan(monkeypatch, tmp_path, "--model", "tiny", "--batch", "1", "--seq", "16",
                   "--dtype", "bf16", "--activation-checkpointing")
    assert "abmll_activation" in capsys.readouterr().out
    assert R["dtype"] == "bfloat16" and R["activation_checkpointing"] and R["seq"] == 16
    assert all(R[f"plan_{v}_peak_gib"] > 0 for v in plan.VARIANTS)
    p = plan.plan(llama.ModelArgs.from_name("tiny"), "lora", 1, 16, torch.bfloat16, True)
    assert R["plan_lora_peak_gib"] == p["peak_bytes"] / 2**30


@pytest.mark.parametrize("argv,flag", [(["--plan", "--model", "nope"], "--model"),
                                       (["--plan", "--model", "tiny", "--batch", "0"], "--batch"),
                                       (["--plan", "--model", "tiny", "--seq", "-1"], "--seq"),
                                       (["--plan", "--model", "tiny", "--seq", "4096"], "--seq"),
                                       (["--activation-checkpointing"], "--plan")])
def test_bad_flags_end_in_one_line(monkeypatch, argv, flag):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench.main()
    msg = str(e.value.code)
    assert msg.startswith("error: ") and flag in msg and "\n" not in msg


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError, match="--batch"):
        plan.plan(llama.ModelArgs.from_name("tiny"), "lora", 0, 16)
