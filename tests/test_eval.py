"""eval.py: ECE against torchmetrics and a closed form, the other metrics, the predictions files."""

import math
from pathlib import Path

import pytest
import torch

import eval as ev


# ----------------------------------------------------------------------------- ECE


def _edge_probs(n, C, dtype, g):
    """Rows whose top confidence is exactly a bin edge of torchmetrics' fp32 linspace (1.0
    included), a hair off one (fp64 only: rounds onto the edge in fp32), or anywhere."""
    edges = torch.linspace(0, 1, 16, dtype=torch.float32).to(dtype)
    top = edges[torch.randint(4, 16, (n,), generator=g)]  # >= 4/15 > 1/4: stays the top label
    if dtype == torch.float64:  # fp64 edges and just below them: both round onto the fp32 edge
        e64 = torch.linspace(0, 1, 16, dtype=dtype)[torch.randint(4, 16, (n,), generator=g)]
        top = torch.where(torch.rand(n, generator=g) < 0.4, e64 - 1e-12 * torch.randint(0, 2, (n,), generator=g), top)
    top = torch.where(torch.rand(n, generator=g) < 0.3, 0.3 + 0.7 * torch.rand(n, generator=g, dtype=dtype), top)
    probs = torch.rand(n, C, generator=g, dtype=dtype) * top[:, None] * 0.9
    probs[torch.arange(n), torch.randint(0, C, (n,), generator=g)] = top
    return probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ece_matches_torchmetrics(dtype):
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, C = int(torch.randint(1, 400, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
        probs = torch.softmax(3 * torch.randn(n, C, generator=g, dtype=dtype), dim=1)
        if trial % 2:  # half the trials: every confidence sits on a bin edge or at 1.0
            probs = _edge_probs(n, 4, dtype, g)
            C = 4
        labels = torch.randint(0, C, (n,), generator=g)
        want = tm.multiclass_calibration_error(probs, labels, num_classes=C, n_bins=15, norm="l1").item()
        got = ev.expected_calibration_error(probs, labels)
        assert got == pytest.approx(want, abs=1e-6), (trial, n, C)


def test_ece_closed_form_and_edges():
    # 2 bins [0, .5), [.5, 1) and the extra bin {1.0}:
    #   bin 0: conf .4 wrong                 -> |0 - .4| * 1   = .4
    #   bin 1: conf .5 right, .8 right       -> |1 - .65| * 2  = .7
    #   {1.0}: conf 1.0 wrong                -> |0 - 1| * 1    = 1
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [1.0, 0.0, 0.0], [0.8, 0.1, 0.1]])
    labels = torch.tensor([0, 1, 1, 0])
    assert ev.expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(2.1 / 4)
    # 15 bins: every confidence .9 lies in [13/15, 14/15); 3 of 4 right -> |.75 - .9|
    probs = torch.tensor([[0.9, 0.1]] * 4)
    assert ev.expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.15)
    assert ev.accuracy(probs, torch.tensor([0, 0, 0, 1])) == 0.75
    assert ev.nll(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(-(3 * math.log(0.9) + math.log(0.1)) / 4)


def test_ece_ragged_rows_and_bad_input():
    rows = [[0.7, 0.3], [0.2, 0.5, 0.3], [0.1, 0.1, 0.2, 0.6]]
    padded = torch.tensor([[0.7, 0.3, 0, 0], [0.2, 0.5, 0.3, 0], [0.1, 0.1, 0.2, 0.6]])
    labels = torch.tensor([0, 2, 3])
    assert ev.expected_calibration_error(rows, labels) == ev.expected_calibration_error(padded, labels)
    with pytest.raises(ValueError, match="probabilities"):
        ev.expected_calibration_error(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))


