"""Per-example predictions files and paired bootstrap comparisons of methods (`eval.py compare`).

    python eval.py compare runs --split nli                  # test examples, unpruned
    python eval.py compare runs --split nli --prune 10 --resamples 5000 --out cmp/

Predictions files (written by train.py through eval.write_predictions, one per run, part and
pruning level; the run directories are described in rundir.py):

    {root}/{split}/{method}/seed{N}/predictions/{part}-{prune}.jsonl.gz

gzip'd JSON lines, one per scored example:

    {"task": str, "id": int (the example's index in its task's list), "label": int (index of
     the correct option), "n_options": int, "probs": [n_options floats] (softmax over this
     example's letters: accuracy, ECE, NLL, Brier), "probs4": [4 floats] (softmax over A-D:
     paper ECE), "answer_id": int (token id of the correct letter), "vocab_argmax": int}

Floats are Python floats (float64, from .tolist()): JSON round-trips them exactly, so a run's
predictions files reproduce its final.json metrics bit for bit (eval.metrics).

Two methods are compared on the examples both scored: runs of the same seed are paired by
(task, id), and different seeds never meet. The pooled difference is the mean over seeds of
the per-seed differences; a bootstrap replicate resamples every seed's examples independently
(stratified by seed) and averages the same way. The 95% interval is the percentile interval.
This file imports nothing from eval.py (eval.py imports it), so the resampled metrics below
are written again, vectorized over resamples; tests check them against eval.py's.
"""

import gzip
import json
import os
import re
import zlib
from pathlib import Path

import torch

ROW_KEYS = {"task": str, "id": int, "label": int, "n_options": int, "probs": list, "probs4": list,
            "answer_id": int, "vocab_argmax": int}
# name -> (title, higher is better, shown in percent)
METRICS = {"acc": ("Accuracy", True, True),
           "vocab_acc": ("Accuracy over the whole vocabulary", True, True),
           "ece": ("ECE (15 bins, pooled)", False, False),
           "paper_ece": ("Paper ECE (per-example gap)", False, False),
           "nll": ("NLL", False, False),
           "brier": ("Brier score", False, False)}
N_BINS = 15  # as eval.expected_calibration_error

# -----------------------------------------------------------------------------
# predictions files


def write_predictions(path, rows):
    """Write rows as gzip'd JSON lines, atomically: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(text.encode(), mtime=0))  # mtime 0: same rows, same bytes
    os.replace(tmp, path)
    return path


def _row_error(row):
    """What is wrong with one row, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for key, kind in ROW_KEYS.items():
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            return f"{key} missing or not {kind.__name__}"
    n = row["n_options"]
    if len(row["probs"]) != n or len(row["probs4"]) != 4 or not 0 <= row["label"] < n <= 4:
        return "probs must have n_options entries, probs4 4, and 0 <= label < n_options <= 4"
    if not all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in row["probs"] + row["probs4"]):
        return "probabilities must be numbers in [0, 1]"
    return None


def read_predictions(path) -> list[dict]:
    """The rows of a predictions file; ValueError naming the file on a bad or truncated one."""
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a complete gzip file ({e})") from None
    rows = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode())
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
        if err := _row_error(row):
            raise ValueError(f"{path}:{i}: {err}")
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# per-example statistics and the paired bootstrap


def example_stats(rows):
    """Rows -> (keys, stats): keys [((task, id), label)] sorted, stats {name: (N,) tensor} alike.

    Per example: acc = 1[argmax = label] (first index on ties, as torch.max), nll = -log p_label
    (clamped at fp32's tiny), brier = sum_c (p_c - 1[c = y])^2, paper_ece = |max p4 -
    1[argmax p4 = label]| (fp32 confidence, as torchmetrics), vocab_acc = 1[vocab argmax = answer
    id]; for the ECE: conf = max p in fp32 and its bin against torch.linspace(0, 1, 16) in fp32.
    """
    rows = sorted(rows, key=lambda r: (r["task"], r["id"]))
    probs = torch.tensor([r["probs"] + [0.0] * (4 - len(r["probs"])) for r in rows],  # zero-padded
                         dtype=torch.float64).view(-1, 4)
    probs4 = torch.tensor([r["probs4"] for r in rows], dtype=torch.float64).view(-1, 4)
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    conf, pred = probs.max(dim=1)
    conf4, pred4 = probs4.max(dim=1)
    correct = pred.eq(labels).double()
    p_label = probs.gather(1, labels[:, None])[:, 0]
    edges = torch.linspace(0, 1, N_BINS + 1, dtype=torch.float32)
    stats = {
        "acc": correct,
        "vocab_acc": torch.tensor([float(r["vocab_argmax"] == r["answer_id"]) for r in rows],
                                  dtype=torch.float64),
        "nll": -p_label.clamp_min(torch.finfo(torch.float32).tiny).log(),
        "brier": (probs - torch.nn.functional.one_hot(labels, 4)).pow(2).sum(1),
        "paper_ece": (pred4.eq(labels).float() - conf4.float()).abs().double(),
        "bin": torch.bucketize(conf.float(), edges, right=True) - 1,  # (N,) in [0, N_BINS]
        "gap": correct - conf.float().double(),  # per bin, sum(gap) = correct_b - conf_sum_b
    }
    return [((r["task"], r["id"]), r["label"]) for r in rows], stats


