"""bench.py: the smoke run (tiny random model on CPU, seconds) and its FLOP count against torch's own."""

import json
import math
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import abmll
import bench
import llama

REQUIRED = ["forward_speedup_vs_transformers", "lora_step_speedup_vs_peft", "lora_step_bf16_speedup_vs_peft",
            "abmll_vs_lora_step_time", "abmll_vs_lora_saved_bytes", "lora_step_fraction_of_gemm_peak"]
OURS = ["forward_s", "scoring_forward_s", "lora_step_s", "abmll_step_s", "lora_step_bf16_s", "abmll_step_bf16_s", "lora_step_saved_bytes",
        "abmll_step_saved_bytes", "gemm_fp32_flops", "gemm_bf16_flops", "abmll_vs_lora_step_time",
        "abmll_vs_lora_saved_bytes", "lora_step_fraction_of_gemm_peak", "abmll_task_growth_saved_bytes",
        "abmll_vs_lora_step_time_seq_32", "abmll_noise_layer_rel_err_bf16_amp"]
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


def test_smoke_gpu_mode_on_cpu(tmp_path, monkeypatch):
    """The --device cuda path (random bf16 weights, no autocast rows, noise check on bf16 weights), on a CPU."""
    R = bench_json(tmp_path, monkeypatch, "--dtype", "bfloat16", "--no-reference", "--threads", "1")
    assert R["dtype"] == "bfloat16" and "lora_step_bf16_s" not in R
    keys = ["lora_step_s", "abmll_step_s", "abmll_vs_lora_step_time", "abmll_vs_lora_saved_bytes",
            "lora_step_fraction_of_gemm_peak", "abmll_noise_layer_rel_err_bf16_weights"]
    assert all(finite(R[k]) for k in keys)


@pytest.mark.parametrize("argv,flag", [(["--model", "nope", "--random-init"], "--model"),
                                       (["--model", "tiny", "--random-init", "--seq", "4096"], "--seq"),
                                       (["--batch", "0"], "--batch")])
def test_bad_flags_end_in_one_line(monkeypatch, argv, flag):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert str(e.value.code).startswith("error: ") and flag in str(e.value.code) and "\n" not in str(e.value.code)


def counted_flops(method, T, B=2):
    """(torch FlopCounterMode's count, ours) for our step (method "lora" / "abmll") or forward (None), tiny model."""
    args = llama.ModelArgs.from_name("tiny")
    torch.manual_seed(0)
    model = bench.random_model(args, torch.device("cpu"), torch.float32)
    batch = bench.make_batch(args.vocab_size, B, T, "cpu")
    with FlopCounterMode(display=False) as fc:
        if method is None:
            with torch.no_grad():
                model(batch["tokens"])
        else:
            bench.our_loss(abmll.inject(model, method), batch, method, abmll.Config()).backward()
    # attention is not counted by FlopCounterMode on CPU
    if method is None:
        return fc.get_total_flops(), bench.model_flops(args, B, T, B * T, None) - bench.attention_flops(args, B, T)
    attention = bench.attention_flops(args, B, T, rows=B)
    return fc.get_total_flops(), bench.model_flops(args, B, T, B, method) - 3 * attention  # backward: twice more


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
    assert bench.saved_bytes(lambda: (x * x).sum(), set()) == 256 * 256 * 4  # x saved twice, counted once
    assert bench.saved_bytes(lambda: (x[:64] * x[64:128]).sum(), set()) == 256 * 256 * 4  # views: their storage
    assert bench.saved_bytes(lambda: (x @ w).sum(), set()) == 256 * 256 * 4  # mm keeps w for x's gradient
    assert bench.saved_bytes(lambda: (x @ w).sum(), {w.untyped_storage().data_ptr()}) == 0  # resident: left out
