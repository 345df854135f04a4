"""How fast and how big: the instruments bench.py, plan.py and gpu_check.py read.

    times = interleaved_times({"a": step_a, "b": step_b}, repeats=5, device=device)
    saved = saved_bytes(loss_fn, exclude=resident_ptrs(model))
    peak = peak_memory(step, device)           # {"peak_rss_bytes": ..., "peak_rss_rise_bytes": ...}
    flops = model_flops(model.args, B, T, head_rows=B, method="lora")

Timing: one warm-up, then rounds in which every job runs once (A B C, A B C, ...), so the drift of
a shared machine hits them alike; bench.py takes each job's median of its rounds.

Memory: "saved" is the bytes of the tensors autograd keeps for backward in one step, counted once
per storage (a tensor saved by several ops, or a view of one, is counted once), leaving out the
models' parameters and buffers, which are resident anyway, and the bf16 casts of frozen weights
that our models keep under autocast (llama.kept_casts); autocast's per-step bf16 copies of
weights (transformers' model) are counted: they are made in every step. Peak RSS is the
process's high-water mark during the step, reset through /proc/self/clear_refs where Linux
allows ("rise": above the RSS before the step); on CUDA, torch.cuda.max_memory_allocated.

Model FLOPs, counted analytically, the same for every contender doing the same job (N = B T
tokens, P = weights of the blocks' linear layers, H heads of size hd, L layers, vocabulary V,
width d):
    forward    2 P N  +  attention 2 B H hd T^2 L (QK^T and AV, causal half)  +  head 2 V d N_head
    backward   frozen weights need input gradients only: 2 P N (less layer 0's wq, wk, wv, whose
               input, the frozen embeddings, needs none); attention twice its forward; head
               2 V d N_head
    LoRA       per adapted linear (d_in, d_out): 2 r (d_in + d_out) N forward, twice that backward
    ABMLL      per adapted linear, instead of LoRA's: the sampled weight's gradient G = g^T x,
               2 d_in d_out N (mu's and log sigma^2's gradients both come from it), and
               32 r d_in d_out of weight-sized low-rank products (mu and sigma made in forward and
               again in backward, their dB and dA, and the KL with its gradients)
A training step needs the head only at the answer position (N_head = B): a full (B, T, V) head is
waste and lowers the fraction of the peak; so are the last block's queries, wo and FFN anywhere
else (its keys and values are needed everywhere), and the count leaves them out. A forward
computes every position's logits (N_head = N). Attention aside, the count equals
torch.utils.flop_counter's for the forward and the LoRA step exactly, and for ABMLL's step in
every term that grows with the tokens (tests/test_bench.py).
"""

import ctypes
import gc
import statistics
import time
import warnings

import torch

import llama

NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s, SXM sheets

# -----------------------------------------------------------------------------
# time


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device) -> float:
    """Wall time of one fn(), the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_times(fns: dict, repeats: int, device) -> dict[str, list[float]]:
    """Seconds of each callable over `repeats` interleaved rounds, after one warm-up round."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(seconds(f, device))
    return times


def medians(fns: dict, repeats: int, device) -> dict[str, float]:
    times = interleaved_times(fns, repeats, device)
    return {k: statistics.median(v) for k, v in times.items()}


def gemm_flops(device, dtype, n: int, repeats: int) -> float:
    """FLOP/s of a large square matmul, best of the rounds: the peak this machine reaches now."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / min(interleaved_times({"mm": lambda: torch.mm(a, b)}, repeats, device)["mm"])


def nominal_bf16_peak(device_name: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of a GPU named like one in NOMINAL_BF16_PEAK, else None."""
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k in device_name), None)


# -----------------------------------------------------------------------------
# memory