def _resampled(stats, idx, metric):
    """The metric on each resample, one per row of idx (R, N) -> (R,)."""
    if metric != "ece":
        return stats[metric][idx].mean(1)
    R, N = idx.shape
    slot = torch.arange(R)[:, None] * (N_BINS + 1) + stats["bin"][idx]  # (R, N): resample r, bin b
    sums = torch.zeros(R * (N_BINS + 1), dtype=torch.float64)
    sums.index_add_(0, slot.view(-1), stats["gap"][idx].view(-1))
    return sums.view(R, N_BINS + 1).abs().sum(1) / N  # ECE = sum_b |correct_b - conf_sum_b| / N


def value(stats, metric) -> float:
    """The metric on all examples (the identity resample)."""
    return _resampled(stats, torch.arange(len(stats["acc"]))[None], metric).item()


def _replicates(a, b, metric, resamples, gen):
    """(resamples,) bootstrap replicates of metric(a) - metric(b), a and b on the same examples."""
    n = len(a["acc"])
    step = max(1, 2**22 // n)  # resamples per chunk: a few million indices at a time
    out = []
    for start in range(0, resamples, step):
        idx = torch.randint(n, (min(step, resamples - start), n), generator=gen)  # (r, N)
        if metric == "ece":
            out.append(_resampled(a, idx, metric) - _resampled(b, idx, metric))
        else:  # a mean over examples: one gather of the per-example differences
            out.append((a[metric] - b[metric])[idx].mean(1))
    return torch.cat(out)


def _aligned(a_rows, b_rows):
    ka, a = example_stats(a_rows)
    kb, b = example_stats(b_rows)
    if ka != kb:
        raise ValueError("the two prediction sets hold different examples (task, id, label)")
    if len(ka) == 0 or len(set(k for k, _ in ka)) != len(ka):
        raise ValueError("a prediction set is empty or holds an example (task, id) twice")
    return a, b


def pooled_bootstrap(pairs, metric, resamples=2000, seed=0):
    """[(a_rows, b_rows) per seed] -> (diff, lo, hi): diff = the mean over seeds of metric(a) -
    metric(b), [lo, hi] its 95% percentile interval; each replicate resamples every seed."""
    if not pairs:
        raise ValueError("pooled_bootstrap needs at least one (a_rows, b_rows) pair")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    gen = torch.Generator().manual_seed(seed)
    diffs, reps = [], []
    for a_rows, b_rows in pairs:
        a, b = _aligned(a_rows, b_rows)
        diffs.append(value(a, metric) - value(b, metric))
        reps.append(_replicates(a, b, metric, resamples, gen))
    reps = torch.stack(reps).mean(0)  # (resamples,): stratified by seed, averaged like diff
    lo, hi = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=reps.dtype)).tolist()
    return sum(diffs) / len(diffs), lo, hi


def paired_bootstrap(a_rows, b_rows, metric, resamples=2000, seed=0):
    """One seed: metric(a) - metric(b) on the same examples and its 95% percentile interval."""
    return pooled_bootstrap([(a_rows, b_rows)], metric, resamples, seed)


# -----------------------------------------------------------------------------
# the compare command


