"""Evaluation: calibration, the pruning study (Section 5.2) and the paper's tables and curves.

    python eval.py report runs                 # Table 1, Table 2 and Figure 2 from runs/
    python eval.py report runs --out report/   # same, written to report/ (default runs/report)

Run directories (written by train.py, read here):

    {root}/{split}/{method}/seed{seed}/
        config.json    the run's arguments (method, split, seed, model, epochs, ...)
        metrics.jsonl  one line per epoch: {"epoch", "train_loss", "val_acc", "val_ece",
                       "val_nll", "time_s"}; time_s = wall seconds of that epoch (train + val)
        final.json     {"method", "split", "seed", "best_epoch", "test_acc", "test_ece",
                        "test_nll", "n_test", "pruning" (optional): {"mode": "activation",
                        "acc": {"0": .., "1": .., "10": .., "20": .., "30": ..}, "ece": {..}}}

A run without a readable final.json (unfinished, killed, copied half) is skipped with one
warning line; so is anything else that does not fit the layout.
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

from abmll import BayesLoRALinear, LoRALinear

METHODS = {"pretrained": "Pretrained", "lora": "Regular LoRA", "structured": "Struct. LoRA",  # dir -> name,
           "reptile": "Reptile", "abmll": "ABMLL"}  # in the paper's row order
SPLIT_ORDER = ["cls-45", "cls-23", "cls", "nli", "para", "mcqa"]  # the paper's column order
PRUNE_LEVELS = (0, 1, 10, 20, 30)  # percent, Tables 2 and 4
MEAN_PATH = {LoRALinear: ("lora_B", "lora_A"), BayesLoRALinear: ("phi_mean_B", "phi_mean_A")}  # (B, A) of the mean

# -----------------------------------------------------------------------------
# metrics on (N, C) probabilities


def _as_probs(probs, labels):
    """(N, C) float tensor and (N,) long labels, on the CPU. A list of rows of different lengths
    (examples with 2, 3 or 4 options) is zero-padded: a zero column never becomes the top label."""
    if isinstance(probs, (list, tuple)) and probs:
        width = max(len(p) for p in probs)
        probs = torch.stack([F.pad(torch.as_tensor(p, dtype=torch.float64), (0, width - len(p))) for p in probs])
    probs = torch.as_tensor(probs)
    if probs.ndim != 2 or not probs.is_floating_point() or len(probs) == 0:
        raise ValueError(f"probs must be a non-empty float (N, C) matrix, got {tuple(probs.shape)} {probs.dtype}")
    if not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError("probs must be probabilities in [0, 1] (softmax the logits first); got NaN or outside")
    labels = torch.as_tensor(labels).long().view(-1).cpu()
    if len(labels) != len(probs):
        raise ValueError(f"{len(probs)} rows of probabilities but {len(labels)} labels")
    return probs.detach().cpu(), labels


def accuracy(probs, labels) -> float:
    """Fraction of examples whose argmax is the label."""
    probs, labels = _as_probs(probs, labels)
    return probs.max(dim=1).indices.eq(labels).double().mean().item()  # max(): the same ties as the ECE


def nll(probs, labels) -> float:
    """Mean -log p(label); p is clamped at the smallest normal fp32 so that one zero
    probability gives a large finite number (~87) instead of inf."""
    probs, labels = _as_probs(probs, labels)
    p = probs.double().gather(1, labels[:, None]).squeeze(1)
    return -p.clamp_min(torch.finfo(torch.float32).tiny).log().mean().item()


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
    count = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
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


def reliability_diagram(probs, labels, path, n_bins=15, title=None):
    """Save a reliability diagram (accuracy per confidence bin vs. the diagonal) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    count, _, correct = _calibration_bins(probs, labels, n_bins)
    count[n_bins - 1] += count[n_bins]  # draw the conf == 1.0 bin with the last bar
    correct[n_bins - 1] += correct[n_bins]
    acc = (correct / count.clamp_min(1))[:n_bins].tolist()
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.bar([k / n_bins for k in range(n_bins)], acc, width=1 / n_bins, align="edge", edgecolor="black",
           label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ece = expected_calibration_error(probs, labels, n_bins)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title + ': ' if title else ''}ECE {ece:.3f} (n={int(count.sum())})")
    ax.legend(loc="upper left")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# -----------------------------------------------------------------------------
