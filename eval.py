"""Evaluation: metrics, the pruning study (Section 5.2) and the paper's tables and curves.

    python eval.py report runs                   # Table 1, Table 2 and Figure 2 from runs/
    python eval.py report runs --out report/     # same, written to report/ (default runs/report)
    python eval.py compare runs --split nli      # which methods differ: paired bootstrap, 95% CI

Run directories (written by train.py, read here):

    {root}/{split}/{method}/seed{seed}/
        config.json    the run's arguments (method, split, seed, model, epochs, ...)
        metrics.jsonl  one line per epoch: {"epoch", "train_loss", "val_acc", "val_ece",
                       "val_nll", .. every metrics() key as val_*, "val_time_s", "time_s",
                       "diag" (optional)}; time_s = wall seconds of the epoch (train + val);
                       diag (ABMLL) = {"theta_logvar": {"wq": [p5, p50, p95], "wv": .., "wo": ..},
                       "phi_logvar": {..} (after test-time adaptation on the first held-out
                       task), "noise_ratio": {"wq": x, ..}, "noise_changed": {..},
                       "sample_vs_mean": x} (train.diagnostics)
        final.json     {"method", "split", "seed", "best_epoch", "n_test", "test_chance",
                        "test_acc", "test_ece", "test_nll", and in newer runs the rest of
                        metrics() on the test rows: "test_brier", "test_vocab_acc",
                        "test_paper_ece", "test_macro_acc", .., "test_macro_paper_ece";
                        optional: "pruning": {"mode": one of PRUNE_MODES, "acc": {"0": x,
                        "1": x, "10": x, "20": x, "30": x}, "ece": {..}}; "pruning_modes":
                        {mode: {"acc": {p: x}, "ece": {p: x}}} (several modes in one run);
                        "adapt_curve": {"k": [0, 1, 2, 5, 10], "acc": [..], "ece": [..],
                        "paper_ece": [..]}: test metrics after k test-time adaptation steps}
        predictions/{part}-{prune}.jsonl.gz   one row per scored example, {task, id, label,
                       n_options, probs, probs4, answer_id, vocab_argmax} (compare.py), prune
                       f"{p:g}": test-0 (unpruned), test-{mode}-{p} (pruned, e.g.
                       test-adapted-20), val-0 (the best epoch's validation), adapt{k}-0 (after
                       k test-time steps, --adapt-curve); metrics(read_predictions(path)) gives
                       final.json's test_* numbers bit for bit
        data_report.json   what was kept and dropped per task (data.py)

`report` writes report.md, curves_{split}.png, adapt_{split}.png and diag_{split}.png (where
runs have adapt_curve / diag); `compare` writes compare.md and compare.json, both into --out.
A run without a readable final.json (unfinished, killed, copied half) is skipped with one
warning line; so is anything else that does not fit the layout, a metrics.jsonl line that is
not UTF-8 JSON, and a final.json number out of its range (accuracy or ECE outside [0, 1],
a negative NLL): the key is left out, or the run if it is test_acc or test_ece.
"""

import argparse
import json
import math
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import compare
from abmll import BayesLoRALinear, LoRALinear
from compare import read_predictions, write_predictions  # noqa: F401  the file format lives there

METHODS = {"pretrained": "Pretrained", "pretrained-adapted": "Pretrained + adapt.", "lora": "Regular LoRA",
           "structured": "Struct. LoRA",
           "reptile": "Reptile", "abmll": "ABMLL"}  # directory -> name, in the paper's row order
SPLIT_ORDER = ["cls-45", "cls-23", "cls", "nli", "para", "mcqa", "diag"]  # the paper's column order, then ours
PRUNE_LEVELS = (0, 1, 10, 20, 30)  # percent, Tables 2 and 4
PRUNE_MODES = ("activation", "weight", "adapted", "channel")
# (B, A) of the adapter's mean, merged into the weight by weight-mode pruning
MEAN_PATH = {LoRALinear: ("lora_B", "lora_A"), BayesLoRALinear: ("phi_mean_B", "phi_mean_A")}

