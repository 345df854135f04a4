"""Speed and memory, side by side in one run: our forward against transformers', our LoRA step against
transformers + peft on the same weights, ABMLL's step against LoRA's, and each against this machine's
own matmul peak.

    python bench.py                                       # CPU, smollm2-135m, batch 2 x 256, fp32 and bf16
    python bench.py --threads 1 --json out/bench.json     # one thread: steadier on a busy shared machine
    python bench.py --device cuda --model llama3-8b --random-init   # GPU: 8B shape, random bf16, batch 2 x 512
    python bench.py --model tiny --random-init --quick    # seconds: the smoke test's run
    python bench.py --plan --model llama3-8b --batch 2 --seq 512 --dtype bf16   # predicted peaks (plan.py)

Timing: one warm-up, then --repeats rounds in which every job runs once (A B C, A B C, ...), so the
drift of a shared machine hits them alike; each figure is the median of its rounds. A speedup is
their time / our time (> 1: we are faster); other ratios put ours (or ABMLL) in the numerator.
transformers and peft are a benchmark-only extra: without them (or with --no-reference) their rows
are skipped. On a CPU with fp32 weights our steps also run in bf16 two ways: under
torch.autocast("cpu", bfloat16) around the forward ("bf16 amp"), and on a bf16 copy of the frozen
weights with the fp32 adapters ("bf16 weights").

Memory: "saved" is the bytes of the tensors autograd keeps for backward in one step, counted once per
storage (a tensor saved by several ops, or a view of one, is counted once), leaving out the models'
parameters and buffers, which are resident anyway (autocast's bf16 copies of them are counted: they
are made per step). Peak RSS is the process's high-water mark during the step, reset through
/proc/self/clear_refs where Linux allows ("rise": above the RSS before the step); on CUDA,
torch.cuda.max_memory_allocated.

Model FLOPs, counted analytically, the same for every contender doing the same job (N = B T tokens,
P = weights of the blocks' linear layers, H heads of size hd, L layers, vocabulary V, width d):
    forward    2 P N  +  attention 2 B H hd T^2 L (QK^T and AV, causal half)  +  head 2 V d N_head
    backward   frozen weights need input gradients only: 2 P N (less layer 0's wq, wk, wv, whose input, the
               frozen embeddings, needs none); attention twice its forward; head 2 V d N_head
    LoRA       per adapted linear (d_in, d_out): 2 r (d_in + d_out) N forward, twice that backward
    ABMLL      per adapted linear, instead of LoRA's: the sampled weight's gradient G = g^T x, 2 d_in d_out N
               (mu's and log sigma^2's gradients both come from it), and 32 r d_in d_out of weight-sized
               low-rank products (mu and sigma made in forward and again in backward, their dB and dA, and
               the KL with its gradients)
A training step needs the head only at the answer position (N_head = B): a full (B, T, V) head is
waste and lowers the fraction; so are the last block's queries, wo and FFN anywhere else (its keys
and values are needed everywhere), and the count leaves them out. The forward row computes every
position's logits (N_head = N).
Attention aside, the count equals torch.utils.flop_counter's for the forward and the LoRA step exactly,
and for ABMLL's step in every term that grows with the tokens (tests/test_bench.py).
"""

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import datetime

import torch

import abmll
import llama

NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s, SXM datasheets

# -----------------------------------------------------------------------------
# measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict, repeats: int, device) -> dict[str, list[float]]:
    """Seconds of each callable over `repeats` interleaved rounds, after one warm-up round."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def medians(fns: dict, repeats: int, device) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats, device).items()}


def gemm_flops(device, dtype, n: int, repeats: int) -> float:
    """FLOP/s of a large square matmul, best of the rounds: the peak this machine reaches right now."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / min(interleaved_times({"mm": lambda: torch.mm(a, b)}, repeats, device)["mm"])


def resident_ptrs(*models) -> set:
    return {t.untyped_storage().data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]}


