"""The report of a bench.py run, from its flat dict of figures (what --json writes): the ratios
derived from the figures (RATIOS), the table of jobs, the ratio lines, the growth lines.

    bench_report.ratios(R)        # adds every ratio whose two figures R has
    bench_report.print_table(R)   # one markdown row per job, then the ratios
    bench_report.print_growth(R)  # ABMLL over training tasks, both methods over sequence length
"""

# ratio -> (numerator, denominator), in print order: a speedup is their time / ours
RATIOS = {
    "forward_speedup_vs_transformers": ("transformers_forward_s", "forward_s"),
    "scoring_forward_speedup_vs_transformers": ("transformers_scoring_forward_s",
                                                "scoring_forward_s"),
    "scoring_forward_speedup_vs_transformers_all_logits": ("transformers_forward_s",
                                                           "scoring_forward_s"),
    "lora_step_speedup_vs_peft": ("peft_lora_step_s", "lora_step_s"),
    # ours in bf16, theirs as a user runs it (fp32)
    "lora_step_bf16_speedup_vs_peft": ("peft_lora_step_s", "lora_step_bf16_s"),
    "lora_step_bf16w_speedup_vs_peft": ("peft_lora_step_s", "lora_step_bf16w_s"),
    "lora_step_bf16_speedup_vs_fp32": ("lora_step_s", "lora_step_bf16_s"),
    "lora_step_bf16w_speedup_vs_fp32": ("lora_step_s", "lora_step_bf16w_s"),
    "lora_saved_bytes_vs_peft": ("lora_step_saved_bytes", "peft_lora_step_saved_bytes"),
    "abmll_vs_lora_step_time": ("abmll_step_s", "lora_step_s"),
    "abmll_vs_lora_saved_bytes": ("abmll_step_saved_bytes", "lora_step_saved_bytes"),
    "abmll_act_vs_lora_step_time": ("abmll_step_act_s", "lora_step_s"),
    "abmll_act_vs_lora_saved_bytes": ("abmll_step_act_saved_bytes", "lora_step_saved_bytes"),
    "abmll_vs_lora_cuda_peak": ("abmll_step_cuda_peak_bytes", "lora_step_cuda_peak_bytes"),
    "abmll_vs_lora_step_time_bf16": ("abmll_step_bf16_s", "lora_step_bf16_s"),
    "abmll_vs_lora_saved_bytes_bf16": ("abmll_step_bf16_saved_bytes", "lora_step_bf16_saved_bytes"),
    "abmll_vs_lora_step_time_bf16w": ("abmll_step_bf16w_s", "lora_step_bf16w_s"),
    "abmll_vs_lora_saved_bytes_bf16w": ("abmll_step_bf16w_saved_bytes",
                                        "lora_step_bf16w_saved_bytes"),
}
# the headline rows against the reference stay in the JSON as null when it is skipped
NULL_WHEN_SKIPPED = ["forward_speedup_vs_transformers", "scoring_forward_speedup_vs_transformers",
                     "scoring_forward_speedup_vs_transformers_all_logits",
                     "lora_step_speedup_vs_peft", "lora_step_bf16_speedup_vs_peft"]
PRINTED = [*RATIOS, "lora_step_fraction_of_gemm_peak", "abmll_step_fraction_of_gemm_peak",
           "forward_max_abs_diff", "lora_loss_abs_diff_vs_peft", "abmll_task_growth_step_s",
           "abmll_task_growth_saved_bytes", "abmll_task_growth_live_tensor_bytes",
           "abmll_task_growth_rss_bytes"]
ROWS = {"forward (ours, all logits)": "forward", "forward (transformers)": "transformers_forward",
        "scoring forward (ours, answer logits)": "scoring_forward",
        "scoring forward (transformers, logits_to_keep=2)": "transformers_scoring_forward",
        "LoRA step (ours)": "lora_step", "LoRA step (peft)": "peft_lora_step",
        "ABMLL step (ours)": "abmll_step", "ABMLL step (ours, activation noise)": "abmll_step_act",
        "LoRA step (ours, bf16 amp)": "lora_step_bf16",
        "ABMLL step (ours, bf16 amp)": "abmll_step_bf16",
        "LoRA step (ours, bf16 weights)": "lora_step_bf16w",
        "ABMLL step (ours, bf16 weights)": "abmll_step_bf16w"}