# -----------------------------------------------------------------------------
# metrics on (N, C) probabilities


def _as_probs(probs, labels):
    """(N, C) float tensor and (N,) long labels, on the CPU. A list of rows of different lengths
    (examples with 2, 3 or 4 options) is zero-padded: a zero column never becomes the top label."""
    if isinstance(probs, (list, tuple)) and probs:
        width = max(len(p) for p in probs)
        probs = torch.stack([F.pad(torch.as_tensor(p, dtype=torch.float64), (0, width - len(p)))
                             for p in probs])
    probs = torch.as_tensor(probs)
    if probs.ndim != 2 or not probs.is_floating_point() or len(probs) == 0:
        raise ValueError(f"probs must be a non-empty float (N, C) matrix, got {tuple(probs.shape)} "
                         f"{probs.dtype}")
    if not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError("probs must be probabilities in [0, 1] (softmax the logits first); "
                         "got NaN or outside")
    labels = torch.as_tensor(labels).long().view(-1).cpu()
    if len(labels) != len(probs):
        raise ValueError(f"{len(probs)} rows of probabilities but {len(labels)} labels")
    return probs.detach().cpu(), labels


def accuracy(probs, labels) -> float:
    """acc = 1/N sum_i 1[argmax_c p_ic = y_i] (first index on ties, as torch.max)."""
    probs, labels = _as_probs(probs, labels)
    return probs.max(dim=1).indices.eq(labels).double().mean().item()  # max(): the ECE's ties


def nll(probs, labels) -> float:
    """NLL = -1/N sum_i log p_i,y_i; p is clamped at the smallest normal fp32 so that one zero
    probability gives a large finite number (~87) instead of inf."""
    probs, labels = _as_probs(probs, labels)
    p = probs.double().gather(1, labels[:, None]).squeeze(1)
    return -p.clamp_min(torch.finfo(torch.float32).tiny).log().mean().item()


def brier(probs, labels) -> float:
    """Brier = 1/N sum_i sum_c (p_ic - 1[c = y_i])^2 (zero-padded columns add nothing)."""
    probs, labels = _as_probs(probs, labels)
    onehot = F.one_hot(labels, probs.shape[1]).double()  # (N, C)
    return (probs.double() - onehot).pow(2).sum(1).mean().item()


def vocab_accuracy(vocab_argmax, answer_ids) -> float:
    """acc_V = 1/N sum_i 1[argmax_v logit_v(x_i) = answer id_i]: the authors' accuracy (any
    token that is not the answer letter, another letter or not a letter, is wrong)."""
    pred, want = (torch.as_tensor(t).long().view(-1) for t in (vocab_argmax, answer_ids))
    if len(pred) != len(want) or len(pred) == 0:
        raise ValueError(f"{len(pred)} argmax ids but {len(want)} answer ids (need as many, > 0)")
    return pred.eq(want).double().mean().item()


def paper_ece(probs4, labels) -> float:
    """1/N sum_i |max_c p_ic - 1[argmax_c p_ic = y_i]| over A-D: the authors' "ECE".

    A per-example calibration gap, not a binned ECE: the authors call torchmetrics'
    MulticlassCalibrationError(num_classes=4, n_bins=10, norm="l1") on one example at a time and
    average. With one example its one non-empty bin holds that example, so the binning drops out
    (also at a confidence of exactly 1.0, which torchmetrics bins apart). As there, the
    confidence is cast to fp32 and ties go to the first letter. probs4: (N, 4) softmax over A-D.
    """
    probs, labels = _as_probs(probs4, labels)
    if probs.shape[1] != 4:
        raise ValueError(f"probs4 must be (N, 4) probabilities over A-D, got {tuple(probs.shape)}")
    conf, pred = probs.max(dim=1)
    return (pred.eq(labels).float() - conf.float()).abs().double().mean().item()


