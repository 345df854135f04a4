"""Evaluation: the metrics of every table, and the command line over train.py's run directories.

    python eval.py report runs                   # Table 1, Table 2 and Figure 2 from runs/
    python eval.py report runs --out report/     # same, written to report/ (default runs/report)
    python eval.py compare runs --split nli      # which methods differ: paired bootstrap, 95% CI

Metrics on (N, C) probabilities: accuracy, ECE (top label, 15 bins, as torchmetrics), NLL, Brier,
the authors' accuracy over the whole vocabulary and their per-example "ECE"; metrics(rows) gives
them all on prediction rows, pooled and as a macro average over tasks (final.json's test_*).

`report` (report.py) writes report.md, curves_{split}.png, adapt_{split}.png and diag_{split}.png
(where runs have adapt_curve / diag); `compare` (compare.py) writes compare.md and compare.json,
both into --out. The run directories are described in rundir.py, the predictions files in
compare.py; pruning (Section 5.2) is prune.py.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import compare
import report
from compare import read_predictions, write_predictions  # noqa: F401  the file format lives there

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
            text = report.report(args.root, args.out)
        else:
            text = compare.compare(args.root, args.split, args.part, args.prune, args.resamples,
                                   args.seed, args.metrics, args.out, report.METHODS)
    except OSError as e:
        raise SystemExit(f"eval.py: cannot write the {args.cmd} output: {e}")
    print(text, end="")
    print(f"(written to {Path(args.out or Path(args.root) / 'report')})", file=sys.stderr)


if __name__ == "__main__":
    main()
