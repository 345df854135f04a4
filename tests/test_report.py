"""report.py and rundir.py: the tables and curves of `eval.py report`, and runs that do not fit."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import eval as ev
import report

ROOT = Path(__file__).resolve().parents[1]


ACC = {"pretrained": [0.50], "lora": [0.70, 0.72, 0.74], "abmll": [0.80, 0.82, 0.87]}
ECE = {"pretrained": [0.40], "lora": [0.30, 0.31, 0.35], "abmll": [0.20, 0.22, 0.21]}


def _write_run(root, split, method, seed, acc, ece, epochs=4, pruning=True):
    d = root / split / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"method": method, "split": split, "seed": seed, "epochs": epochs}))
    lines = [json.dumps({"epoch": e, "train_loss": 1.0, "val_acc": acc - 0.01 * (epochs - e), "val_ece": ece,
                         "val_nll": 1.0, "time_s": 30.0}) for e in range(1, epochs + 1)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    final = {"method": method, "split": split, "seed": seed, "best_epoch": epochs, "test_acc": acc,
             "test_ece": ece, "test_nll": 1.0, "n_test": 100}
    if pruning:
        final["pruning"] = {"mode": "activation", "acc": {str(p): acc - p / 1000 for p in (0, 1, 10, 20, 30)},
                            "ece": {str(p): ece + p / 1000 for p in (0, 1, 10, 20, 30)}}
    (d / "final.json").write_text(json.dumps(final))
    return d


def _fmt(xs, percent):
    m = statistics.mean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f}% ± {100 * se:.1f}%" if percent else f"{m:.3f} ± {se:.3f}"


def test_report_tables_and_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    root = tmp_path / "runs"
    for method in ACC:
        for seed, (a, e) in enumerate(zip(ACC[method], ECE[method])):
            _write_run(root, "nli", method, seed, a, e, epochs=1 if method == "pretrained" else 4)
    _write_run(root, "cls", "abmll", 0, 0.6, 0.25, pruning=False)
    (root / "cls" / "reptile" / "seed0").mkdir(parents=True)  # killed before the end: no final.json
    bad = _write_run(root, "cls", "lora", 0, 0.5, 0.3)
    (bad / "final.json").write_text('{"test_acc": 0.5, ')  # half written
    with open(root / "nli" / "lora" / "seed0" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 5, "val_a\n')
    (root / "nli" / "abmll" / "notes").mkdir()
    odd = _write_run(root, "cls", "structured", 0, 0.55, 0.3)
    final = json.loads((odd / "final.json").read_text())
    (odd / "final.json").write_text(json.dumps(final | {"pruning": {"acc": [0.5], "ece": {}}}))

    ev.main(["report", str(root)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("warning:")]) == 5, err
    assert "55.0% ± 0.0%" in out and "55.0% ± 0.0%" not in out[out.index("### Pruning"):]
    for method, name in (("pretrained", "Pretrained"), ("lora", "Regular LoRA"), ("abmll", "ABMLL")):
        row = next(ln for ln in out.splitlines() if ln.startswith(f"| {name} |") and "%" in ln)
        assert _fmt(ACC[method], True) in row
        row = next(ln for ln in out.splitlines() if ln.startswith(f"| {name} |") and "0." in ln and "%" not in ln)
        assert _fmt(ECE[method], False) in row
    assert "72.0% ± 1.2%" in out and "0.320 ± 0.015" in out and "50.0% ± 0.0%" in out  # by hand
    assert "| Method | cls | nli |" in out and "60.0% ± 0.0%" in out
    assert out.index("| Pretrained") < out.index("| Regular LoRA") < out.index("| ABMLL")
    # pruning: abmll at 30% = mean(acc) - 0.03
    assert _fmt([a - 0.03 for a in ACC["abmll"]], True) in out
    assert "| Method | 0% pruned | 1% pruned | 10% pruned | 20% pruned | 30% pruned |" in out
    assert "3 seeds, 4 ep, 2.0 min/run" in out and "1 seed, 1 ep, 0.5 min/run" in out
    report_dir = root / "report"
    assert (report_dir / "report.md").read_text() == out
    for split in ("nli", "cls"):
        assert (report_dir / f"curves_{split}.png").read_bytes()[:4] == b"\x89PNG"

    ev.main(["report", str(root)])  # the report directory inside the root is not read as a split
    assert capsys.readouterr().err.count("warning:") == 5


def test_report_chance_row(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, chance in ((0, 0.25), (1, 0.5)):
        for method in ("pretrained", "abmll"):
            d = _write_run(root, "nli", method, seed, 0.5, 0.1, pruning=False)
            final = json.loads((d / "final.json").read_text())
            (d / "final.json").write_text(json.dumps(final | {"test_chance": chance}))
    _write_run(root, "cls", "abmll", 0, 0.6, 0.2, pruning=False)  # an older run: no test_chance
    out = report.report(root)
    capsys.readouterr()
    accuracy = out[out.index("### Test accuracy"):out.index("### Test ECE")]
    assert "| Chance (1 / options) | — | 37.5% |" in accuracy  # mean over the seeds' test sets
    assert accuracy.strip().endswith("37.5% |")


def test_moving_average():
    assert report.moving_average([3, 6, 9, 0]) == [3, 4.5, 6, 5]


def test_report_cli_errors(tmp_path, capsys):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "report", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and r.stderr.strip() == f"eval.py: RUN_ROOT {tmp_path / 'missing'} is not a directory"
    (tmp_path / "nli" / "lora" / "seed0").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no finished runs"):
        ev.main(["report", str(tmp_path)])


def _extend(d, **keys):
    final = json.loads((d / "final.json").read_text())
    (d / "final.json").write_text(json.dumps(final | keys))


def test_report_new_metrics_adaptation_and_diagnostics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    root = tmp_path / "runs"
    for seed, x in enumerate((0.2, 0.3)):
        d = _write_run(root, "nli", "abmll", seed, 0.8, 0.1, pruning=False)
        _extend(d, test_paper_ece=x, test_vocab_acc=x + 0.5, test_brier=x / 2,
                adapt_curve={"k": [0, 1, 5], "acc": [0.5, 0.6 + x, 0.7], "ece": [0.3, 0.2, 0.1]},
                pruning_modes={mode: {"acc": {"0": 0.8, "10": x}, "ece": {"0": 0.1, "10": 0.2}}
                               for mode in ("adapted", "channel")})
        lines = [json.dumps({"epoch": e, "val_acc": 0.5, "val_ece": 0.1, "time_s": 1.0,
                             "diag": {"theta_logvar": {"wq": [-21, -20 + e, -19 + e],
                                                       "wv": [-22, -21, -20]},
                                      "noise_ratio": {"wq": 1e-4}, "sample_vs_mean": 0.01}})
                 for e in (1, 2, 3)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _write_run(root, "nli", "lora", 0, 0.7, 0.2)  # an older run: none of the new keys
    out = report.report(root)
    assert capsys.readouterr().err == ""
    section = lambda title: out[out.index(f"### {title}"):].split("\n\n")[1]  # noqa: E731
    assert "| ABMLL | 0.250 ± 0.050 |" in section("Test paper ECE (the authors' per-example gap)")
    assert "| ABMLL | 75.0% ± 5.0% |" in section("Test accuracy over the whole vocabulary")
    assert "| ABMLL | 0.125 ± 0.025 |" in section("Test Brier score")
    assert "Regular LoRA" not in section("Test Brier score")
    for mode in ("adapted", "channel"):
        table = section(f"Pruning, nli, {mode} mode: test accuracy")
        assert "| ABMLL | 80.0% ± 0.0% | 25.0% ± 5.0% |" in table
    table = section("Pruning, nli, activation mode: test accuracy")  # the older "pruning" key
    assert "| Regular LoRA | 70.0% ± 0.0% | 69.9% ± 0.0%" in table
    adapt = section("Test-time adaptation, nli: test accuracy after k steps")
    assert "| Method | k = 0 | k = 1 | k = 5 |" in adapt
    assert "| ABMLL | 50.0% ± 0.0% | 85.0% ± 5.0% | 70.0% ± 0.0% |" in adapt
    for png in ("curves_nli.png", "adapt_nli.png", "diag_nli.png"):
        assert (root / "report" / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in out


def test_report_survives_bad_bytes_and_out_of_range_values(tmp_path, capsys):
    root = tmp_path / "runs"
    d = _write_run(root, "nli", "abmll", 0, 0.8, 0.1)
    with open(d / "metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 5, "val_acc": 0.5, "val_ece": 0.1, "note": "\xff"}\n')
        f.write(b'{"epoch": 6, "val_acc": 0.5, "val_ece": 0.1}\n')
    _extend(d, test_brier=3.5, test_macro_nll=-1.0, test_vocab_acc=0.75)
    odd = _write_run(root, "nli", "lora", 0, 0.7, 0.2)
    _extend(odd, test_acc=7.5)  # written in percent by mistake: would show as 750.0%
    out = report.report(root)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = sorted(err.splitlines())
    assert len(warnings) == 4, err
    final = d / "final.json"
    assert warnings[0].startswith(f"warning: {final}: test_brier = 3.5 is not a number in [0, 2]")
    assert warnings[1].startswith(f"warning: {final}: test_macro_nll = -1.0 is not a number in [0, inf]")
    assert warnings[2].startswith(f"warning: {d / 'metrics.jsonl'}:5: bad line")
    assert warnings[3] == f"warning: {odd / 'final.json'}: test_acc = 7.5 is not a number in [0, 1], skipped"
    assert "Regular LoRA" not in out and "750" not in out and "Brier" not in out
    assert "| ABMLL | 75.0% ± 0.0% |" in out  # the run stays, with its good keys
    assert "1 seed, 5 ep" in out  # 4 epochs + line 6; line 5 (the stray byte) is left out


def test_report_rows_for_a_methods_variants(tmp_path, capsys):
    """A directory {method}-{label} is that method run with other settings: a row of its own;
    a directory naming another method, or the method without the dash, is still skipped."""
    root = tmp_path / "runs"
    _write_run(root, "diag", "abmll", 0, 0.60, 0.1)
    for label, acc in (("abmll-beta1e-16", 0.30), ("abmll-weight-beta1", 0.25)):
        d = _write_run(root, "diag", label, 0, acc, 0.2)
        _extend(d, method="abmll")  # what train.py writes: the method, not the directory
    for wrong in ("lora", "abmllbeta1", "reptile-abmll"):
        _extend(_write_run(root, "diag", wrong, 0, 0.9, 0.1), method="abmll")
    out = report.report(root, tmp_path / "rep")
    err = capsys.readouterr().err
    table = out[out.index("### Test accuracy"):].split("\n\n")[1]
    assert "| ABMLL | 60.0% ± 0.0% |" in table
    assert "| abmll-beta1e-16 | 30.0% ± 0.0% |" in table and "| abmll-weight-beta1 | 25.0% ± 0.0% |" in table
    assert "90.0%" not in out
    assert sorted(ln.split("directory says ")[1] for ln in err.splitlines()) == \
        ["'abmllbeta1', skipped", "'lora', skipped", "'reptile-abmll', skipped"], err