def _calibration_bins(probs, labels, n_bins):
    """Per bin: count, sum of top-label confidences, number correct; n_bins + 1 entries.

    Binning is torchmetrics' (multiclass_calibration_error): the confidences are cast to fp32
    and bucketed against torch.linspace(0, 1, n_bins + 1) in fp32 with right=True, so bin k
    is [e_k, e_{k+1}): a confidence exactly on an edge goes to the bin above it, and a
    confidence of exactly 1.0 lands in an extra bin of its own (index n_bins).
    """
    probs, labels = _as_probs(probs, labels)
    conf, pred = probs.max(dim=1)
    conf = conf.float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = torch.bucketize(conf, edges, right=True) - 1  # (N,) in [0, n_bins]
    count = torch.zeros(n_bins + 1, dtype=torch.float64)
    count.index_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf.double())
    correct = torch.zeros_like(count).index_add_(0, idx, pred.eq(labels).double())
    return count, conf_sum, correct


def expected_calibration_error(probs, labels, n_bins=15) -> float:
    """ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|  (top-label, equal-width bins, pooled).

    conf(B_b) is the mean top-label probability max_c p(c|x) in bin b and acc(B_b) the
    fraction of its examples whose argmax is the label. Identical to torchmetrics'
    multiclass_calibration_error(probs, labels, C, n_bins, norm="l1") (see _calibration_bins).
    probs: (N, C) probabilities (rows of the options of each example), labels: (N,) ints.
    """
    count, conf_sum, correct = _calibration_bins(probs, labels, n_bins)
    # |acc_b - conf_b| * n_b / N == |correct_b - conf_sum_b| / N
    return ((correct - conf_sum).abs().sum() / count.sum()).item()


def _row_metrics(rows):
    probs, labels = [r["probs"] for r in rows], [r["label"] for r in rows]
    argmax, answer = [r["vocab_argmax"] for r in rows], [r["answer_id"] for r in rows]
    return {"acc": accuracy(probs, labels), "ece": expected_calibration_error(probs, labels),
            "nll": nll(probs, labels), "brier": brier(probs, labels),
            "vocab_acc": vocab_accuracy(argmax, answer),
            "paper_ece": paper_ece([r["probs4"] for r in rows], labels)}


def metrics(rows) -> dict:
    """Prediction rows (compare.py's format) -> every metric pooled over all examples, n, and
    macro_{metric} = the unweighted mean over tasks of the per-task metric (final.json's test_*)."""
    if not rows:
        raise ValueError("metrics() needs at least one prediction row")
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    per_task = [_row_metrics(by_task[t]) for t in sorted(by_task)]
    macro = {f"macro_{k}": sum(m[k] for m in per_task) / len(per_task) for k in per_task[0]}
    return _row_metrics(rows) | {"n": len(rows)} | macro


