"""bench.py's growth section: ABMLL over training tasks (amortization keeps nothing per task) and
LoRA's and ABMLL's steps over sequence length, on a bench.Setup; figures into bench's flat dict
(abmll_tasks_{n}_*, {lora,abmll}_seq_{T}_*, the growth and per-length ratios)."""

import statistics
from functools import partial

import torch

import abmll
import bench
import perf


def over_tasks(S: "bench.Setup", R: dict):
    """ABMLL after 1, 4, 16 tasks in all: step time, saved bytes, live tensors, process RSS."""
    model = S.models["abmll_step"]
    K, counts, Tg = (2, (1, 2), 16) if S.args.quick else (S.cfg.inner_steps, (1, 4, 16), 64)
    batches = [bench.make_batch(model.args.vocab_size, S.B, Tg, S.device, seed=s) for s in range(K)]
    outer = bench.adamw(abmll.param_groups(model)["theta"].values(), S.cfg.outer_lr)
    cfg = abmll.Config(inner_steps=K)
    task = partial(abmll.abmll_task, model, outer, batches, cfg)  # Algorithm 1: K inner, 1 outer
    task()  # warm-up; the outer AdamW's state is made here
    done, seen = 0, []
    for n in counts:  # cumulative; time per inner step, the outer step shared among K
        times = [perf.seconds(task, S.device) / K for _ in range(n - done)]
        done = n
        now = {"step_s": statistics.median(times),
               "saved_bytes": perf.saved_bytes(partial(bench.our_loss, model, batches[0], "abmll", S.cfg),
                                               S.exclude),
               "live_tensor_bytes": perf.live_tensor_bytes(S.device)}
        perf.trim_heap()
        now["rss_bytes"] = perf.proc_status("VmRSS")
        if S.device.type == "cuda":
            now["cuda_allocated_bytes"] = torch.cuda.memory_allocated(S.device)
        R.update({f"abmll_tasks_{n}_{k}": v for k, v in now.items()})
        seen.append(now)
    R["task_counts"], R["task_seq"], R["task_inner_steps"] = list(counts), Tg, K
    first, last = seen[0], seen[-1]
    growth = {"abmll_task_growth_step_s": "step_s", "abmll_task_growth_saved_bytes": "saved_bytes",
              "abmll_task_growth_live_tensor_bytes": "live_tensor_bytes",
              "abmll_task_growth_rss_bytes": "rss_bytes"}
    R.update({k: last[what] / first[what] for k, what in growth.items() if first[what]})


def over_seq(S: "bench.Setup", R: dict):
    """LoRA's and ABMLL's steps over sequence length: time, saved bytes, fraction of the peak."""
    margs = S.base.args
    seqs = (16, 32) if S.args.quick else (64, 128, 256, 512)
    R["seqs"] = [s for s in seqs if s <= margs.max_seq_len]
    models = {"lora": S.models["lora_step"], "abmll": S.models["abmll_step"]}
    opts = {"lora": S.jobs["lora_step"].opt, "abmll": S.jobs["abmll_step"].opt}
    for s in R["seqs"]:
        batch = bench.make_batch(margs.vocab_size, S.B, s, S.device, seed=s)
        losses = {m: partial(bench.our_loss, model, batch, m, S.cfg) for m, model in models.items()}
        med = perf.medians({m: bench.step_fn(losses[m], opts[m]) for m in losses}, S.repeats, S.device)
        for m in losses:
            R[f"{m}_seq_{s}_step_s"] = med[m]
            R[f"{m}_seq_{s}_saved_bytes"] = perf.saved_bytes(losses[m], S.exclude)
            flops = perf.model_flops(margs, S.B, s, S.B, m)
            R[f"{m}_seq_{s}_fraction_of_gemm_peak"] = flops / med[m] / S.peak[""][S.peak_of]
        R[f"abmll_vs_lora_step_time_seq_{s}"] = med["abmll"] / med["lora"]
        saved = R[f"abmll_seq_{s}_saved_bytes"] / R[f"lora_seq_{s}_saved_bytes"]
        R[f"abmll_vs_lora_saved_bytes_seq_{s}"] = saved