def ratios(R: dict):
    """Every ratio whose two figures this run has, at the full thread count and (keys *_1t, from
    the *_s_1t times; bytes do not depend on threads) at one; the reference's headline ones else
    null."""
    for k, (num, den) in RATIOS.items():
        if num in R and den in R:
            R[k] = R[num] / R[den]
        elif k in NULL_WHEN_SKIPPED:
            R[k] = None
        if f"{num}_1t" in R and f"{den}_1t" in R:
            R[f"{k}_1t"] = R[f"{num}_1t"] / R[f"{den}_1t"]
        elif k in NULL_WHEN_SKIPPED and "gemm_fp32_flops_1t" in R:
            R[f"{k}_1t"] = None


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "B":
        return f"{v / 2**20:,.1f} MiB"
    if unit == "s":
        return f"{v * 1e3:,.1f} ms"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_table(R: dict):
    g, cuda = R.get, "lora_step_cuda_peak_bytes" in R
    versions = f"  transformers {R['transformers']}  peft {R['peft']}" if g("transformers") else ""
    print(f"# bench.py {R['date']}  {R['model']} on {R['device_name']} ({R['dtype']} weights)  "
          f"batch {R['batch']} x {R['seq']}  medians of {R['repeats']}  threads {R['threads']}  "
          f"load {R['load_avg_1m']:.2f}  malloc {R.get('malloc', 'default')}  torch {R['torch']}"
          + versions)
    nominal = g("nominal_bf16_peak_flops")
    print(f"# matmul peak now: fp32 {R['gemm_fp32_flops'] / 1e9:,.1f} GFLOP/s, "
          f"bf16 {R['gemm_bf16_flops'] / 1e9:,.1f} GFLOP/s"
          + (f"; nominal bf16 {nominal / 1e12:.0f} TFLOP/s" if nominal else ""))
    one = "gemm_fp32_flops_1t" in R  # one-thread figures too
    if one:
        print(f"# at 1 thread: fp32 {R['gemm_fp32_flops_1t'] / 1e9:,.1f} GFLOP/s, "
              f"bf16 {R['gemm_bf16_flops_1t'] / 1e9:,.1f} GFLOP/s")
    head = ["job", "median", "tokens/s", "of peak", "saved for bwd", "peak RSS", "RSS rise",
            "page faults"]
    head += ["CUDA peak", "MFU"] * cuda + ["1 thread", "of peak (1t)", "scaling"] * one
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for label, k in ROWS.items():
        if f"{k}_s" not in R:
            continue
        cells = [label, fmt(R[f"{k}_s"], "s"), f"{R[f'{k}_tokens_per_s']:,.0f}",
                 fmt(g(f"{k}_fraction_of_gemm_peak"))]
        sizes = ("saved_bytes", "peak_rss_bytes", "peak_rss_rise_bytes")
        cells += [fmt(g(f"{k}_{m}"), "B") for m in sizes] + [fmt(g(f"{k}_minor_faults"))]
        if cuda:
            cells += [fmt(g(f"{k}_cuda_peak_bytes"), "B"), fmt(g(f"{k}_mfu"))]
        if one:
            cells += [fmt(g(f"{k}_s_1t"), "s"), fmt(g(f"{k}_fraction_of_gemm_peak_1t")),
                      fmt(g(f"{k}_thread_scaling"))]
        print("| " + " | ".join(cells) + " |")
    print()
    if one:
        print(f"{'':<44} {R['threads']:>6} threads  1 thread")
    for k in PRINTED:
        if g(k) is not None:
            print(f"{k:<44} {fmt(R[k]):>14}" + (f"  {fmt(g(f'{k}_1t'))}" if one else ""))


def print_growth(R: dict):
    print(f"\nABMLL over training tasks (batch {R['batch']} x {R['task_seq']}, "
          f"K = {R['task_inner_steps']}; time per inner step, saved for backward, "
          "all live tensors, process RSS):")
    for n in R["task_counts"]:
        sizes = [fmt(R[f"abmll_tasks_{n}_{m}"], "B")
                 for m in ("saved_bytes", "live_tensor_bytes", "rss_bytes")]
        step = fmt(R[f"abmll_tasks_{n}_step_s"], "s")
        print(f"  after {n:>2} tasks: {step:>10}  " + "  ".join(f"{x:>12}" for x in sizes))
    print(f"over sequence length (batch {R['batch']}; ABMLL / LoRA step time, saved for backward):")
    for s in R["seqs"]:
        t = [fmt(R[f"{m}_seq_{s}_step_s"], "s") for m in ("abmll", "lora")]
        b = [fmt(R[f"{m}_seq_{s}_saved_bytes"], "B") for m in ("abmll", "lora")]
        dt, db = R[f"abmll_vs_lora_step_time_seq_{s}"], R[f"abmll_vs_lora_saved_bytes_seq_{s}"]
        print(f"  T = {s:>4}: {t[0]:>10} / {t[1]:>10} = x{dt:.3f};  "
              f"{b[0]:>10} / {b[1]:>10} = x{db:.3f}")