def reliability_diagram(probs, labels, path, n_bins=15, title=None):
    """Save a reliability diagram (accuracy per confidence bin vs. the diagonal) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    count, _, correct = _calibration_bins(probs, labels, n_bins)
    count[n_bins - 1] += count[n_bins]  # draw the conf == 1.0 bin with the last bar
    correct[n_bins - 1] += correct[n_bins]
    acc = (correct / count.clamp_min(1))[:n_bins].tolist()
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.bar([k / n_bins for k in range(n_bins)], acc, width=1 / n_bins, align="edge",
           edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ece = expected_calibration_error(probs, labels, n_bins)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title + ': ' if title else ''}ECE {ece:.3f} (n={int(count.sum())})")
    ax.legend(loc="upper left")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# -----------------------------------------------------------------------------
# pruning (Section 5.2; DESIGN.md)


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


def pruning_report(scores, mode="activation"):
    """{p: (probs, labels)} pooled over all held-out tasks -> the "pruning" entry of final.json.

    Adapt first (unpruned), then score the query set under each level, so that every mode
    sees the same adapted adapters:

        for task in held_out:
            with abmll.adapted(model, task.support, cfg):
                for p in PRUNE_LEVELS:
                    with pruned(model, p, mode):
                        collect(p, abmll.predictive_probs(model, task.query))
    """
    key = lambda p: f"{p:g}"  # noqa: E731  0 -> "0", 0.5 -> "0.5"
    return {"mode": mode,
            "acc": {key(p): accuracy(*s) for p, s in scores.items()},
            "ece": {key(p): expected_calibration_error(*s) for p, s in scores.items()}}


# -----------------------------------------------------------------------------
# reading run directories


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


BOUNDS = {"acc": (0, 1), "ece": (0, 1), "chance": (0, 1), "brier": (0, 2), "nll": (0, math.inf)}


def _bounds(key):
    """The valid range of a metric, by the end of its name (test_macro_acc is an accuracy)."""
    return next((b for end, b in BOUNDS.items() if key.endswith(end)), None)


def _read_final(d, want):
    """final.json without its out-of-range test_* numbers, or None (warned): skip the run."""
    path = d / "final.json"
    try:
        final = json.loads(path.read_text())
    except FileNotFoundError:
        return _warn(f"{d}: no final.json (unfinished run?), skipped")
    except (OSError, ValueError) as e:  # a bad UTF-8 byte is a ValueError too
        return _warn(f"{path}: unreadable ({e}), skipped")
    if not isinstance(final, dict):
        return _warn(f"{path}: not a JSON object, skipped")
    for key in [k for k in final if k.startswith("test_") and _bounds(k)]:
        lo, hi = _bounds(key)
        if not (_number(final[key]) and lo <= final[key] <= hi):  # a percentage 75.0 shows as 7500%
            what = f"{path}: {key} = {final[key]!r} is not a number in [{lo}, {hi}]"
            if key in ("test_acc", "test_ece"):
                return _warn(f"{what}, skipped")
            _warn(f"{what}, left out")
            del final[key]
    if not all(_number(final.get(k)) for k in ("test_acc", "test_ece")):
        return _warn(f"{path}: test_acc or test_ece missing or not a number, skipped")
    for key, value in want.items():
        if key in final and final[key] != value:
            return _warn(f"{path}: {key} is {final[key]!r} but the directory says {value!r}, "
                         f"skipped")
    return final


def _levels(entry):
    """{"acc": {p: x}, "ece": {p: x}} with percent keys and x in [0, 1], else None."""
    def ok(xs):
        return isinstance(xs, dict) and all(re.fullmatch(r"\d+(\.\d+)?", p) and _number(x)
                                            and 0 <= x <= 1 for p, x in xs.items())
    if isinstance(entry, dict) and ok(entry.get("acc")) and ok(entry.get("ece")):
        return {"acc": entry["acc"], "ece": entry["ece"]}
    return None


def _read_pruning(path, final):
    """{mode: {"acc": {p: x}, "ece": {p: x}}} from "pruning" (one mode) and "pruning_modes"."""
    modes, one, many = {}, final.get("pruning"), final.get("pruning_modes")
    if one is not None:
        if _levels(one) and isinstance(one.get("mode", ""), str):
            modes[one.get("mode", "activation")] = _levels(one)
        else:
            _warn(f"{path}: pruning is not {{mode, acc: {{p: x}}, ece: {{p: x}}}}, x in [0, 1]; "
                  f"left out of the pruning tables")
    if many is not None:
        if isinstance(many, dict) and all(map(_levels, many.values())):
            modes |= {mode: _levels(e) for mode, e in many.items()}
        else:
            _warn(f"{path}: pruning_modes is not {{mode: {{acc: {{p: x}}, ece: {{p: x}}}}}}, "
                  f"left out of the pruning tables")
    return modes


def _read_adapt(path, final):
    """adapt_curve -> {k: {"acc": x, "ece": x, ("paper_ece": x)}}; {} when absent or malformed."""
    curve = final.get("adapt_curve")
    if curve is None:
        return {}
    ks = curve.get("k") if isinstance(curve, dict) else None
    if isinstance(ks, list) and all(type(k) is int for k in ks):
        keys = [key for key in ("acc", "ece", "paper_ece") if key in curve]
        fractions = lambda xs: isinstance(xs, list) and len(xs) == len(ks) and all(  # noqa: E731
            _number(x) and 0 <= x <= 1 for x in xs)
        if {"acc", "ece"} <= set(keys) and all(fractions(curve[key]) for key in keys):
            return {k: {key: curve[key][i] for key in keys} for i, k in enumerate(ks)}
    _warn(f"{path}: adapt_curve is not {{k: [ints], acc: [..], ece: [..]}} of one length, "
          f"values in [0, 1]; left out")
    return {}


def _read_metrics(d):
    """metrics.jsonl's good lines; a bad one (not UTF-8, not JSON, a field missing) is skipped."""
    path = d / "metrics.jsonl"
    try:
        lines = path.read_bytes().splitlines()  # bytes: a stray byte spoils its line, not the file
    except OSError:
        _warn(f"{d}: no metrics.jsonl, left out of the curves")
        return []
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line.decode("utf-8"))
            need = ("epoch", "val_acc", "val_ece")
            if not (isinstance(row, dict) and all(_number(row.get(k)) for k in need)):
                raise ValueError("epoch, val_acc or val_ece missing")
            if not (0 <= row["val_acc"] <= 1 and 0 <= row["val_ece"] <= 1):
                raise ValueError("val_acc or val_ece outside [0, 1]")
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            _warn(f"{path}:{i}: bad line ({e}), ignored")
            continue
        rows.append(row)
    return rows