def saved_bytes(loss_fn, exclude: set) -> int:
    """Bytes autograd keeps for backward while loss_fn() runs: unique storages, `exclude`d ones left out."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        # keep the storage alive, so no address is reused while we count, but not t's grad_fn: an output
        # saved with its grad_fn makes a cycle through the graph that outlives `del loss`
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
    with warnings.catch_warnings():  # isinstance() touches deprecated module proxies on the heap, which warn
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device == device]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


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


def model_flops(args: llama.ModelArgs, B: int, T: int, head_rows: int, method: str | None, rank: int = 8) -> float:
    """Analytic FLOPs of a forward (method None) or of a "lora" / "abmll" training step (module docstring)."""
    d, H, kv, hd, L = args.dim, args.n_heads, args.n_kv_heads or args.n_heads, args.head_dim, args.n_layers
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
            total += 6 * rank * (d_in + d_out) * tokens - (2 * rank * d_in * N if i < 2 else 0)  # layer 0 again
        else:
            total += 2 * d_in * d_out * tokens + L * 32 * rank * d_in * d_out
    return total


def attention_flops(args: llama.ModelArgs, B: int, T: int, rows: int | None = None) -> float:
    """QK^T and AV: causal half in every block; with `rows` queries in the last block, each seeing <= T keys."""
    per_layer = 2 * B * args.n_heads * args.head_dim * T * T
    if rows is None:
        return args.n_layers * per_layer
    return (args.n_layers - 1) * per_layer + 4 * args.n_heads * args.head_dim * T * rows


# -----------------------------------------------------------------------------
# models: ours (loaded or random), twins on the same weights, the transformers + peft reference


def random_model(margs: llama.ModelArgs, device, dtype, seed: int = 0) -> llama.Transformer:
    """Random weights made on the device itself: built on meta, then to_empty, so no CPU copy exists."""
    with torch.device("meta"):
        model = llama.Transformer(margs).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    model.inv_freq = llama.rope_inv_freq(margs).to(device)  # fp32, as load() keeps it
    return model.eval()


def shared_twin(model: llama.Transformer) -> llama.Transformer:
    """A second Transformer on the very same weight storages: each method's adapters go into its own twin."""
    with torch.device("meta"):
        twin = llama.Transformer(model.args)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    twin.inv_freq = model.inv_freq
    return twin.eval()


def hf_twin(model: llama.Transformer):
    """transformers' LlamaForCausalLM on our weights: q/k rows permuted to HF's RoPE layout, the rest shared."""
    import transformers

    a = model.args
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": a.rope_scaling_factor,
                "low_freq_factor": a.rope_low_freq_factor, "high_freq_factor": a.rope_high_freq_factor,
                "original_max_position_embeddings": a.rope_original_max_seq_len}
    kv = a.n_kv_heads or a.n_heads
    cfg = transformers.LlamaConfig(
        hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=kv,
        intermediate_size=a.ffn_dim, vocab_size=a.vocab_size, max_position_embeddings=a.max_seq_len,
        rms_norm_eps=a.norm_eps, rope_parameters=rope, tie_word_embeddings=a.tie_embeddings,
        attn_implementation="sdpa")
    hf_name = {meta: hf for hf, meta in llama.HF_NAMES.items()}
    state = {}
    for k, t in model.state_dict().items():
        if k in ("tok_embeddings.weight", "norm.weight"):
            state["model." + k.replace("tok_embeddings", "embed_tokens")] = t
        elif k == "output.weight":
            state["lm_head.weight"] = t
        else:  # layers.N.attention.wq.weight, layers.N.ffn_norm.weight, ...
            _, n, module = k.removesuffix(".weight").split(".", 2)
            if module in ("attention.wq", "attention.wk"):
                t = abmll.meta_to_hf_rows(t, a.n_heads if module == "attention.wq" else kv)
            state[f"model.layers.{n}.{hf_name[module]}.weight"] = t
    if a.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(state, strict=True, assign=True)
    with torch.device(model.inv_freq.device):  # its RoPE buffers were made on meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg)
    return hf.eval()


def reference_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def peft_lora(hf, rank: int = 8, alpha: int = 16):
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "o_proj"],
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(hf, cfg).train()