def test_reliability_diagram(tmp_path):
    pytest.importorskip("matplotlib")
    probs = torch.softmax(torch.randn(50, 4), dim=1)
    path = ev.reliability_diagram(probs, torch.randint(0, 4, (50,)), tmp_path / "rel.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_ece_matches_torchmetrics_per_example():
    tmc = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        probs4 = torch.softmax(3 * torch.randn(120, 4, generator=g, dtype=dtype), dim=1)
        probs4[:10] = _edge_probs(10, 4, dtype, g)  # on torchmetrics' bin edges and at 1.0
        probs4[10] = torch.tensor([1.0, 0, 0, 0])
        probs4[11] = torch.tensor([0.4, 0.4, 0.1, 0.1])  # a tie: the first letter is the prediction
        labels = torch.randint(0, 4, (120,), generator=g)
        labels[10:12] = torch.tensor([0, 1])
        ece = tmc.MulticlassCalibrationError(num_classes=4, n_bins=10, norm="l1")
        want = sum(ece(probs4[i:i + 1], labels[i:i + 1]).item() for i in range(120)) / 120
        assert ev.paper_ece(probs4, labels) == pytest.approx(want, abs=1e-7)
    # by hand: |.7 - 1| (right), |.4 - 0| (the tie goes to A, wrong), |1 - 1|
    probs4 = [[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0]]
    assert ev.paper_ece(probs4, [0, 1, 2]) == pytest.approx((0.3 + 0.4 + 0) / 3)
    with pytest.raises(ValueError, match="probs4"):
        ev.paper_ece([[0.5, 0.5]], [0])


def test_brier_nll_vocab_accuracy_closed_forms():
    probs = [[0.7, 0.2, 0.1], [0.5, 0.5], [0.1, 0.2, 0.3, 0.4]]  # ragged: 3, 2 and 4 options
    labels = [0, 1, 2]
    # (.3^2 + .2^2 + .1^2), (.5^2 + .5^2), (.1^2 + .2^2 + .7^2 + .4^2)
    assert ev.brier(probs, labels) == pytest.approx((0.14 + 0.5 + 0.70) / 3)
    assert ev.nll(probs, labels) == pytest.approx(-math.log(0.7 * 0.5 * 0.3) / 3)
    assert ev.brier([[1.0, 0.0]], [1]) == 2.0  # the largest possible
    assert ev.vocab_accuracy([65, 66, 1234, 67], [65, 67, 66, 67]) == 0.5  # a non-letter is wrong
    assert ev.vocab_accuracy(torch.tensor([3]), torch.tensor([3])) == 1.0
    with pytest.raises(ValueError, match="answer ids"):
        ev.vocab_accuracy([1, 2], [1])


def _row(task, i, label, probs, probs4=None, argmax=None):
    return {"task": task, "id": i, "label": label, "n_options": len(probs), "probs": probs,
            "probs4": probs4 or [0.25] * 4, "answer_id": 10 + label,
            "vocab_argmax": 10 + label if argmax is None else argmax}


def test_metrics_pooled_and_macro():
    rows = [_row("a", 0, 0, [0.9, 0.1]), _row("a", 1, 1, [0.6, 0.4], argmax=99),
            _row("a", 2, 1, [0.2, 0.8]), _row("b", 0, 2, [0.3, 0.3, 0.4], [0.1, 0.1, 0.7, 0.1])]
    m = ev.metrics(rows)
    names = ["acc", "ece", "nll", "brier", "vocab_acc", "paper_ece"]
    assert set(m) == {"n", *names, *(f"macro_{k}" for k in names)}
    assert m["n"] == 4 and m["acc"] == 0.75 and m["vocab_acc"] == 0.75
    assert m["macro_acc"] == m["macro_vocab_acc"] == pytest.approx((2 / 3 + 1) / 2)
    # paper ECE: task a, A-D uniform: the tie goes to A: right once (|.25 - 1|), wrong twice (.25)
    assert m["macro_paper_ece"] == pytest.approx(((0.75 + 0.25 + 0.25) / 3 + 0.3) / 2)
    assert m["paper_ece"] == pytest.approx((0.75 + 0.25 + 0.25 + 0.3) / 4)
    assert m["macro_nll"] == pytest.approx((-math.log(0.9 * 0.4 * 0.8) / 3 - math.log(0.4)) / 2)
    labels = [r["label"] for r in rows]
    assert m["ece"] == ev.expected_calibration_error([r["probs"] for r in rows], labels)
    with pytest.raises(ValueError, match="at least one"):
        ev.metrics([])


def test_predictions_files_reproduce_the_metrics_exactly(tmp_path):
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(200):
        k = 2 + i % 3
        logits = 4 * torch.randn(4, generator=g)  # fp32 logits, as scored, then float64 lists
        argmax = int(torch.randint(8, 14, (1,), generator=g))
        rows.append(_row(f"task{i % 4}", i // 4, i % k, logits[:k].double().softmax(0).tolist(),
                         logits.double().softmax(0).tolist(), argmax))
    path = ev.write_predictions(tmp_path / "run" / "predictions" / "test-0.jsonl.gz", rows)
    back = ev.read_predictions(path)
    assert back == rows
    assert ev.metrics(back) == ev.metrics(rows)  # bit for bit: final.json's numbers come back