def load_predictions(root, split, part="test", prune="0"):
    """{method: {seed: (path, rows)}} for every run of the split that has the predictions file."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise SystemExit(f"eval.py: --split {split}: no directory {split_dir}")
    name = f"{part}-{prune}.jsonl.gz"
    runs = {}
    for path in sorted(split_dir.glob(f"*/seed*/predictions/{name}")):
        m = re.fullmatch(r"seed(\d+)", path.parents[1].name)
        if not m:
            continue
        try:
            rows = read_predictions(path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"eval.py: {e}")
        runs.setdefault(path.parents[2].name, {})[int(m.group(1))] = (path, rows)
    if not runs:
        raise SystemExit(f"eval.py: no predictions files {split_dir}/*/seed*/predictions/{name}")
    return runs


def check_pairs(runs):
    """Every two runs of the same seed must hold the same examples; else one line naming both."""
    first = {}  # seed -> (path, keys) of the first run of that seed
    for seed_runs in runs.values():
        for seed, (path, rows) in seed_runs.items():
            keys = sorted(((r["task"], r["id"]), r["label"]) for r in rows)
            if len({k for k, _ in keys}) != len(keys):
                raise SystemExit(f"eval.py: {path} holds an example (task, id) twice")
            ref_path, ref_keys = first.setdefault(seed, (path, keys))
            if keys != ref_keys:
                raise SystemExit(f"eval.py: {ref_path} and {path} hold different examples "
                                 f"((task, id) or label differ): cannot pair them")


def _negated(d):
    """b - a from a - b; 0.0 - x rather than -x: no "-0.000" in the tables."""
    return d and {"diff": 0.0 - d["diff"], "lo": 0.0 - d["hi"], "hi": 0.0 - d["lo"],
                  "seeds": d["seeds"]}


def compare_metric(runs, metric, resamples=2000, seed=0):
    """One metric: each method's value (mean over its seeds), the best, every pairwise difference
    ({diff, lo, hi, seeds} over the seeds both have, None if none) and which methods are bold."""
    higher = METRICS[metric][1]
    per_seed = {m: {s: value(example_stats(rows)[1], metric) for s, (_, rows) in sr.items()}
                for m, sr in runs.items()}
    values = {m: sum(v.values()) / len(v) for m, v in per_seed.items()}
    best = (max if higher else min)(values, key=values.get)
    methods, pairwise = list(runs), {m: {} for m in runs}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            seeds = sorted(set(runs[a]) & set(runs[b]))
            pairs = [(runs[a][s][1], runs[b][s][1]) for s in seeds]
            diff, lo, hi = pooled_bootstrap(pairs, metric, resamples, seed) if seeds else (0, 0, 0)
            pairwise[a][b] = {"diff": diff, "lo": lo, "hi": hi, "seeds": seeds} if seeds else None
            pairwise[b][a] = _negated(pairwise[a][b])
    vs_best = {m: pairwise[m].get(best) for m in methods}
    # the paper bolds "statistically significant best performances, including ties"
    bold = {m: m == best or (d is not None and d["lo"] <= 0 <= d["hi"]) for m, d in vs_best.items()}
    return {"higher_is_better": higher, "best": best, "values": values, "per_seed": per_seed,
            "vs_best": vs_best, "bold": bold, "pairwise": pairwise}


def _num(x, percent, sign=""):
    return f"{100 * x:{sign}.1f}" if percent else f"{x:{sign}.3f}"


def _ci(d, percent):
    if d is None:
        return "—"
    diff, lo, hi = (_num(d[k], percent, "+") for k in ("diff", "lo", "hi"))
    return f"{diff} [{lo}, {hi}]"


def metric_tables(metric, res, names):
    """Markdown: each method against the best, then every pairwise difference (row − column)."""
    title, higher, percent = METRICS[metric]
    unit = " (points)" if percent else ""
    lines = [f"### {title} ({'higher' if higher else 'lower'} is better)", "",
             f"| Method | Seeds | Value | Δ vs best{unit} [95% CI] |", "|---|---|---|---|"]
    for m, v in res["values"].items():
        name, val = names.get(m, m), _num(v, percent) + "%" * percent
        if res["bold"][m]:
            name, val = f"**{name}**", f"**{val}**"
        vs = "best" if m == res["best"] else _ci(res["vs_best"][m], percent)
        lines.append(f"| {name} | {len(res['per_seed'][m])} | {val} | {vs} |")
    methods = list(res["values"])
    lines += ["", f"Pairwise: row − column{unit} [95% CI]; * the interval excludes 0.", "",
              "| | " + " | ".join(names.get(m, m) for m in methods) + " |",
              "|---" * (len(methods) + 1) + "|"]
    for a in methods:
        cells = []
        for b in methods:
            d = res["pairwise"][a].get(b)
            star = "*" if d and not d["lo"] <= 0 <= d["hi"] else ""
            cells.append("·" if a == b else _ci(d, percent) + star)
        lines.append(f"| {names.get(a, a)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(root, split, part="test", prune=0, resamples=2000, seed=0,
            metrics=("acc", "ece", "paper_ece"), out_dir=None, names=None):
    """Write compare.md and compare.json to out_dir (default root/report); return the markdown.
    names: {method directory: display name}, in the order of the tables' rows."""
    names, prune = names or {}, f"{prune:g}"
    runs = load_predictions(root, split, part, prune)
    check_pairs(runs)
    rank = {m: i for i, m in enumerate(names)}  # the given order first (the paper's), others after
    runs = {m: runs[m] for m in sorted(runs, key=lambda m: (rank.get(m, len(rank)), m))}
    results = {m: compare_metric(runs, m, resamples, seed) for m in metrics}
    seeds = ", ".join(map(str, sorted({s for sr in runs.values() for s in sr})))
    head = (f"## Paired comparison: {split}, {part} examples, {prune}% pruned\n\n"
            f"Runs of the same seed are paired by (task, id) (seeds {seeds}). Value: mean over the "
            f"method's seeds. Δ: mean over the seeds both have of the per-seed differences, with "
            f"the 95% percentile interval of {resamples} bootstrap resamples stratified by seed "
            f"(generator seed {seed}). **Bold**: the best method and every method whose interval "
            f"of the difference from the best includes 0.")
    text = "\n\n".join([head] + [metric_tables(m, r, names) for m, r in results.items()]) + "\n"
    out_dir = Path(out_dir) if out_dir else Path(root) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(text)
    files = {m: {s: str(path) for s, (path, _) in sr.items()} for m, sr in runs.items()}
    summary = {"root": str(root), "split": split, "part": part, "prune": prune,
               "resamples": resamples, "seed": seed, "files": files, "metrics": results}
    (out_dir / "compare.json").write_text(json.dumps(summary, indent=1))
    return text
