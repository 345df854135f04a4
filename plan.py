"""Predict the peak memory of a training step (forward, backward, AdamW on the adapters) of LoRA and
ABMLL (weight or activation noise) without the weights and without a GPU.

    python bench.py --plan --model llama3-8b --batch 2 --seq 512 --dtype bf16
    python bench.py --plan --model llama3-8b --batch 2 --seq 512 --dtype bf16 --activation-checkpointing
    python plan.py --model smollm2-135m --batch 2 --seq 256 --measure   # against a real CPU step

How: the model is built of fake tensors (FakeTensorMode: shapes, dtypes, strides, no data), adapters
are injected as train.py injects them, and the library's own code (bench.our_loss, backward, AdamW)
runs on it under `PeakTracker`, a TorchDispatchMode that sees every aten op of the forward, backward
and optimizer. It adds the bytes of each storage an op creates, subtracts them when the storage dies
(weakref.finalize on the untyped storage; views share their base's storage, counted once) and keeps
the running maximum. Frozen weights (in `dtype`), adapters (fp32), buffers and the batch are counted
from the start; gradients, AdamW's exp_avg / exp_avg_sq (made by the first step) and activations as
the ops make them. Two steps run: the second has AdamW's state resident throughout; `peak_bytes` is
the larger peak. No formula per layer: what is counted is what the code allocates. On a CPU the
count equals torch's CPU allocator peak (profiler memory events) and is within 5% of the real step's
peak RSS rise (smollm2-135m, 2 x 256, fp32; `measure`, glibc's mmap threshold fixed).

Not modelled, so a floor under what a GPU reports: the CUDA context (~0.5 GiB, outside torch's
counters), cuBLAS / cuDNN workspaces, scratch a kernel allocates inside itself, and the caching
allocator's rounding and fragmentation (max_memory_reserved over max_memory_allocated). Ops take
their CPU paths: attention is CPU flash SDPA, which keeps what CUDA's flash kernel keeps (q, k, v,
out, logsumexp), never a T x T matrix. AdamW runs tensor by tensor unless foreach=True (CUDA's
default, with adapter-sized temporaries). llama.Transformer has no activation-checkpointing switch:
with checkpointing=True each decoder layer's forward is wrapped, here only, in
torch.utils.checkpoint.checkpoint(use_reentrant=False).

One workaround: BayesLoRALinear draws each forward's noise seed as int(torch.randint(2**62, ())),
and a fake tensor has no value to give. Under the tracker a 0-d randint returns a constant fake
tensor, which int() can read; any seed needs the same memory. kernels.py's torch.Generator and
randn(generator=...) (`_noise_rows`, `_act_eps`) work under FakeTensorMode unchanged.
"""

import argparse
import functools
import gc
import json
import os
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

import abmll
import bench
import llama
import perf

GIB = 2**30
VARIANTS = {"lora": ("lora", "weight"), "abmll_weight": ("abmll", "weight"),  # (method, noise)
            "abmll_activation": ("abmll", "activation")}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


