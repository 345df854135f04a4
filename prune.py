"""Pruning (Section 5.2): zero p percent of a model inside a `with`, restore it exactly on exit.

    with prune.pruned(model, 20):                          # activation mode (the paper's text)
        probs = abmll.predictive_probs(model, query, letters)
    with prune.pruned(model, 20, "channel", calib=support):  # whole channels, ranked on `calib`

Four modes (pruned() says what each zeroes): "activation", "weight", "adapted" (the authors'
code) and "channel". train.py adapts first, unpruned, then scores the query set under each
level, so that every mode sees the same adapted adapters (docs/design.md).
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from abmll import BayesLoRALinear, LoRALinear

PRUNE_LEVELS = (0, 1, 10, 20, 30)  # percent, Tables 2 and 4
PRUNE_MODES = ("activation", "weight", "adapted", "channel")
# (B, A) of the adapter's mean, merged into the weight by weight-mode pruning
MEAN_PATH = {LoRALinear: ("lora_B", "lora_A"), BayesLoRALinear: ("phi_mean_B", "phi_mean_A")}


def _count(p, n):
    """Number of the n entries to prune at p percent: the nearest integer (half up)."""
    return min(n, int(p * n / 100 + 0.5))


def _smallest_hook(p):
    def hook(module, args, out):  # out: (B, T, d), one row of d values per token
        idx = out.abs().topk(_count(p, out.shape[-1]), dim=-1, largest=False).indices  # (B, T, k)
        return out.scatter(-1, idx, 0.0)
    return hook


def _channel_hook(channels):
    def hook(module, args, out):  # out: (B, T, dim); the same channels at every token
        return out.index_fill(-1, channels.to(out.device), 0.0)
    return hook


@torch.no_grad()
def _quiet_channels(model, p, calib):
    """Per decoder layer, the p% of hidden channels with the smallest mean |activation| over the
    real tokens of the calibration batches (right padding beyond answer_pos + 1 does not count)."""
    total, count, real = [0.0] * len(model.layers), [0] * len(model.layers), [None]  # real: (B, T)

    def record(i):
        def hook(module, args, out):  # (B, T, dim); the last block (B, 1, dim) at answer_pos
            keep = real[0] if out.shape[1] == real[0].shape[1] else out.new_ones(out.shape[:2])
            total[i] = total[i] + (out.abs().float() * keep[..., None]).sum((0, 1))  # (dim,)
            count[i] += int(keep.sum())
        return hook

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(model.layers)]
    device = next(model.parameters()).device
    try:
        for batch in calib:
            tokens, pos = batch["tokens"].to(device), batch["answer_pos"].to(device)
            real[0] = torch.arange(tokens.shape[1], device=device) <= pos[:, None] + 1  # (B, T)
            model(tokens, logits_at=pos[:, None])  # logits at the answer only: the head is costly
    finally:
        for h in handles:
            h.remove()
    return [(t / c).topk(_count(p, len(t)), largest=False).indices for t, c in zip(total, count)]


@contextmanager
def _weights_pruned(model, p):
    """weight mode of pruned(): merge the adapters' mean, zero the smallest |w|, restore on exit."""
    targets = {id(m.weight): m for m in model.layers.modules()
               if isinstance(m, (nn.Linear, *MEAN_PATH))}  # by weight: a shared one is pruned once
    saved = []  # (tensor, copy on the CPU: no second copy of the weights on the accelerator)
    try:
        with torch.no_grad():
            for m in targets.values():
                saved.append((m.weight, m.weight.to("cpu", copy=True)))
                if type(m) in MEAN_PATH and not getattr(m, "merged", False):
                    B, A = (getattr(m, n) for n in MEAN_PATH[type(m)])
                    saved.append((B, B.to("cpu", copy=True)))
                    m.weight += (m.scaling * B @ A).to(m.weight.dtype)  # prune W0 + mu
                    B.zero_()  # the adapter's mean path now adds exactly 0
                flat = m.weight.view(-1)
                flat[flat.abs().topk(_count(p, flat.numel()), largest=False).indices] = 0
        yield
    finally:
        with torch.no_grad():
            for t, old in reversed(saved):
                t.copy_(old)


@contextmanager
def pruned(model, p, mode="activation", calib=None):
    """Prune p percent of the model while inside the `with`; the model is restored exactly on exit.

    activation: at the output of every model.layers[i], per token, the p% of the hidden
        dimensions with the smallest |value| are set to zero (Section 5.2: "a percentage of
        neurons in each layer embedding is set to zero, sorted by magnitudes").
    weight: unstructured magnitude pruning: in every linear weight of model.layers the p% of
        entries with the smallest |w| are set to zero, per matrix. Adapters are merged first,
        so that the effective weight is pruned: LoRALinear W0 + s B A; BayesLoRALinear
        W0 + mu_phi, its sigma_phi * eps still drawn on top in "sample" mode. Inside the
        `with`, score only: the adapters' B is zeroed there, so training them would be lost.
    adapted: the authors' pruning: at the output of every adapted layer (LoRALinear,
        BayesLoRALinear), per token, the p% smallest |values| are set to zero. A model without
        adapters (Pretrained) has nothing to prune this way: ValueError.
    channel: whole hidden channels at the output of every model.layers[i]: the p% with the
        smallest mean |activation|, ranked per layer on entry, by a forward (no_grad, the model
        in its current mode) over `calib`, batches with "tokens" (B, T) and "answer_pos" (B,),
        right-padded. The last block runs at answer_pos only, as when scoring: it is ranked there.
    p = 0 touches nothing. Counts are rounded to the nearest integer (so 1% of 576 is 6).
    """
    if not 0 <= p <= 100:
        raise ValueError(f"pruning percentage must be in [0, 100], got {p}")
    if mode not in PRUNE_MODES:
        raise ValueError(f"pruning mode must be one of {', '.join(PRUNE_MODES)}; got {mode!r}")
    adapted = [m for m in model.modules() if isinstance(m, (LoRALinear, BayesLoRALinear))]
    if mode == "adapted" and not adapted:
        raise ValueError("pruning mode 'adapted': the model has no adapted layers (LoRALinear or "
                         "BayesLoRALinear), e.g. Pretrained; prune it in another mode")
    if mode == "channel" and not calib:
        raise ValueError("pruning mode 'channel' needs calib: the batches that rank the channels")
    if p == 0:
        yield model
        return
    if mode == "weight":
        with _weights_pruned(model, p):
            yield model
        return
    if mode == "channel":
        quiet = _quiet_channels(model, p, calib)
        hooks = [(layer, _channel_hook(c)) for layer, c in zip(model.layers, quiet)]
    else:
        targets = model.layers if mode == "activation" else adapted
        hooks = [(m, _smallest_hook(p)) for m in targets]
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