def _diag(row):
    """{module kind: (p5, p50, p95)} of theta's log-variance in one metrics line; {} if none."""
    theta = row["diag"].get("theta_logvar") if isinstance(row.get("diag"), dict) else None
    if not isinstance(theta, dict):
        return {}
    return {k: tuple(q) for k, q in theta.items()
            if isinstance(q, list) and len(q) == 3 and all(map(_number, q))}


def _read_run(d, split, method, seed):
    """One run directory -> dict, or None with a warning when it does not fit the layout."""
    final = _read_final(d, {"split": split, "method": method, "seed": seed})
    if final is None:
        return None
    metrics = _read_metrics(d)
    path = d / "final.json"
    return {"split": split, "method": method, "seed": seed, "final": final, "metrics": metrics,
            "pruning": _read_pruning(path, final), "adapt": _read_adapt(path, final),
            "wall_s": sum(r["time_s"] for r in metrics if _number(r.get("time_s")))}


def load_runs(root, skip=()):
    """Every finished run under root: dicts with split, method, seed, final, metrics (the lines
    of metrics.jsonl), pruning ({mode: {acc, ece}}), adapt ({k: {acc, ece, ..}}), wall_s."""
    root, skip = Path(root), {Path(s).resolve() for s in skip}
    runs = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if split_dir.resolve() in skip:
            continue
        for method_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for d in sorted(p for p in method_dir.iterdir() if p.is_dir()):
                m = re.fullmatch(r"seed(\d+)", d.name)
                run = _read_run(d, split_dir.name, method_dir.name, int(m.group(1))) if m else \
                    _warn(f"{d}: not a seed{{N}} directory, skipped")
                if run:
                    runs.append(run)
    return runs


# -----------------------------------------------------------------------------
# tables