def resident_ptrs(*models) -> set:
    """Every storage a model keeps between steps: parameters, buffers and the bf16 casts of its
    frozen weights that llama.autocast_weight keeps under autocast."""
    tensors = [t for m in models for t in [*m.parameters(), *m.buffers()]]
    tensors += [t for m in models for t in llama.kept_casts(m).values()]
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_bytes(loss_fn, exclude: set) -> int:
    """Bytes autograd keeps for backward while loss_fn() runs: unique storages, `exclude`d ones
    left out."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        # keep the storage alive, so no address is reused while we count, but not t's grad_fn:
        # an output saved with its grad_fn makes a cycle through the graph that outlives `del loss`
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values())


def proc_status(key: str) -> int | None:
    """A byte figure of /proc/self/status (VmRSS, VmHWM), None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def live_tensor_bytes(device) -> int:
    """Bytes of every tensor the Python heap still reaches on `device`, one count per storage."""
    gc.collect()
    seen = {}
    with warnings.catch_warnings():  # isinstance() touches deprecated module proxies, which warn
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects()
                   if isinstance(o, torch.Tensor) and o.device == device]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def minor_faults(fn) -> int | None:
    """Pages the kernel handed the process during one fn() (minor faults: no disk), None without
    getrusage. Each is a fresh zeroed page: memory the allocator gave back and takes again. glibc
    returns a freed block of over its mmap threshold (32 MiB at most) to the OS at once, so a step
    whose big tensors (a full-vocabulary logits tensor) are made anew each time faults them in
    every step, and that time is part of its step."""
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def mallopt(mmap_threshold: int, trim_threshold: int | None = None) -> bool:
    """Fix glibc's mmap threshold (a freed block at least this big goes back to the system at once;
    glibc's default grows it up to 32 MiB as big blocks are freed) and, if given, its trim
    threshold (free memory kept at the top of the heap), for the rest of the process. False where
    there is no glibc mallopt, or it refused."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        return bool(ok and (trim_threshold is None or libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)))
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse, as a caching allocator does (both thresholds raised,
    to 1 GiB and 2 GiB), so no job pays for fresh pages in its steady state. Process-wide."""
    return mallopt(1 << 30, (1 << 31) - 1)


def trim_heap():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks; hand them back first
    except (OSError, AttributeError):
        pass


def peak_memory(step, device) -> dict:
    """Run step() once: peak RSS, its rise over the RSS before, and CUDA's peak allocation."""
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = proc_status("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    if reset and before is not None:
        peak = proc_status("VmHWM")
        out = {"peak_rss_bytes": peak, "peak_rss_rise_bytes": peak - before}
    else:  # the process's lifetime peak: an upper bound
        import resource
        out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


# -----------------------------------------------------------------------------
# model FLOPs


def model_flops(args: llama.ModelArgs, B: int, T: int, head_rows: int, method: str | None,
                rank: int = 8) -> float:
    """Analytic FLOPs of a forward (method None) or of a "lora" / "abmll" training step (the
    module docstring's count)."""
    d, H, hd, L = args.dim, args.n_heads, args.head_dim, args.n_layers
    kv = args.n_kv_heads or args.n_heads
    N = B * T
    Nl = N if method is None else head_rows  # tokens of the last block's wq, wo and FFN
    wq, wkv, wo, ffn = d * H * hd, 2 * d * kv * hd, H * hd * d, 3 * d * args.ffn_dim
    blocks = 2 * (L * wkv * N + (L - 1) * (wq + wo + ffn) * N + (wq + wo + ffn) * Nl)
    attn = attention_flops(args, B, T, None if method is None else head_rows)
    head = 2 * args.vocab_size * d * head_rows
    if method is None:
        return blocks + attn + head
    # layer 0's wq, wk, wv need no input gradient: their input comes from the frozen embeddings
    total = 2 * (blocks + head) + 3 * attn - 2 * N * (wq + wkv)
    for i, (d_in, d_out) in enumerate([(d, H * hd), (d, kv * hd), (H * hd, d)]):  # wq, wv, wo
        tokens = (L - 1) * N + (N if i == 1 else Nl)  # the last block's wv sees every token
        if method == "lora":
            layer0 = 2 * rank * d_in * N if i < 2 else 0  # no input gradient again
            total += 6 * rank * (d_in + d_out) * tokens - layer0
        else:
            total += 2 * d_in * d_out * tokens + L * 32 * rank * d_in * d_out
    return total


def attention_flops(args: llama.ModelArgs, B: int, T: int, rows: int | None = None) -> float:
    """QK^T and AV: causal half in every block; with `rows` queries in the last block, each seeing
    <= T keys."""
    per_layer = 2 * B * args.n_heads * args.head_dim * T * T
    if rows is None:
        return args.n_layers * per_layer
    return (args.n_layers - 1) * per_layer + 4 * args.n_heads * args.head_dim * T * rows
