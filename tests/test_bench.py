"""bench.py: the smoke run (tiny random model on CPU, seconds), perf.py's FLOP count against torch's
own, and how far bf16 rounds ABMLL's initial weight noise."""

import copy
import json
import math
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import abmll
import bench
import llama
import perf

REQUIRED = ["forward_speedup_vs_transformers", "lora_step_speedup_vs_peft", "lora_step_bf16_speedup_vs_peft",
            "abmll_vs_lora_step_time", "abmll_vs_lora_saved_bytes", "lora_step_fraction_of_gemm_peak"]
OURS = ["forward_s", "scoring_forward_s", "lora_step_s", "abmll_step_s", "lora_step_bf16_s", "abmll_step_bf16_s", "lora_step_saved_bytes",
        "abmll_step_saved_bytes", "gemm_fp32_flops", "gemm_bf16_flops", "abmll_vs_lora_step_time",
        "abmll_vs_lora_saved_bytes", "lora_step_fraction_of_gemm_peak", "abmll_task_growth_saved_bytes",
        "abmll_vs_lora_step_time_seq_32"]
REFERENCE = ["forward_speedup_vs_transformers", "scoring_forward_speedup_vs_transformers", "lora_step_speedup_vs_peft", "lora_step_bf16_speedup_vs_peft"]