# -----------------------------------------------------------------------------
# the jobs


def make_batch(vocab: int, B: int, T: int, device, seed: int = 0) -> dict:
    """Random prompts whose last token is the answer: the logits at T-2 are scored against token T-1."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (B, T), generator=g)
    return {"tokens": tokens.to(device), "answer_pos": torch.full((B,), T - 2, device=device),
            "answer_ids": tokens[:, -1].to(device)}


def our_loss(model, batch, method: str, cfg: abmll.Config, amp=None):
    """abmll.lora_step's (method "lora") or abmll_inner_step's ("abmll") loss. Autocast covers the network's
    forward only, as torch.amp advises; the KL stays in fp32 (abmll's KL kernels reject bf16 operands)."""
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


def noise_check(model, ref, batch, amp) -> dict:
    """Does the weight noise sigma * eps survive bf16? The sample-minus-mean difference, with the same eps,
    of the first adapted wq's output and of the model's answer logits, against `ref` in fp32 (same adapters).
    rel_err = |d - d_ref| / |d_ref|; vanished = share of the layer's outputs where d is exactly 0."""
    T = min(64, batch["tokens"].shape[1])
    tokens, at = batch["tokens"][:, :T], torch.full_like(batch["answer_pos"][:, None], T - 1)
    xs = []
    hook = model.layers[0].attention.wq.register_forward_hook(lambda m, inp, out: xs.append(inp[0].detach()))
    with torch.no_grad(), abmll.bayes_mode(model, "mean"):
        model(tokens, logits_at=at)
    hook.remove()

    def delta(module, call, ctx, seed=1234):
        with torch.no_grad(), ctx:
            torch.manual_seed(seed)  # BayesLoRALinear draws its eps seed from torch's generator
            y = call()
            with abmll.bayes_mode(module, "mean"):
                y0 = call()
        return y.float() - y0.float(), y0.float()

    layer = model.layers[0].attention.wq
    layer32, x = copy.deepcopy(layer).float(), xs[0]
    d, _ = delta(layer, lambda: layer(x), amp)
    d_ref, y_ref = delta(layer32, lambda: layer32(x.float()), nullcontext())
    out = {"layer_rel_err": ((d - d_ref).norm() / d_ref.norm()).item(),
           "layer_vanished": (d == 0).float().mean().item(),
           "layer_noise_to_output": (d_ref.norm() / y_ref.norm()).item()}
    if ref is not None:
        d, _ = delta(model, lambda: model(tokens, logits_at=at), amp)
        d_ref, _ = delta(ref, lambda: ref(tokens, logits_at=at), nullcontext())
        out["logits_rel_err"] = ((d - d_ref).norm() / d_ref.norm()).item()
    return out


# -----------------------------------------------------------------------------
# the run


def setup(args, device, dtype):
    """Our base model, and twins on the same weights carrying each method's adapters."""
    if args.random_init:
        base = random_model(llama.ModelArgs.from_name(args.model), device, dtype)
    else:
        import fetch
        try:
            base, _ = llama.load(fetch.resolve_model(args.model), device=device, dtype=dtype)
        except (llama.LoadError, fetch.FetchError) as e:
            sys.exit(f"error: --model: {e}")
    models = {"lora": abmll.inject(shared_twin(base), "lora"), "abmll": abmll.inject(shared_twin(base), "abmll"),
              "abmll_act": abmll.inject(shared_twin(base), "abmll", noise="activation")}  # the authors' noise
    if device.type == "cpu" and dtype == torch.float32:  # the same adapters on a bf16 copy of the frozen weights
        b16 = shared_twin(base).to(torch.bfloat16)
        for m in ("lora", "abmll"):
            models[f"{m}_bf16w"] = abmll.inject(shared_twin(b16), m)
            with torch.no_grad():
                for (_, p), (_, q) in zip(sorted(abmll.adapter_params(models[f"{m}_bf16w"]).items()),
                                          sorted(abmll.adapter_params(models[m]).items())):
                    p.copy_(q)
    return base, models


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    B, T = args.batch, args.seq or (512 if device.type == "cuda" else 256)
    repeats = 2 if args.quick else args.repeats
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base, models = setup(args, device, dtype)
    margs = base.args
    if T > margs.max_seq_len:
        sys.exit(f"error: --seq {T} exceeds the model's max_seq_len {margs.max_seq_len}")
    cfg = abmll.Config()
    batch = make_batch(margs.vocab_size, B, T, device)
    cpu_bf16 = "lora_bf16w" in models
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    ref = reference_available() and not args.no_reference
    R = {"model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "batch": B, "seq": T,
         "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
         "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         "load_avg_1m": os.getloadavg()[0], "date": datetime.now().isoformat(timespec="seconds"), "reference": ref}

    # the accuracy of the noise path in bf16, on fresh adapters (the smallest sigma of a run)
    checks = {}
    if cpu_bf16:
        checks = {"bf16_amp": (models["abmll"], models["abmll"], amp),
                  "bf16_weights": (models["abmll_bf16w"], models["abmll"], nullcontext())}
    elif dtype == torch.bfloat16:
        checks = {"bf16_weights": (models["abmll"], None, nullcontext())}
    for suffix, (model, ref32, ctx) in checks.items():
        R.update({f"abmll_noise_{k}_{suffix}": v for k, v in noise_check(model, ref32, batch, ctx).items()})

    # the jobs: name -> (loss for one step, optimizer, method for FLOPs, peak it is held against)
    peak_of = "fp32" if dtype == torch.float32 else "bf16"
    jobs = {}
    for name, m in models.items():
        method = name.split("_")[0]
        params = m.parameters() if method == "lora" else abmll.param_groups(m)["phi"].values()
        opt = adamw(params, cfg.lr if method == "lora" else cfg.inner_lr)
        against = "bf16" if "bf16" in name else peak_of
        jobs[f"{method}_step" + name.removeprefix(method)] = (
            lambda m=m, method=method: our_loss(m, batch, method, cfg), opt, method, against)
        if name == "abmll_act":  # FLOPs: LoRA's useful work (its extra low-rank products are not counted)
            jobs["abmll_step_act"] = (jobs["abmll_step_act"][0], opt, "lora", against)
        elif cpu_bf16 and "bf16" not in name:  # the same model and optimizer under autocast
            jobs[f"{method}_step_bf16"] = (
                lambda m=m, method=method: our_loss(m, batch, method, cfg, amp), opt, method, "bf16")
    if ref:
        hf, pm = hf_twin(base), peft_lora(hf_twin(base))
        labels = torch.full_like(batch["tokens"], -100)  # transformers' usual labels: it shifts them itself
        labels[:, -1] = batch["answer_ids"]
        jobs["peft_lora_step"] = (lambda: pm(input_ids=batch["tokens"], labels=labels, use_cache=False).loss,
                                  adamw(pm.parameters(), cfg.lr), "lora", peak_of)
        with torch.no_grad():  # same weights, same numbers: B = 0 adapters leave the base model's loss
            R["forward_max_abs_diff"] = (base(batch["tokens"]).float() - hf(input_ids=batch["tokens"], use_cache=False)
                                         .logits.float()).abs().max().item()
            R["lora_loss_abs_diff_vs_peft"] = abs(jobs["lora_step"][0]().item() - jobs["peft_lora_step"][0]().item())
    R["setup_s"] = time.perf_counter() - t0

    # 4. the limit: this machine's dense matmul peak, measured in this run
    n = 1024 if args.quick else (8192 if device.type == "cuda" else 2048)
    peak = {"fp32": gemm_flops(device, torch.float32, n, max(repeats, 5)),
            "bf16": gemm_flops(device, torch.bfloat16, n, max(repeats, 5))}
    R["gemm_fp32_flops"], R["gemm_bf16_flops"] = peak["fp32"], peak["bf16"]
    if device.type == "cuda":
        R["nominal_bf16_peak_flops"] = next((v for k, v in NOMINAL_BF16_PEAK.items() if k in R["device_name"]), None)

    # 1. speed: every job in the same interleaved rounds
    def forward(model, **kw):
        def f():
            with torch.no_grad():
                model(batch["tokens"], **kw)
        return f
    timed = {"forward": forward(base), "scoring_forward": forward(base, logits_at=batch["answer_pos"][:, None])}
    if ref:  # theirs for scoring at its best: logits of the last two positions only
        timed["transformers_forward"] = forward(hf, use_cache=False)
        timed["transformers_scoring_forward"] = forward(hf, use_cache=False, logits_to_keep=2)
    timed.update({k: step_fn(loss, opt) for k, (loss, opt, _, _) in jobs.items()})
    for k, t in medians(timed, repeats, device).items():
        R[f"{k}_s"] = t
        R[f"{k}_tokens_per_s"] = B * T / t
    R["forward_flops"] = model_flops(margs, B, T, B * T, None)
    R["forward_fraction_of_gemm_peak"] = R["forward_flops"] / R["forward_s"] / peak[peak_of]

    # 2. memory, and each step's achieved fraction of the peak
    exclude = resident_ptrs(base, *models.values(), *([hf, pm] if ref else []))
    for k, (loss, opt, method, against) in jobs.items():
        R[f"{k}_saved_bytes"] = saved_bytes(loss, exclude)
        R.update({f"{k}_{m}": v for m, v in peak_memory(timed[k], device).items()})
        R[f"{k}_flops"] = model_flops(margs, B, T, B, method)
        R[f"{k}_fraction_of_gemm_peak"] = R[f"{k}_flops"] / R[f"{k}_s"] / peak[against]
        if R.get("nominal_bf16_peak_flops"):
            R[f"{k}_mfu"] = R[f"{k}_flops"] / R[f"{k}_s"] / R["nominal_bf16_peak_flops"]

    # the headline ratios
    R["abmll_vs_lora_step_time"] = R["abmll_step_s"] / R["lora_step_s"]
    R["abmll_vs_lora_saved_bytes"] = R["abmll_step_saved_bytes"] / R["lora_step_saved_bytes"]
    R["abmll_act_vs_lora_step_time"] = R["abmll_step_act_s"] / R["lora_step_s"]
    R["abmll_act_vs_lora_saved_bytes"] = R["abmll_step_act_saved_bytes"] / R["lora_step_saved_bytes"]
    if device.type == "cuda":
        R["abmll_vs_lora_cuda_peak"] = R["abmll_step_cuda_peak_bytes"] / R["lora_step_cuda_peak_bytes"]
    for suffix in ("_bf16", "_bf16w"):
        if f"lora_step{suffix}_s" in R:
            R[f"abmll_vs_lora_step_time{suffix}"] = R[f"abmll_step{suffix}_s"] / R[f"lora_step{suffix}_s"]
            R[f"abmll_vs_lora_saved_bytes{suffix}"] = (R[f"abmll_step{suffix}_saved_bytes"]
                                                        / R[f"lora_step{suffix}_saved_bytes"])
            R[f"lora_step{suffix}_speedup_vs_fp32"] = R["lora_step_s"] / R[f"lora_step{suffix}_s"]
    for k in ("forward_speedup_vs_transformers", "scoring_forward_speedup_vs_transformers",
              "scoring_forward_speedup_vs_transformers_all_logits", "lora_step_speedup_vs_peft",
              "lora_step_bf16_speedup_vs_peft"):
        R[k] = None  # skipped rows stay in the JSON as null
    if ref:
        R["forward_speedup_vs_transformers"] = R["transformers_forward_s"] / R["forward_s"]
        R["scoring_forward_speedup_vs_transformers"] = R["transformers_scoring_forward_s"] / R["scoring_forward_s"]
        R["scoring_forward_speedup_vs_transformers_all_logits"] = R["transformers_forward_s"] / R["scoring_forward_s"]
        R["lora_step_speedup_vs_peft"] = R["peft_lora_step_s"] / R["lora_step_s"]
        R["lora_saved_bytes_vs_peft"] = R["lora_step_saved_bytes"] / R["peft_lora_step_saved_bytes"]
        for suffix in ("_bf16", "_bf16w"):
            if f"lora_step{suffix}_s" in R:  # ours in bf16, theirs as a user runs it (fp32)
                R[f"lora_step{suffix}_speedup_vs_peft"] = R["peft_lora_step_s"] / R[f"lora_step{suffix}_s"]

    # 3. growth: over training tasks (amortization keeps nothing per task) and over sequence length
    growth(R, args, models["abmll"], models["lora"], jobs, exclude, cfg, peak[peak_of], device)
    return R


def growth(R, args, abmll_model, lora_model, jobs, exclude, cfg, peak, device):
    margs, B, repeats = abmll_model.args, R["batch"], R["repeats"]
    K, counts, Tg = (2, (1, 2), 16) if args.quick else (cfg.inner_steps, (1, 4, 16), 64)
    batches = [make_batch(margs.vocab_size, B, Tg, device, seed=s) for s in range(K)]
    outer = adamw(abmll.param_groups(abmll_model)["theta"].values(), cfg.outer_lr)
    tcfg = abmll.Config(inner_steps=K)
    abmll.abmll_task(abmll_model, outer, batches, tcfg)  # warm-up; the outer AdamW's state is made here
    done = 0
    for n in counts:  # cumulative: after 1, 4, 16 tasks in all
        times = []
        while done < n:
            sync(device)
            t0 = time.perf_counter()
            abmll.abmll_task(abmll_model, outer, batches, tcfg)
            sync(device)
            times.append((time.perf_counter() - t0) / K)  # per inner step, the outer step shared among K
            done += 1
        R[f"abmll_tasks_{n}_step_s"] = statistics.median(times)
        R[f"abmll_tasks_{n}_saved_bytes"] = saved_bytes(lambda: our_loss(abmll_model, batches[0], "abmll", cfg),
                                                        exclude)
        R[f"abmll_tasks_{n}_live_tensor_bytes"] = live_tensor_bytes(device)
        trim_heap()
        R[f"abmll_tasks_{n}_rss_bytes"] = proc_status("VmRSS")
        if device.type == "cuda":
            R[f"abmll_tasks_{n}_cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
    R["task_counts"], R["task_seq"], R["task_inner_steps"] = list(counts), Tg, K
    for what in ("step_s", "saved_bytes", "live_tensor_bytes", "rss_bytes"):
        if R[f"abmll_tasks_{counts[0]}_{what}"]:
            R[f"abmll_task_growth_{what}"] = (R[f"abmll_tasks_{counts[-1]}_{what}"]
                                               / R[f"abmll_tasks_{counts[0]}_{what}"])

    seqs = [s for s in ((16, 32) if args.quick else (64, 128, 256, 512)) if s <= margs.max_seq_len]
    R["seqs"] = seqs
    opts = {m: jobs[f"{m}_step"][1] for m in ("lora", "abmll")}
    for s in seqs:
        sb = make_batch(margs.vocab_size, B, s, device, seed=s)
        losses = {"lora": lambda: our_loss(lora_model, sb, "lora", cfg),
                  "abmll": lambda: our_loss(abmll_model, sb, "abmll", cfg)}
        med = medians({m: step_fn(losses[m], opts[m]) for m in losses}, repeats, device)
        for m in losses:
            R[f"{m}_seq_{s}_step_s"] = med[m]
            R[f"{m}_seq_{s}_saved_bytes"] = saved_bytes(losses[m], exclude)
            R[f"{m}_seq_{s}_fraction_of_gemm_peak"] = model_flops(margs, B, s, B, m) / med[m] / peak
        R[f"abmll_vs_lora_step_time_seq_{s}"] = med["abmll"] / med["lora"]
        R[f"abmll_vs_lora_saved_bytes_seq_{s}"] = R[f"abmll_seq_{s}_saved_bytes"] / R[f"lora_seq_{s}_saved_bytes"]


# -----------------------------------------------------------------------------
# the report


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "B":
        return f"{v / 2**20:,.1f} MiB"
    if unit == "s":
        return f"{v * 1e3:,.1f} ms"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


ROWS = [("forward (ours, all logits)", "forward"), ("forward (transformers)", "transformers_forward"),
        ("scoring forward (ours, answer logits)", "scoring_forward"),
        ("scoring forward (transformers, logits_to_keep=2)", "transformers_scoring_forward"),
        ("LoRA step (ours)", "lora_step"), ("LoRA step (peft)", "peft_lora_step"), ("ABMLL step (ours)", "abmll_step"),
        ("ABMLL step (ours, activation noise)", "abmll_step_act"),
        ("LoRA step (ours, bf16 amp)", "lora_step_bf16"), ("ABMLL step (ours, bf16 amp)", "abmll_step_bf16"),
        ("LoRA step (ours, bf16 weights)", "lora_step_bf16w"), ("ABMLL step (ours, bf16 weights)", "abmll_step_bf16w")]
RATIOS = ["forward_speedup_vs_transformers", "scoring_forward_speedup_vs_transformers",
          "scoring_forward_speedup_vs_transformers_all_logits", "lora_step_speedup_vs_peft", "lora_step_bf16_speedup_vs_peft",
          "lora_step_bf16w_speedup_vs_peft", "lora_step_bf16_speedup_vs_fp32", "lora_step_bf16w_speedup_vs_fp32",
          "lora_saved_bytes_vs_peft", "abmll_vs_lora_step_time", "abmll_vs_lora_saved_bytes",
          "abmll_act_vs_lora_step_time", "abmll_act_vs_lora_saved_bytes", "abmll_vs_lora_cuda_peak",
          "abmll_vs_lora_step_time_bf16", "abmll_vs_lora_saved_bytes_bf16", "abmll_vs_lora_step_time_bf16w",
          "abmll_vs_lora_saved_bytes_bf16w", "lora_step_fraction_of_gemm_peak", "abmll_step_fraction_of_gemm_peak",
          "forward_max_abs_diff", "lora_loss_abs_diff_vs_peft", "abmll_noise_layer_noise_to_output_bf16_amp",
          "abmll_noise_layer_rel_err_bf16_amp", "abmll_noise_layer_vanished_bf16_amp",
          "abmll_noise_logits_rel_err_bf16_amp",
          "abmll_noise_layer_rel_err_bf16_weights", "abmll_noise_layer_vanished_bf16_weights",
          "abmll_noise_logits_rel_err_bf16_weights", "abmll_task_growth_step_s", "abmll_task_growth_saved_bytes",
          "abmll_task_growth_live_tensor_bytes", "abmll_task_growth_rss_bytes"]


def print_table(R: dict):
    g, cuda = R.get, "lora_step_cuda_peak_bytes" in R
    print(f"# bench.py {R['date']}  {R['model']} on {R['device_name']} ({R['dtype']} weights)  batch {R['batch']} x "
          f"{R['seq']}  medians of {R['repeats']}  threads {R['threads']}  load {R['load_avg_1m']:.2f}"
          f"  torch {R['torch']}"
          + (f"  transformers {R['transformers']}  peft {R['peft']}" if R.get("transformers") else ""))
    print(f"# matmul peak now: fp32 {R['gemm_fp32_flops'] / 1e9:,.1f} GFLOP/s, bf16 {R['gemm_bf16_flops'] / 1e9:,.1f}"
          " GFLOP/s" + (f"; nominal bf16 {g('nominal_bf16_peak_flops') / 1e12:.0f} TFLOP/s"
                        if g("nominal_bf16_peak_flops") else ""))
    head = ["job", "median", "tokens/s", "of peak", "saved for bwd", "peak RSS", "RSS rise"]
    head += ["CUDA peak", "MFU"] * cuda
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for label, k in ROWS:
        if f"{k}_s" not in R:
            continue
        cells = [label, fmt(R[f"{k}_s"], "s"), f"{R[f'{k}_tokens_per_s']:,.0f}", fmt(g(f"{k}_fraction_of_gemm_peak"))]
        cells += [fmt(g(f"{k}_{m}"), "B") for m in ("saved_bytes", "peak_rss_bytes", "peak_rss_rise_bytes")]
        if cuda:
            cells += [fmt(g(f"{k}_cuda_peak_bytes"), "B"), fmt(g(f"{k}_mfu"))]
        print("| " + " | ".join(cells) + " |")
    print()
    for k in RATIOS:
        if g(k) is not None:
            print(f"{k:<44} {fmt(R[k])}")
    print(f"\nABMLL over training tasks (batch {R['batch']} x {R['task_seq']}, K = {R['task_inner_steps']}; "
          "time per inner step, saved for backward, all live tensors, process RSS):")
    for n in R["task_counts"]:
        sizes = [fmt(R[f"abmll_tasks_{n}_{m}"], "B") for m in ("saved_bytes", "live_tensor_bytes", "rss_bytes")]
        step = fmt(R[f"abmll_tasks_{n}_step_s"], "s")
        print(f"  after {n:>2} tasks: {step:>10}  " + "  ".join(f"{x:>12}" for x in sizes))
    print(f"over sequence length (batch {R['batch']}; ABMLL / LoRA step time, saved for backward):")
    for s in R["seqs"]:
        print(f"  T = {s:>4}: {fmt(R[f'abmll_seq_{s}_step_s'], 's'):>10} / {fmt(R[f'lora_seq_{s}_step_s'], 's'):>10}"
              f" = x{R[f'abmll_vs_lora_step_time_seq_{s}']:.3f};  {fmt(R[f'abmll_seq_{s}_saved_bytes'], 'B'):>10} / "
              f"{fmt(R[f'lora_seq_{s}_saved_bytes'], 'B'):>10} = x{R[f'abmll_vs_lora_saved_bytes_seq_{s}']:.3f}")


def main():
    p = argparse.ArgumentParser(description="Benchmark our forward, LoRA and ABMLL steps against transformers + peft.")
    p.add_argument("--model", default="smollm2-135m",
                   help=f"built-in name or checkpoint path; with --random-init one of {', '.join(llama.CONFIGS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--random-init", action="store_true", help="random weights of the named shape, no checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   type=lambda s: {"fp32": "float32", "bf16": "bfloat16"}.get(s, s),
                   help="weight dtype (default: float32 on CPU, bfloat16 on CUDA; fp32, bf16 also accepted)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: 256 on CPU, 512 on CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up; figures are medians")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="2 rounds, short growth sweeps, a small GEMM: a smoke run")
    p.add_argument("--no-reference", action="store_true", help="skip transformers + peft even when installed")
    p.add_argument("--json", help="also write every figure to this file, one flat JSON object")
    p.add_argument("--plan", action="store_true", help="only predict the peak memory of a LoRA and ABMLL step "
                   "(plan.py): built-in shapes, no weights, no GPU; --device cuda plans CUDA's foreach AdamW")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="with --plan: each decoder layer recomputed in backward")
    args = p.parse_args()
    args.random_init |= args.plan  # --plan needs shapes only
    try:
        device = torch.device(args.device)
    except RuntimeError:
        sys.exit(f"error: --device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available() and not args.plan:
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    if args.random_init and args.model not in llama.CONFIGS:
        sys.exit(f"error: --model {args.model!r} with --random-init or --plan must be one of "
                 f"{', '.join(llama.CONFIGS)}")
    if args.batch < 1 or args.repeats < 1 or (args.seq is not None and args.seq < 4) or (args.threads or 1) < 1:
        sys.exit("error: --batch, --repeats and --threads must be >= 1, --seq >= 4")
    if args.activation_checkpointing and not args.plan:
        sys.exit("error: --activation-checkpointing is a --plan option (the benchmark has none)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan:
        import plan
        return plan.main(args)
    R = run(args)
    if R["reference"]:
        import peft
        import transformers
        R["transformers"], R["peft"] = transformers.__version__, peft.__version__
    print_table(R)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(R, f, indent=1)


if __name__ == "__main__":
    main()