# pruning (Section 5.2; ../shared/DESIGN.md)


def _count(p, n):
    """Number of the n entries to prune at p percent: the nearest integer (half up)."""
    return min(n, int(p * n / 100 + 0.5))


def _activation_hook(p):
    def hook(module, args, out):  # out: (B, T, dim), the residual stream after the block
        k = _count(p, out.shape[-1])
        idx = out.abs().topk(k, dim=-1, largest=False).indices  # (B, T, k)
        return out.scatter(-1, idx, 0.0)
    return hook


@contextmanager
def pruned(model, p, mode="activation"):
    """Prune p percent of the model while inside the `with`; the model is restored exactly on exit.

    activation: at the output of every model.layers[i], per token, the p% of the hidden
        dimensions with the smallest |value| are set to zero (Section 5.2: "a percentage of
        neurons in each layer embedding is set to zero, sorted by magnitudes").
    weight: unstructured magnitude pruning: in every linear weight of model.layers the p% of
        entries with the smallest |w| are set to zero, per matrix. Adapters are merged first,
        so that the effective weight is pruned: LoRALinear W0 + s B A; BayesLoRALinear
        W0 + mu_phi, its sigma_phi * eps still drawn on top in "sample" mode. Inside the
        `with`, score only: the adapters' B is zeroed there, so training them would be lost.
    p = 0 touches nothing. Counts are rounded to the nearest integer (so 1% of 576 is 6).
    """
    if not 0 <= p <= 100:
        raise ValueError(f"pruning percentage must be in [0, 100], got {p}")
    if mode not in ("activation", "weight"):
        raise ValueError(f"pruning mode must be 'activation' or 'weight', got {mode!r}")
    if p == 0:
        yield model
        return
    if mode == "activation":
        handles = [layer.register_forward_hook(_activation_hook(p)) for layer in model.layers]
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
        return

    targets = {id(m.weight): m for m in model.layers.modules() if isinstance(m, (nn.Linear, *MEAN_PATH))}
    saved = []  # (tensor, copy on the CPU: no second copy of the weights on the accelerator)
    try:
        with torch.no_grad():
            for m in targets.values():
                saved.append((m.weight, m.weight.to("cpu", copy=True)))
                if type(m) in MEAN_PATH and not getattr(m, "merged", False):
                    B, A = (getattr(m, n) for n in MEAN_PATH[type(m)])
                    saved.append((B, B.to("cpu", copy=True)))
                    m.weight += (m.scaling * B @ A).to(m.weight.dtype)  # W0 + mu: prune the effective weight
                    B.zero_()  # the adapter's mean path now adds exactly 0
                flat = m.weight.view(-1)
                flat[flat.abs().topk(_count(p, flat.numel()), largest=False).indices] = 0
        yield model
    finally:
        with torch.no_grad():
            for t, old in reversed(saved):
                t.copy_(old)