def mean_se(xs):
    """Mean and standard error std / sqrt(n) (sample std, n - 1); se = 0 for one value."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0)


def _fmt(xs, percent):
    m, se = mean_se(xs)
    return f"{100 * m:.1f}% ± {100 * se:.1f}%" if percent else f"{m:.3f} ± {se:.3f}"


def _table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _grid(title, methods, cols, col_names, values, percent):
    """Methods x cols of mean ± s.e.; values(method, col) -> the numbers over seeds."""
    rows = []
    for m in methods:
        cells = [values(m, c) for c in cols]
        rows.append([METHODS.get(m, m)] + [_fmt(xs, percent) if xs else "—" for xs in cells])
    return _table(title, ["Method"] + col_names, [r for r in rows if set(r[1:]) != {"—"}])


def _orders(runs):
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    splits = sorted({r["split"] for r in runs}, key=lambda s: (rank.get(s, len(rank)), s))
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    return splits, methods + sorted({r["method"] for r in runs} - set(METHODS))  # unknown ones last


def _cells(runs, split, method):
    return [r for r in runs if r["split"] == split and r["method"] == method]


def _chance_row(runs, splits):
    """A uniform guess over each test example's options, per split (mean over the seeds)."""
    cells = []
    for split in splits:
        by_seed = {r["seed"]: r["final"]["test_chance"] for r in runs
                   if r["split"] == split and _number(r["final"].get("test_chance"))}
        cells.append(f"{100 * sum(by_seed.values()) / len(by_seed):.1f}%" if by_seed else "—")
    return ["Chance (1 / options)"] + cells


# (name, final.json key, in percent): Table 1's two, then the others where runs have the key
TABLES = (("accuracy", "test_acc", True), ("ECE", "test_ece", False),
          ("paper ECE (the authors' per-example gap)", "test_paper_ece", False),
          ("accuracy over the whole vocabulary", "test_vocab_acc", True),
          ("Brier score", "test_brier", False),
          ("accuracy, macro average over held-out tasks", "test_macro_acc", True))


def _runs_cell(cells):
    if not cells:
        return "—"
    epochs = "/".join(str(e) for e in sorted({len(r["metrics"]) for r in cells}))
    wall = sum(r["wall_s"] for r in cells) / len(cells)
    return f"{len(cells)} seed{'s' * (len(cells) > 1)}, {epochs} ep, {wall / 60:.1f} min/run"


def results_tables(runs):
    """Table 1 (test accuracy and ECE, methods x splits, mean ± s.e. over seeds), the other
    test metrics that the runs recorded, and the runs behind them."""
    splits, methods = _orders(runs)

    def values(key):
        return lambda m, s: [r["final"][key] for r in _cells(runs, s, m) if key in r["final"]]

    out = [_grid(f"Test {name} (mean ± s.e. over seeds)", methods, splits, splits, values(key),
                 percent) for name, key, percent in TABLES if any(key in r["final"] for r in runs)]
    chance = _chance_row(runs, splits)
    if set(chance[1:]) != {"—"}:  # runs before test_chance was recorded have none
        out[0] += "\n| " + " | ".join(chance) + " |"
    rows = [[METHODS.get(m, m)] + [_runs_cell(_cells(runs, s, m)) for s in splits] for m in methods]
    hours = sum(r["wall_s"] for r in runs) / 3600
    out.append(_table("Runs (seeds, epochs, mean wall time per run)", ["Method"] + splits, rows)
               + f"\n\nTotal wall time of the {len(runs)} runs: {hours:.2f} h "
                 f"(sum of the epochs' time_s).")
    return "\n\n".join(out)


def pruning_tables(runs):
    """Table 2 per split and pruning mode: methods x pruning levels, test accuracy and ECE."""
    splits, methods = _orders(runs)
    out = []
    for s in splits:
        for mode in sorted({mode for r in runs if r["split"] == s for mode in r["pruning"]}):
            mr = [(r["method"], r["pruning"][mode]) for r in runs
                  if r["split"] == s and mode in r["pruning"]]
            levels = sorted({lv for _, e in mr for lv in e["acc"]}, key=float)
            out += [_grid(f"Pruning, {s}, {mode} mode: test {name}", methods, levels,
                          [f"{lv}% pruned" for lv in levels],
                          lambda m, lv: [e[key][lv] for rm, e in mr if rm == m and lv in e[key]],
                          percent)
                    for name, key, percent in (("accuracy", "acc", True), ("ECE", "ece", False))]
    return "\n\n".join(out)