def bench_json(tmp_path, monkeypatch, *extra) -> dict:
    """Run the CLI in this process (no second interpreter to start) and read its JSON."""
    out = tmp_path / "bench.json"
    argv = ["bench.py", "--model", "tiny", "--random-init", "--quick", "--json", str(out), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_smoke_without_reference(tmp_path, monkeypatch, capsys):
    R = bench_json(tmp_path, monkeypatch, "--no-reference", "--threads", "1")
    assert "LoRA step (ours)" in capsys.readouterr().out
    assert all(k in R for k in REQUIRED)
    assert all(finite(R[k]) for k in OURS), {k: R.get(k) for k in OURS}
    assert all(R[k] is None for k in REFERENCE)  # skipped rows stay in the JSON as null
    # nothing is kept per task: the same bytes after 1 and 2 tasks
    assert R["abmll_task_growth_saved_bytes"] == 1.0 and R["abmll_task_growth_live_tensor_bytes"] == 1.0


def test_smoke_with_transformers_and_peft(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    R = bench_json(tmp_path, monkeypatch, "--threads", "1")
    assert all(finite(R[k]) for k in REQUIRED + OURS)
    assert R["forward_max_abs_diff"] < 1e-4  # the same weights: the reference really is our model
    assert R["lora_loss_abs_diff_vs_peft"] < 1e-5  # and the same loss (labels -100 but the answer)


def test_one_thread_figures_beside_the_full_count(tmp_path, monkeypatch, capsys):
    """At 2 threads every speed figure and ratio also at 1 thread (keys *_1t), in the same run,
    and each job's scaling; bytes are measured once."""
    seen, step_fn = [], bench.step_fn  # the threads each training step ran with
    monkeypatch.setattr(bench, "step_fn", lambda loss, opt: (
        lambda step: lambda: seen.append(torch.get_num_threads()) or step())(step_fn(loss, opt)))
    R = bench_json(tmp_path, monkeypatch, "--no-reference", "--threads", "2")
    assert R["threads"] == 2 and R["thread_counts"] == [2, 1]
    steps_1t = [k for k in R if k.endswith("_s_1t") and "_step" in k and "tokens" not in k]
    assert len(steps_1t) == 7 and seen.count(1) == 3 * 7  # each step job: a warm-up and 2 rounds
    for k in ["lora_step", "abmll_step", "abmll_step_act", "forward"]:
        assert finite(R[f"{k}_s_1t"]) and R[f"{k}_s_1t"] != R[f"{k}_s"]
        assert R[f"{k}_thread_scaling"] == pytest.approx(R[f"{k}_s_1t"] / R[f"{k}_s"])
    assert R["abmll_vs_lora_step_time_1t"] == pytest.approx(R["abmll_step_s_1t"] / R["lora_step_s_1t"])
    assert finite(R["gemm_fp32_flops_1t"]) and finite(R["lora_step_fraction_of_gemm_peak_1t"])
    assert "lora_step_saved_bytes_1t" not in R and "abmll_vs_lora_saved_bytes_1t" not in R
    assert R["lora_step_speedup_vs_peft_1t"] is None  # the skipped reference: null at both counts
    assert "scaling" in capsys.readouterr().out
    R = bench_json(tmp_path, monkeypatch, "--no-reference", "--threads", "2", "--no-1t")
    assert R["thread_counts"] == [2] and "lora_step_s_1t" not in R


def test_smoke_gpu_mode_on_cpu(tmp_path, monkeypatch):
    """The --device cuda path (random bf16 weights, no autocast rows), on a CPU."""
    R = bench_json(tmp_path, monkeypatch, "--dtype", "bfloat16", "--no-reference", "--threads", "1")
    assert R["dtype"] == "bfloat16" and "lora_step_bf16_s" not in R
    keys = ["lora_step_s", "abmll_step_s", "abmll_vs_lora_step_time", "abmll_vs_lora_saved_bytes",
            "lora_step_fraction_of_gemm_peak"]
    assert all(finite(R[k]) for k in keys)


@pytest.mark.parametrize("argv,flag", [(["--model", "nope", "--random-init"], "--model"),
                                       (["--model", "tiny", "--random-init", "--seq", "4096"], "--seq"),
                                       (["--batch", "0"], "--batch")])
def test_bad_flags_end_in_one_line(monkeypatch, argv, flag):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert str(e.value.code).startswith("error: ") and flag in str(e.value.code) and "\n" not in str(e.value.code)


def test_malloc_flag_and_page_faults(tmp_path, monkeypatch):
    """--malloc keep asks perf.keep_freed_memory and records it; every job's page faults are in
    the JSON; a system without mallopt ends in one line naming the flag."""
    asked = []
    monkeypatch.setattr(perf, "keep_freed_memory", lambda: asked.append(1) or True)
    R = bench_json(tmp_path, monkeypatch, "--no-reference", "--threads", "1", "--malloc", "keep")
    assert asked == [1] and R["malloc"] == "keep"
    for k in ["forward", "lora_step", "abmll_step", "abmll_step_act"]:
        assert isinstance(R[f"{k}_minor_faults"], int) and R[f"{k}_minor_faults"] >= 0
    monkeypatch.setattr(perf, "keep_freed_memory", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--malloc", "keep"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert str(e.value.code).startswith("error: --malloc keep") and "\n" not in str(e.value.code)


def test_keep_freed_memory_ends_the_fresh_pages_of_a_repeated_allocation():
    """perf.minor_faults against the page size: under glibc's defaults a fresh 64 MiB tensor
    takes its size in new pages every time (a block that large is mmap'd and given back at each
    free); after perf.keep_freed_memory a freed block is reused and takes none (not from the
    first repeat on in every process: which free block glibc picks varies, so the fewest of 12).
    Subprocesses: mallopt is for the whole process."""
    import os
    import subprocess
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp) and "[always]" in open(thp).read():
        pytest.skip("transparent huge pages always on: a fault maps 2 MiB, not a page")
    code = ("import sys, torch, perf\n"
            "ok = perf.keep_freed_memory() if sys.argv[1] == 'keep' else True\n"
            "f = [perf.minor_faults(lambda: torch.ones(1 << 24)) for _ in range(12)]\n"
            "print(ok, min(f[1:]), max(f[1:]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {m: subprocess.run([sys.executable, "-c", code, m], cwd=root, capture_output=True,
                             text=True, check=True).stdout.split() for m in ("default", "keep")}
    assert out["default"][0] == out["keep"][0] == "True"
    pages = (1 << 26) // os.sysconf("SC_PAGE_SIZE")
    fewest, most = int(out["default"][1]), int(out["default"][2])
    keep = int(out["keep"][1])
    assert pages <= fewest <= most <= 1.05 * pages and keep <= 0.01 * pages, (out, pages)


def counted_flops(method, T, B=2):
    """(torch FlopCounterMode's count, ours) for our step (method "lora" / "abmll") or forward (None), tiny model."""
    args = llama.ModelArgs.from_name("tiny")
    torch.manual_seed(0)
    model = llama.random_model(args, torch.device("cpu"), torch.float32)
    batch = bench.make_batch(args.vocab_size, B, T, "cpu")
    with FlopCounterMode(display=False) as fc:
        if method is None:
            with torch.no_grad():
                model(batch["tokens"])
        else:
            bench.our_loss(abmll.inject(model, method), batch, method, abmll.Config()).backward()
    # attention is not counted by FlopCounterMode on CPU
    if method is None:
        return fc.get_total_flops(), perf.model_flops(args, B, T, B * T, None) - perf.attention_flops(args, B, T)
    attention = perf.attention_flops(args, B, T, rows=B)
    return fc.get_total_flops(), perf.model_flops(args, B, T, B, method) - 3 * attention  # backward: twice more


@pytest.mark.parametrize("method", [None, "lora"])
def test_model_flops_equal_torch_flop_counter(method):
    """Forward and LoRA step: the analytic count is exactly the matmuls autograd runs (attention aside)."""
    counted, ours = counted_flops(method, T=24)
    assert counted == ours


def test_abmll_flops_against_torch_flop_counter():
    """ABMLL: the part that grows with the tokens is exact; the weight-sized part is at least what torch
    sees (FlopCounterMode does not count in-place addmm_, which ABMLL's kernels use)."""
    (c16, o16), (c48, o48) = counted_flops("abmll", T=16), counted_flops("abmll", T=48)
    assert c48 - c16 == o48 - o16
    assert c16 <= o16 < 1.1 * c16


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB
    w = torch.randn(256, 256)
    assert perf.saved_bytes(lambda: (x * x).sum(), set()) == 256 * 256 * 4  # x saved twice, counted once
    assert perf.saved_bytes(lambda: (x[:64] * x[64:128]).sum(), set()) == 256 * 256 * 4  # views: their storage
    assert perf.saved_bytes(lambda: (x @ w).sum(), set()) == 256 * 256 * 4  # mm keeps w for x's gradient
    assert perf.saved_bytes(lambda: (x @ w).sum(), {w.untyped_storage().data_ptr()}) == 0  # resident: left out


def noise_delta(layer, x, ctx):
    """The sampled output minus the mean output, for one fixed eps, and the mean output (fp32)."""
    with torch.no_grad(), ctx:
        torch.manual_seed(1234)  # BayesLoRALinear draws its eps seed from torch's generator
        y = layer(x)
        with abmll.bayes_mode(layer, "mean"):
            y0 = layer(x)
    return y.float() - y0.float(), y0.float()


@pytest.mark.parametrize("mode", ["bf16 amp", "bf16 weights"])
def test_bf16_rounds_away_the_initial_weight_noise(mode):
    """At ABMLL's initial scale (log sigma^2 = log_c = -20, sigma = e^-10) a layer's weight noise is
    ~7.5e-5 of its output, as in SmolLM2-135M's first wq (bench.py measured it there), far below
    bf16's resolution (2^-8): under autocast or with bf16 weights ~98% of the sample-minus-mean
    difference rounds to exactly zero, while fp32 keeps it. (Once the log-variance adapters grow,
    it shows: test_abmll.py::test_bf16_noise_survives.)"""
    torch.manual_seed(0)
    base = nn.Linear(256, 256, bias=False)
    sigma = math.exp(abmll.Config.log_c / 2)
    with torch.no_grad():  # weights at the scale that puts the noise at 7.5e-5 of the output
        base.weight.normal_(0.0, sigma / 7.5e-5)
    layer, x = abmll.BayesLoRALinear(base), torch.randn(64, 256)
    d_ref, y_ref = noise_delta(layer, x, nullcontext())
    assert 6e-5 < d_ref.norm() / y_ref.norm() < 9e-5 and (d_ref == 0).float().mean() < 0.01
    if mode == "bf16 amp":
        d, _ = noise_delta(layer, x, torch.autocast("cpu", dtype=torch.bfloat16))
    else:  # the frozen weight in bf16, the adapters in fp32
        layer16 = copy.deepcopy(layer)
        layer16.weight.data = layer16.weight.data.bfloat16()
        d, _ = noise_delta(layer16, x.bfloat16(), nullcontext())
    assert (d == 0).float().mean() > 0.95  # vanished
    assert (d - d_ref).norm() / d_ref.norm() > 0.95  # what is left is rounding, not the noise
