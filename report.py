"""The paper's tables and figures from train.py's run directories (`python eval.py report`).

    report.report("runs")                 # runs/report/report.md and its PNGs; returns the markdown
    report.report("runs", "report/")      # the same, written to report/

report.md holds Table 1 (test accuracy and ECE, methods x splits, mean ± s.e. over seeds), the
other test metrics the runs recorded, Table 2 per split and pruning mode, and the test-time
adaptation tables; the PNGs are Figure 2 (curves_{split}.png), the adaptation curves
(adapt_{split}.png) and ABMLL's log-variance over epochs (diag_{split}.png), where runs have them.
The run directories are read by rundir.py.
"""

import math
import sys
from pathlib import Path

from rundir import load_runs, theta_logvar

# directory -> name, in the paper's row order
METHODS = {"pretrained": "Pretrained", "pretrained-adapted": "Pretrained + adapt.",
           "lora": "Regular LoRA", "structured": "Struct. LoRA", "reptile": "Reptile",
           "abmll": "ABMLL"}
# the paper's column order, then ours
SPLIT_ORDER = ["cls-45", "cls-23", "cls", "nli", "para", "mcqa", "diag"]

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
        by_seed = {r["seed"]: r["final"]["test_chance"] for r in runs  # load_runs checked it
                   if r["split"] == split and "test_chance" in r["final"]}
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
        logged = {m: rows for m in methods  # rows: [(epoch, {kind: (p5, p50, p95)})]
                  if (rows := [(ln["epoch"], q) for r in _cells(runs, s, m) for ln in r["metrics"]
                               if (q := theta_logvar(ln))])}
        if not logged:
            continue
        fig = Figure(figsize=(5 * len(logged), 4))
        for ax, (m, rows) in zip(fig.subplots(1, len(logged), squeeze=False)[0], logged.items()):
            for kind in sorted({k for _, q in rows for k in q}):
                pts = [(e, q[kind]) for e, q in rows if kind in q]
                epochs, p5 = _mean_at([(e, q[0]) for e, q in pts])
                p50, p95 = (_mean_at([(e, q[j]) for e, q in pts])[1] for j in (1, 2))
                line, = ax.plot(epochs, p50, label=kind)
                ax.fill_between(epochs, p5, p95, color=line.get_color(), alpha=0.2)
            ax.set(xlabel="epoch", ylabel="theta log sigma^2",
                   title=f"{s}, {METHODS.get(m, m)}\ntheta log-variance (median, p5-p95)")
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
        print("warning: matplotlib is not installed: no curves", file=sys.stderr)
        figures = {}
    parts += [f"### {title}\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
              for title, pngs in figures.items() if pngs]
    text = "\n\n".join(p for p in parts if p) + "\n"
    (out_dir / "report.md").write_text(text)
    return text