def adapt_tables(runs):
    """Per split: test accuracy after k test-time adaptation steps, methods x k."""
    splits, methods = _orders(runs)
    out = []
    for s in splits:
        ks = sorted({k for r in runs if r["split"] == s for k in r["adapt"]})
        if ks:
            def acc(m, k, s=s):
                return [r["adapt"][k]["acc"] for r in _cells(runs, s, m) if k in r["adapt"]]
            out.append(_grid(f"Test-time adaptation, {s}: test accuracy after k steps", methods, ks,
                             [f"k = {k}" for k in ks], acc, True))
    return "\n\n".join(out)


# -----------------------------------------------------------------------------
# curves


def moving_average(ys, window=3):
    """Mean over the `window` most recent values (fewer at the start), as in Figure 2."""
    return [sum(ys[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(len(ys))]


def _mean_at(points):
    """[(x, y)] of several seeds -> (xs sorted, the mean y at each x)."""
    by_x = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    return xs, [sum(by_x[x]) / len(by_x[x]) for x in xs]


def _line_plots(runs, out_dir, name, panels, xlabel, points, smooth=False):
    """{name}_{split}.png per split: a panel per (key, label) of panels, a line per method: the
    mean over seeds of points(run, key) -> [(x, y)]; smooth: moving average of 3 (Figure 2)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    splits, methods = _orders(runs)
    paths = []
    for s in splits:
        cells = {m: c for m in methods
                 if (c := [r for r in _cells(runs, s, m) if points(r, panels[0][0])])}
        if not cells:
            continue
        fig = Figure(figsize=(5 * len(panels), 4))
        for ax, (key, label) in zip(fig.subplots(1, len(panels)), panels):
            for m, c in cells.items():
                xs, ys = _mean_at([pt for r in c for pt in points(r, key)])
                if len(xs) == 1:  # one evaluation (Pretrained), drawn across the plot
                    ax.axhline(ys[0], linestyle="--", color="gray", label=METHODS.get(m, m))
                else:
                    ax.plot(xs, moving_average(ys) if smooth else ys, "-" if smooth else "o-",
                            label=METHODS.get(m, m))
            ax.set(xlabel=xlabel, ylabel=label,
                   title=f"{s}: {label}{' (moving average of 3)' * smooth}")
            ax.legend()
        paths.append(Path(out_dir) / f"{name}_{s}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths


def curves(runs, out_dir):
    """Figure 2 per split: validation accuracy and ECE over epochs, moving average of 3,
    mean over seeds, one line per method. Returns the PNG paths."""
    panels = [("val_acc", "validation accuracy"), ("val_ece", "validation ECE")]
    return _line_plots(runs, out_dir, "curves", panels, "epoch", smooth=True,
                       points=lambda r, key: [(row["epoch"], row[key]) for row in r["metrics"]])


def adapt_curves(runs, out_dir):
    """Per split: test accuracy and ECE after k test-time adaptation steps (adapt_curve)."""
    panels = [("acc", "test accuracy"), ("ece", "test ECE")]
    return _line_plots(runs, out_dir, "adapt", panels, "adaptation steps k",
                       lambda r, key: [(k, v[key]) for k, v in r["adapt"].items()])


def diag_curves(runs, out_dir):
    """Per split, a panel per method that logs diag: theta's log sigma^2 against epoch per module
    kind, the median and the p5-p95 band, each the mean over seeds."""
    from matplotlib.figure import Figure

    splits, methods = _orders(runs)
    paths = []
    for s in splits:
        logged = {m: rows for m in methods
                  if (rows := [ln for r in _cells(runs, s, m) for ln in r["metrics"] if _diag(ln)])}
        if not logged:
            continue
        fig = Figure(figsize=(5 * len(logged), 4))
        for ax, (m, rows) in zip(fig.subplots(1, len(logged), squeeze=False)[0], logged.items()):
            for kind in sorted({k for row in rows for k in _diag(row)}):
                pts = [(row["epoch"], _diag(row)[kind]) for row in rows if kind in _diag(row)]
                epochs, p5 = _mean_at([(e, q[0]) for e, q in pts])
                p50, p95 = (_mean_at([(e, q[j]) for e, q in pts])[1] for j in (1, 2))
                line, = ax.plot(epochs, p50, label=kind)
                ax.fill_between(epochs, p5, p95, color=line.get_color(), alpha=0.2)
            ax.set(xlabel="epoch", ylabel="theta log sigma^2",
                   title=f"{s}, {METHODS.get(m, m)}: theta log-variance (median, p5-p95)")
            ax.legend()
        paths.append(Path(out_dir) / f"diag_{s}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths


def report(root, out_dir=None):
    """Write report.md (the tables) and the curves' PNGs to out_dir; return the markdown."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir else root / "report"
    runs = load_runs(root, skip=[out_dir])
    if not runs:
        raise SystemExit(f"eval.py: no finished runs (with final.json) under {root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"## Results from {root}", results_tables(runs), pruning_tables(runs),
             adapt_tables(runs)]
    try:
        figures = {"Validation curves": curves(runs, out_dir),
                   "Test-time adaptation curves": adapt_curves(runs, out_dir),
                   "ABMLL diagnostics: theta's log-variance": diag_curves(runs, out_dir)}
    except ImportError:
        figures = _warn("matplotlib is not installed: no curves") or {}
    parts += [f"### {title}\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
              for title, pngs in figures.items() if pngs]
    text = "\n\n".join(p for p in parts if p) + "\n"
    (out_dir / "report.md").write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description="Tables, curves and comparisons of train.py's runs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="Table 1, Table 2 (pruning) and Figure 2 from RUN_ROOT")
    rp.add_argument("root", metavar="RUN_ROOT", help="directory of {split}/{method}/seed{N}/ runs")
    rp.add_argument("--out", default=None,
                    help="where report.md and the PNGs go (default RUN_ROOT/report)")
    cp = sub.add_parser("compare", help="paired bootstrap: method differences on the same examples")
    cp.add_argument("root", metavar="RUNS", help="directory of {split}/{method}/seed{N}/ runs")
    cp.add_argument("--split", required=True, help="the split directory under RUNS to compare")
    cp.add_argument("--part", default="test", help="which predictions: {part}-{prune}.jsonl.gz")
    cp.add_argument("--prune", type=float, default=0, help="pruning level of the predictions (%%)")
    cp.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    cp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's generator")
    cp.add_argument("--metrics", nargs="+", choices=list(compare.METRICS),
                    default=["acc", "ece", "paper_ece"], help="metrics to compare")
    cp.add_argument("--out", default=None,
                    help="where compare.md and compare.json go (default RUNS/report)")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        raise SystemExit(f"eval.py: {'RUN_ROOT' if args.cmd == 'report' else 'RUNS'} {args.root} "
                         f"is not a directory")
    if args.cmd == "compare" and args.resamples < 1:
        raise SystemExit(f"eval.py: --resamples must be at least 1, got {args.resamples}")
    try:
        if args.cmd == "report":
            text = report(args.root, args.out)
        else:
            text = compare.compare(args.root, args.split, args.part, args.prune, args.resamples,
                                   args.seed, args.metrics, args.out, METHODS)
    except OSError as e:
        raise SystemExit(f"eval.py: cannot write the {args.cmd} output: {e}")
    print(text, end="")
    print(f"(written to {Path(args.out or Path(args.root) / 'report')})", file=sys.stderr)


if __name__ == "__main__":
    main()