def pruning_report(scores, mode="activation"):
    """{p: (probs, labels)} pooled over all held-out tasks -> the "pruning" entry of final.json.

    Adapt first (unpruned), then score the query set under each level, so that both modes
    see the same adapted adapters:

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
# reports from run directories


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_run(d, split, method, seed):
    """One run directory -> dict, or None with a warning when it does not fit the layout."""
    try:
        final = json.loads((d / "final.json").read_text())
    except FileNotFoundError:
        return _warn(f"{d}: no final.json (unfinished run?), skipped")
    except (OSError, ValueError) as e:
        return _warn(f"{d}/final.json: unreadable ({e}), skipped")
    if not isinstance(final, dict) or not all(_number(final.get(k)) for k in ("test_acc", "test_ece")):
        return _warn(f"{d}/final.json: test_acc or test_ece missing or not a number, skipped")
    for key, want in (("split", split), ("method", method), ("seed", seed)):
        if key in final and final[key] != want:
            return _warn(f"{d}/final.json: {key} is {final[key]!r} but the directory says {want!r}, skipped")
    pruning = final.get("pruning")
    if pruning is not None and not (
            isinstance(pruning, dict) and isinstance(pruning.get("mode", ""), str)
            and all(isinstance(pruning.get(key), dict) and all(re.fullmatch(r"\d+(\.\d+)?", k) and _number(v)
                                                              for k, v in pruning[key].items())
                    for key in ("acc", "ece"))):
        _warn(f"{d}/final.json: pruning is not {{mode, acc: {{p: x}}, ece: {{p: x}}}}, left out of the pruning tables")
        pruning = None
    metrics = []
    try:
        lines = (d / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
        _warn(f"{d}: no metrics.jsonl, left out of the curves")
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not all(_number(row.get(k)) for k in ("epoch", "val_acc", "val_ece")):
                raise ValueError("epoch, val_acc or val_ece missing")
        except ValueError as e:
            _warn(f"{d}/metrics.jsonl:{i}: bad line ({e}), ignored")
            continue
        metrics.append(row)
    return {"split": split, "method": method, "seed": seed, "final": final, "pruning": pruning,
            "metrics": metrics, "wall_s": sum(r["time_s"] for r in metrics if _number(r.get("time_s")))}


def load_runs(root, skip=()):
    """Every finished run under root: dicts with split, method, seed, final, pruning, metrics, wall_s."""
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
    rows = [[METHODS.get(m, m)] + [_fmt(v, percent) if v else "—" for v in (values(m, c) for c in cols)]
            for m in methods]
    return _table(title, ["Method"] + col_names, [r for r in rows if set(r[1:]) != {"—"}])


def _orders(runs):
    splits = sorted({r["split"] for r in runs},
                    key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    return splits, methods + sorted({r["method"] for r in runs} - set(METHODS))  # unknown names last


def _cells(runs, split, method):
    return [r for r in runs if r["split"] == split and r["method"] == method]


def _chance_row(runs, splits):
    """A uniform guess over each test example's options, per split (mean over the seeds' test sets)."""
    cells = []
    for split in splits:
        by_seed = {r["seed"]: r["final"]["test_chance"] for r in runs
                   if r["split"] == split and _number(r["final"].get("test_chance"))}
        cells.append(f"{100 * sum(by_seed.values()) / len(by_seed):.1f}%" if by_seed else "—")
    return ["Chance (1 / options)"] + cells


def results_tables(runs):
    """Table 1 (test accuracy and ECE, methods x splits, mean ± s.e. over seeds) and the runs behind it."""
    splits, methods = _orders(runs)
    out = [_grid(f"Test {name} (mean ± s.e. over seeds)", methods, splits, splits,
                 lambda m, s: [r["final"][key] for r in _cells(runs, s, m)], percent)
           for name, key, percent in (("accuracy", "test_acc", True), ("ECE", "test_ece", False))]
    chance = _chance_row(runs, splits)
    if set(chance[1:]) != {"—"}:  # runs before test_chance was recorded have none
        out[0] += "\n| " + " | ".join(chance) + " |"

    def runs_cell(c):
        if not c:
            return "—"
        epochs = "/".join(str(e) for e in sorted({len(r["metrics"]) for r in c}))
        wall = sum(r["wall_s"] for r in c) / len(c)
        return f"{len(c)} seed{'s' * (len(c) > 1)}, {epochs} ep, {wall / 60:.1f} min/run"

    rows = [[METHODS.get(m, m)] + [runs_cell(_cells(runs, s, m)) for s in splits] for m in methods]
    total = sum(r["wall_s"] for r in runs) / 3600
    out.append(_table("Runs (seeds, epochs, mean wall time per run)", ["Method"] + splits, rows)
               + f"\n\nTotal wall time of the {len(runs)} runs: {total:.2f} h (sum of the epochs' time_s).")
    return "\n\n".join(out)


def pruning_tables(runs):
    """Table 2 per split and pruning mode: methods x pruning levels, test accuracy and ECE."""
    splits, methods = _orders(runs)
    out = []
    for s in splits:
        pr = [r for r in runs if r["split"] == s and r["pruning"]]
        for mode in sorted({r["pruning"].get("mode", "activation") for r in pr}):
            mr = [r for r in pr if r["pruning"].get("mode", "activation") == mode]
            levels = sorted({k for r in mr for k in r["pruning"]["acc"]}, key=float)
            names = [f"{lv}% pruned" for lv in levels]
            out += [_grid(f"Pruning, {s}, {mode} mode: test {name}", methods, levels, names,
                          lambda m, lv: [r["pruning"][key][lv] for r in _cells(mr, s, m) if lv in r["pruning"][key]],
                          percent)
                    for name, key, percent in (("accuracy", "acc", True), ("ECE", "ece", False))]
    return "\n\n".join(out)


def moving_average(ys, window=3):
    """Mean over the `window` most recent values (fewer at the start), as in Figure 2."""
    return [sum(ys[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(len(ys))]


def curves(runs, out_dir):
    """Figure 2 per split: validation accuracy and ECE over epochs, moving average of 3,
    mean over seeds, one line per method. Returns the PNG paths."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    splits, methods = _orders(runs)
    paths = []
    for s in splits:
        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2)
        drawn = False
        for m in methods:
            by_epoch = {}  # epoch -> that epoch's metrics line of every seed
            for r in _cells(runs, s, m):
                for row in r["metrics"]:
                    by_epoch.setdefault(row["epoch"], []).append(row)
            epochs = sorted(by_epoch)
            for ax, key in zip(axes if epochs else (), ("val_acc", "val_ece")):
                drawn = True
                ys = moving_average([sum(row[key] for row in by_epoch[e]) / len(by_epoch[e]) for e in epochs])
                if len(epochs) == 1:  # pretrained: one evaluation, drawn across the plot
                    ax.axhline(ys[0], linestyle="--", color="gray", label=METHODS.get(m, m))
                else:
                    ax.plot(epochs, ys, label=METHODS.get(m, m))
        if not drawn:
            _warn(f"{s}: no metrics.jsonl lines, no curves")
            continue
        for ax, name in zip(axes, ("validation accuracy", "validation ECE")):
            ax.set(xlabel="epoch", ylabel=name, title=f"{s}: {name} (moving average of 3)")
            ax.legend()
        paths.append(Path(out_dir) / f"curves_{s}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths


def report(root, out_dir=None):
    """Write report.md (the tables) and curves_{split}.png to out_dir; return the markdown."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir else root / "report"
    runs = load_runs(root, skip=[out_dir])
    if not runs:
        raise SystemExit(f"eval.py: no finished runs (with final.json) under {root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"## Results from {root}", results_tables(runs), pruning_tables(runs)]
    try:
        pngs = curves(runs, out_dir)
    except ImportError:
        pngs = _warn("matplotlib is not installed: no curves") or []
    parts.append("### Validation curves\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs))
    text = "\n\n".join(p for p in parts if p) + "\n"
    (out_dir / "report.md").write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description="Tables and curves from train.py's run directories.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="Table 1, Table 2 (pruning) and Figure 2 from RUN_ROOT")
    rp.add_argument("root", metavar="RUN_ROOT", help="directory holding {split}/{method}/seed{N}/ runs")
    rp.add_argument("--out", default=None, help="where report.md and the PNGs go (default RUN_ROOT/report)")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        raise SystemExit(f"eval.py: RUN_ROOT {args.root} is not a directory")
    try:
        text = report(args.root, args.out)
    except OSError as e:
        raise SystemExit(f"eval.py: cannot write the report: {e}")
    print(text, end="")
    print(f"(written to {Path(args.out) if args.out else Path(args.root) / 'report'})", file=sys.stderr)


if __name__ == "__main__":
    main()