class PeakTracker(TorchDispatchMode):
    """Bytes of the live storages (`now`) and their running maximum (`peak`), op by op."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def track(self, t: torch.Tensor):
        s = t.untyped_storage()
        k, n = id(s), s.nbytes()
        old = self.live.get(k)
        if old is None:  # first seen: its finalizer runs when the storage is freed
            weakref.finalize(s, self._free, k).atexit = False
        self.live[k] = n  # a known storage may have been resized
        self.now += n - (old or 0)
        self.peak = max(self.peak, self.now)

    def _free(self, k):
        self.now -= self.live.pop(k, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.randint and len(args[-1]) == 0:
            out = torch.tensor(0x5EED)  # BayesLoRALinear's seed: a constant fake, int() can read it
        else:
            out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def base_model(margs: llama.ModelArgs, dtype, fake: bool) -> llama.Transformer:
    """The frozen model: empty fake tensors (inside a FakeTensorMode), or random_model's weights."""
    if not fake:
        return llama.random_model(margs, torch.device("cpu"), dtype)
    with torch.device("meta"):  # no init work; empty fakes of the same shapes take their places
        model = llama.Transformer(margs)
    state = {k: torch.empty(v.shape, dtype=dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = llama.rope_inv_freq(margs)  # fp32, as random_model and load() keep it
    return model.eval()


def setup(margs, variant, dtype, batch, seq, checkpointing=False, rank=8,
          targets=("wq", "wv", "wo"), foreach=None, fake=False):
    """(model, AdamW, loss function, batch) of a variant, as bench.py's jobs: LoRA trains A and B,
    ABMLL's inner step phi on NLL + beta KL. fake=True: inside the planner's FakeTensorMode."""
    model = base_model(margs, dtype, fake)
    method, noise = VARIANTS[variant]
    abmll.inject(model, method, targets, rank, noise=noise)
    if checkpointing:  # blocks recomputed in backward; llama.Transformer has no switch of its own
        for layer in model.layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    cfg = abmll.Config()
    if method == "lora":
        params, lr = [p for p in model.parameters() if p.requires_grad], cfg.lr
    else:
        params, lr = list(abmll.param_groups(model)["phi"].values()), cfg.inner_lr
    opt = torch.optim.AdamW(params, lr=lr, foreach=foreach)
    b = bench.make_batch(margs.vocab_size, batch, seq, "cpu")
    return model, opt, lambda: bench.our_loss(model, b, method, cfg), b


def step(loss_fn, opt):
    """bench.step_fn's step without its loss.item(), which a fake loss cannot give."""
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def nbytes(ts) -> int:
    """Bytes of the distinct storages under the tensors `ts` (None skipped)."""
    storages = (t.untyped_storage() for t in ts if t is not None)
    return sum({id(s): s.nbytes() for s in storages}.values())


def check(margs: llama.ModelArgs, batch: int, seq: int):
    if batch < 1 or seq < 1:
        raise ValueError(f"--batch and --seq must be >= 1, got batch {batch}, seq {seq}")
    if seq > margs.max_seq_len:
        raise ValueError(f"--seq {seq} exceeds the model's max_seq_len {margs.max_seq_len}")


def plan(margs: llama.ModelArgs, variant: str, batch: int, seq: int, dtype=torch.bfloat16,
         checkpointing=False, steps=2, **kw) -> dict:
    """Predicted bytes of `steps` training steps of a variant (VARIANTS) on fake tensors: the peak,
    the first step's, and what is resident (weights, adapters, gradients, AdamW state) after them.
    `kw`: setup's rank, targets, foreach."""
    check(margs, batch, seq)
    fake, tracker, peaks = FakeTensorMode(), PeakTracker(), []
    with fake:
        model, opt, loss_fn, b = setup(margs, variant, dtype, batch, seq, checkpointing,
                                       fake=True, **kw)
    with fake, tracker:
        for t in [*model.parameters(), *model.buffers(), *b.values()]:
            tracker.track(t)  # resident before the first step
        start = tracker.now
        for _ in range(steps):
            tracker.peak = tracker.now
            step(loss_fn, opt)
            peaks.append(tracker.peak)
    ps = list(model.parameters())
    state = [t for s in opt.state.values() for t in s.values() if t.dim()]  # not the 0-d `step`
    return {"peak_bytes": max(peaks), "first_step_peak_bytes": peaks[0], "start_bytes": start,
            "weight_bytes": nbytes(p for p in ps if not p.requires_grad),
            "adapter_bytes": nbytes(p for p in ps if p.requires_grad),
            "grad_bytes": nbytes(p.grad for p in ps), "adamw_state_bytes": nbytes(state),
            "end_bytes": tracker.now}


def measure(margs, variant, batch, seq, dtype=torch.float32, checkpointing=False, steps=2,
            mmap_threshold=128 * 1024, **kw) -> int:
    """The same steps for real on this CPU, random weights: the rise of the process's peak RSS
    (perf.peak_memory) over its RSS before the model is built. One step of the same job runs and is
    freed first, so torch's one-off initialization (kernels, thread pools) is not counted.
    glibc keeps freed blocks below its mmap threshold for reuse and raises the threshold (to 32 MiB)
    as big blocks are freed, so RSS holds memory no tensor uses; mallopt fixes the threshold for the
    rest of the process (measure in a process of its own): freed blocks of `mmap_threshold` bytes
    or more go back to the system. None leaves glibc's default."""
    if mmap_threshold is not None:
        perf.mallopt(mmap_threshold)

    def job(steps=steps):  # bench.step_fn, loss.item() and all: independent of plan.step
        model, opt, loss_fn, _ = setup(margs, variant, dtype, batch, seq, checkpointing, **kw)
        for _ in range(steps):
            bench.step_fn(loss_fn, opt)()

    job(1)
    gc.collect()  # a checkpointed model is a cycle (its blocks hold their wrapped forwards)
    out = perf.peak_memory(job, torch.device("cpu"))
    if "peak_rss_rise_bytes" not in out:
        raise RuntimeError("measure: /proc/self/clear_refs cannot reset the peak RSS here")
    return out["peak_rss_rise_bytes"]


def plan_all(model: str, batch: int, seq: int, dtype="bf16", checkpointing=False, **kw) -> dict:
    """The three variants' predictions, as the flat keys bench.py --plan writes."""
    margs, dtype = llama.ModelArgs.from_name(model), DTYPES.get(dtype, dtype)
    R = {"model": model, "batch": batch, "seq": seq, "dtype": str(dtype).removeprefix("torch."),
         "activation_checkpointing": checkpointing}
    for v in VARIANTS:
        p = plan(margs, v, batch, seq, dtype, checkpointing, **kw)
        R[f"plan_{v}_peak_gib"] = p["peak_bytes"] / GIB
        R.update({f"plan_{v}_{k}": n for k, n in p.items()})
    for v in ("abmll_weight", "abmll_activation"):
        R[f"plan_{v}_vs_lora"] = R[f"plan_{v}_peak_bytes"] / R["plan_lora_peak_bytes"]
    return R


def print_plan(R: dict):
    print(f"# predicted peak of a training step: {R['model']}, {R['dtype']} weights, batch "
          f"{R['batch']} x {R['seq']}, {'with' if R['activation_checkpointing'] else 'no'} "
          "activation checkpointing (tensors only: no CUDA context, workspaces or allocator cache)")
    cols = ["peak", "first step", "weights", "adapters", "AdamW state", "rest at peak", "vs LoRA"]
    print("| method | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for v in VARIANTS:
        g = {k: R[f"plan_{v}_{k}_bytes"] for k in ("peak", "first_step_peak", "weight", "adapter",
                                                    "adamw_state")}
        g["rest"] = g["peak"] - g["weight"] - g["adapter"] - g["adamw_state"]  # activations, grads
        cells = [f"{n / GIB:.3f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB" for n in g.values()]
        cells.append(f"x{g['peak'] / R['plan_lora_peak_bytes']:.3f}")
        print(f"| {v} | " + " | ".join(cells) + " |")


def main(args):
    """bench.py --plan: print the three predictions; with --json, write them."""
    cuda = args.device.startswith("cuda")
    try:
        R = plan_all(args.model, args.batch, args.seq or (512 if cuda else 256),
                     args.dtype or ("bfloat16" if cuda else "float32"),
                     args.activation_checkpointing, foreach=cuda or None)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print_plan(R)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(R, f, indent=1)
    return R


if __name__ == "__main__":  # predicted against measured, one JSON line per variant
    p = argparse.ArgumentParser(description="The planner against a real CPU training step.")
    p.add_argument("--model", default="smollm2-135m", choices=list(llama.CONFIGS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--variant", choices=list(VARIANTS), action="append", help="default: all")
    p.add_argument("--measure", action="store_true", help="run each step for real too")
    p.add_argument("--glibc-default", action="store_true", help="measure with glibc's threshold")
    a = p.parse_args()
    margs, dtype = llama.ModelArgs.from_name(a.model), DTYPES[a.dtype]
    for v in a.variant or VARIANTS:
        out = {"variant": v, "predicted_bytes": plan(margs, v, a.batch, a.seq, dtype,
                                                     a.activation_checkpointing)["peak_bytes"]}
        if a.measure:
            out["measured_bytes"] = measure(margs, v, a.batch, a.seq, dtype,
                                            a.activation_checkpointing,
                                            mmap_threshold=None if a.glibc_default else 128 * 1024)
            out["predicted_over_measured"] = out["predicted_bytes"] / out["measured_bytes"]
        print(json.dumps(out), flush=True)
