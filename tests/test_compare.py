"""compare.py: predictions files, the paired bootstrap, and `eval.py compare`."""

import gzip
import json

import pytest
import torch

import compare as cp
import eval as ev


def _rows(n, seed, n_tasks=3, correct=None):
    """n prediction rows with random float64 probabilities; correct (N,) bool forces the argmax."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        k = 2 + i % 3
        probs = torch.softmax(2 * torch.randn(k, generator=g, dtype=torch.float64), 0)
        probs4 = torch.softmax(2 * torch.randn(4, generator=g, dtype=torch.float64), 0)
        label = i * 7 % k
        if correct is not None:  # put the top probability on the label, or on the next option
            top = label if correct[i] else (label + 1) % k
            probs = torch.full((k,), 0.2 / (k - 1), dtype=torch.float64)
            probs[top] = 0.8
        rows.append({"task": f"task{i % n_tasks}", "id": i // n_tasks, "label": label,
                     "n_options": k, "probs": probs.tolist(), "probs4": probs4.tolist(),
                     "answer_id": 300 + label,
                     "vocab_argmax": 300 + int(probs.argmax()) if i % 5 else 17})  # 17: no letter
    return rows


# ----------------------------------------------------------------------------- files


def test_predictions_file_errors(tmp_path):
    rows = _rows(20, 0)
    path = cp.write_predictions(tmp_path / "p" / "test-0.jsonl.gz", rows)
    assert cp.read_predictions(path) == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["test-0.jsonl.gz"]  # no .tmp left
    assert path.read_bytes() == cp.write_predictions(tmp_path / "again.jsonl.gz", rows).read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(path.read_bytes()[:-30])
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps(rows[0]))
    bad_json = tmp_path / "bad.jsonl.gz"
    bad_json.write_bytes(gzip.compress(b'{"task": "a"\n'))
    short = tmp_path / "short.jsonl.gz"
    short.write_bytes(gzip.compress((json.dumps(rows[0] | {"probs4": [1.0]}) + "\n").encode()))
    cases = ((cut, "gzip"), (plain, "gzip"), (bad_json, ":1: not a JSON"), (short, ":1: probs"))
    for bad, what in cases:
        with pytest.raises(ValueError) as e:
            cp.read_predictions(bad)
        msg = str(e.value)
        assert msg.startswith(str(bad)) and what in msg and "\n" not in msg


# ----------------------------------------------------------------------------- bootstrap


def test_resampled_metrics_match_eval():
    rows = _rows(300, 1)
    rows[0]["probs"] = [1.0, 0.0]  # confidence exactly 1.0: the ECE's extra bin
    rows[1]["probs"] = [0.4, 0.4, 0.2]  # a tie: torch.max takes the first
    rows[2]["probs4"] = [0.3, 0.3, 0.2, 0.2]
    _, stats = cp.example_stats(rows)
    want = ev.metrics(rows)
    for m in cp.METRICS:
        assert cp.value(stats, m) == pytest.approx(want[m], abs=1e-12), m


@pytest.mark.parametrize("metric", list(cp.METRICS))
def test_identical_sets_give_a_zero_interval(metric):
    a = _rows(200, 2)
    b = [dict(r) for r in reversed(a)]  # same examples in another order: paired by (task, id)
    assert cp.paired_bootstrap(a, b, metric, resamples=500) == (0.0, 0.0, 0.0)
    pairs = [(a, b), (a[:50], b[-50:])]
    assert cp.pooled_bootstrap(pairs, metric, resamples=500) == (0.0, 0.0, 0.0)


def _binary(correct):
    """Two-option rows, right where correct is True."""
    return [{"task": "t", "id": i, "label": 0, "n_options": 2,
             "probs": [0.7, 0.3] if c else [0.3, 0.7], "probs4": [0.7, 0.3, 0.0, 0.0],
             "answer_id": 1, "vocab_argmax": 1} for i, c in enumerate(correct)]


@pytest.fixture
def one_thread():
    # 200 small bootstraps: on a busy machine, waking a second thread costs more than the work
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_interval_covers_a_known_gap(one_thread):
    # A right with probability 0.6, B with 0.5, independently: the true gap is 0.1. 1000 resamples
    # (not 2000) keep the 100 trials at about a second; the percentile interval is as good.
    covered = 0
    for trial in range(100):
        g = torch.Generator().manual_seed(trial)
        a = _binary((torch.rand(500, generator=g) < 0.6).tolist())
        b = _binary((torch.rand(500, generator=g) < 0.5).tolist())
        diff, lo, hi = cp.paired_bootstrap(a, b, "acc", resamples=1000, seed=trial)
        assert lo <= diff <= hi
        covered += lo <= 0.1 <= hi
    assert covered >= 90, covered


def test_pooled_bootstrap_averages_seeds():
    pairs = [(_rows(120, 3), _rows(120, 4)), (_rows(60, 5), _rows(60, 6))]
    for a, b in pairs:
        for ra, rb in zip(a, b):  # the same examples, other predictions
            rb.update(label=ra["label"], answer_id=ra["answer_id"])
    diffs = [cp.paired_bootstrap(a, b, "ece", 300)[0] for a, b in pairs]
    diff, lo, hi = cp.pooled_bootstrap(pairs, "ece", 300, seed=1)
    assert diff == pytest.approx(sum(diffs) / 2, abs=1e-15) and lo < diff < hi
    assert cp.pooled_bootstrap(pairs, "ece", 300, seed=1) == (diff, lo, hi)  # seeded
    assert cp.pooled_bootstrap(pairs, "ece", 300, seed=2)[1:] != (lo, hi)
    with pytest.raises(ValueError, match="different examples"):
        cp.paired_bootstrap(pairs[0][0], pairs[1][1], "acc")


# ----------------------------------------------------------------------------- the command


def _write(root, method, seed, rows, split="nli", name="test-0"):
    path = root / split / method / f"seed{seed}" / "predictions" / f"{name}.jsonl.gz"
    return cp.write_predictions(path, rows)


def test_compare_command(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        best = torch.rand(400, generator=g) < 0.8
        _write(root, "abmll", seed, _rows(400, 0, correct=best))
        _write(root, "lora", seed, _rows(400, 0, correct=best))  # the same predictions: a tie
        _write(root, "pretrained", seed, _rows(400, 0, correct=torch.rand(400, generator=g) < 0.3))
    _write(root, "reptile", 0, _rows(400, 0), name="val-0")  # no test file
    ev.main(["compare", str(root), "--split", "nli", "--resamples", "300"])
    out = capsys.readouterr().out
    assert (root / "report" / "compare.md").read_text() == out
    acc = out[out.index("### Accuracy"):out.index("### ECE")]
    assert "| **ABMLL** | 2 | **" in acc and "| best |" in acc
    assert "| **Regular LoRA** | 2 | **" in acc and "+0.0 [+0.0, +0.0]" in acc
    assert "| Pretrained | 2 | " in acc and "Reptile" not in out
    assert out.index("| **Regular LoRA**") < out.index("| **ABMLL**")  # the paper's row order
    summary = json.loads((root / "report" / "compare.json").read_text())
    res = summary["metrics"]["acc"]
    assert res["best"] in ("abmll", "lora")
    assert res["bold"] == {"pretrained": False, "lora": True, "abmll": True}
    d = res["vs_best"]["pretrained"]
    assert d["hi"] < 0 and d["seeds"] == [0, 1]
    per_seed = res["per_seed"]
    assert d["diff"] == pytest.approx(sum(per_seed["pretrained"][s] - per_seed["abmll"][s]
                                          for s in ("0", "1")) / 2)
    assert set(summary["metrics"]) == {"acc", "ece", "paper_ece"}


def test_compare_user_errors(tmp_path):
    root = tmp_path / "runs"
    a = _write(root, "abmll", 0, _rows(50, 0))
    _write(root, "lora", 1, _rows(49, 0))  # another seed: never paired with seed 0
    _write(root, "lora", 0, _rows(50, 1))
    ev.main(["compare", str(root), "--split", "nli", "--resamples", "10", "--out", str(tmp_path)])
    rows = _rows(50, 0)
    rows[3]["label"] = (rows[3]["label"] + 1) % rows[3]["n_options"]
    b = _write(root, "lora", 0, rows)
    cases = [(["--split", "nli"], f"eval.py: {a} and {b} hold different examples"),
             (["--split", "cls"], "eval.py: --split cls: no directory"),
             (["--split", "nli", "--prune", "10"], "eval.py: no predictions files"),
             (["--split", "nli", "--resamples", "0"], "eval.py: --resamples")]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(["compare", str(root), *args])
        assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)
