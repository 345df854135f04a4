"""The run directories train.py writes, and the reader that the report builds on (load_runs).

Layout:

    {root}/{split}/{method}/seed{seed}/       ({method} or a variant of it: {method}-{label})
        config.json    the run's arguments (method, split, seed, model, epochs, ...)
        metrics.jsonl  one line per epoch: {"epoch", "train_loss", "val_acc", "val_ece",
                       "val_nll", .. every metrics() key as val_*, "val_time_s", "time_s",
                       "diag" (optional)}; time_s = wall seconds of the epoch (train + val);
                       diag (ABMLL) = {"theta_logvar": {"wq": [p5, p50, p95], "wv": .., "wo": ..},
                       "phi_logvar": {..} (after test-time adaptation on the first held-out
                       task), "noise_ratio": {"wq": x, ..}, "noise_changed": {..},
                       "sample_vs_mean": x} (heldout.diagnostics)
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

metrics() is eval.py's, read_predictions() compare.py's, PRUNE_MODES prune.py's.

In load_runs, a run without a readable final.json (unfinished, killed, copied half) is skipped
with one warning line; so is anything else that does not fit the layout, a metrics.jsonl line
that is not UTF-8 JSON, and a final.json number out of its range (accuracy or ECE outside
[0, 1], a negative NLL): the key is left out, or the run if it is test_acc or test_ece.
"""

import json
import math
import re
import sys
from pathlib import Path


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


BOUNDS = {"acc": (0, 1), "ece": (0, 1), "chance": (0, 1), "brier": (0, 2), "nll": (0, math.inf)}


def _bounds(key):
    """The valid range of a metric, by the end of its name (test_macro_acc is an accuracy)."""
    return next((b for end, b in BOUNDS.items() if key.endswith(end)), None)


def _is_variant(directory, method):
    """A method's directory is its name or a labelled variant of it, {method}-{label}: runs of
    one method with other settings (abmll-beta1e-12) side by side, a row each in the report."""
    return isinstance(method, str) and (directory == method or directory.startswith(method + "-"))


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
        if key == "method" and _is_variant(value, final.get(key)):
            continue
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


def theta_logvar(row):
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
