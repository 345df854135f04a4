"""eval.py: ECE against torchmetrics and a closed form, the pruning context, the reports."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import abmll
import eval as ev
from llama import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------- pruning


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(ModelArgs.from_name("tiny")).eval()


def _tokens():
    return torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    assert all(not layer._forward_hooks for layer in model.layers)


@pytest.mark.parametrize("p,k", [(1, 1), (10, 6), (20, 13), (30, 19)])  # round(p% of dim=64), half up
def test_activation_pruning_zeroes_smallest(model, p, k):
    x, snap = _tokens(), _snapshot(model)
    with torch.no_grad():
        ref = model(x)
    raw, cut = [], []
    for layer in model.layers:  # registered before pruned(): sees the block's own output
        layer.register_forward_hook(lambda m, a, o: raw.append(o.clone()))
    with ev.pruned(model, p), torch.no_grad():
        for layer in model.layers:  # registered after: sees what the next block receives
            layer.register_forward_hook(lambda m, a, o: cut.append(o.clone()))
        out = model(x)
    assert len(raw) == len(cut) == len(model.layers)
    for r, c in zip(raw, cut):
        zero = c == 0
        assert (zero.sum(-1) == k).all()
        assert torch.equal(c[~zero], r[~zero])  # the rest untouched
        a = r.abs()
        assert (a.masked_fill(~zero, -1).amax(-1) <= a.masked_fill(zero, math.inf).amin(-1)).all()
    assert not torch.allclose(out, ref)
    assert all(len(layer._forward_hooks) == 2 for layer in model.layers)  # pruned()'s own hook is gone
    for layer in model.layers:
        layer._forward_hooks.clear()
    _assert_same(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("mode", ["activation", "weight"])
def test_zero_percent_is_a_noop(model, mode):
    x, snap = _tokens(), _snapshot(model)
    with torch.no_grad():
        ref = model(x)
        with ev.pruned(model, 0, mode):
            assert all(not layer._forward_hooks for layer in model.layers)
            assert torch.equal(model(x), ref)
    _assert_same(model, snap)


def test_weight_pruning_and_restore(model):
    x, snap = _tokens(), _snapshot(model)
    with torch.no_grad():
        ref = model(x)
        with ev.pruned(model, 20, "weight"):
            linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
            assert len(linears) == 7 * len(model.layers)
            for m in linears:
                w, w0 = m.weight.flatten(), None
                n = int(0.2 * w.numel() + 0.5)
                assert (w == 0).sum() == n
                name = next(k for k, v in model.named_parameters() if v is m.weight)
                w0 = snap[name].flatten().abs()
                assert w0[w == 0].max() <= w0[w != 0].min()  # the smallest |w| went
            assert torch.equal(model.tok_embeddings.weight, snap["tok_embeddings.weight"])
            assert not torch.allclose(model(x), ref)
        _assert_same(model, snap)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("method", ["lora", "abmll"])
def test_weight_pruning_merges_adapters_and_restores_exactly(model, method):
    abmll.inject(model, method)
    g = torch.Generator().manual_seed(2)
    mean_path = {"lora": ("lora_B", "lora_A"), "abmll": ("phi_mean_B", "phi_mean_A")}[method]
    adapters = [m for m in model.modules() if hasattr(m, mean_path[0])]
    for m in adapters:  # B = 0 at init would make merging a no-op: give the adapters a mean
        getattr(m, mean_path[0]).data.normal_(0, 0.5, generator=g)
    merged = {m: m.weight + m.scaling * getattr(m, mean_path[0]) @ getattr(m, mean_path[1]) for m in adapters}
    x, snap = _tokens(), _snapshot(model)
    torch.manual_seed(3)  # abmll draws its weight noise from the global generator
    with torch.no_grad():
        ref = model(x)
        with ev.pruned(model, 30, "weight"):
            for m in adapters:
                w, want = m.weight.flatten(), merged[m].flatten()
                zero = w == 0
                assert zero.sum() == int(0.3 * w.numel() + 0.5)
                assert torch.equal(w[~zero], want[~zero])  # W0 + s B A, pruned
                assert want.abs()[zero].max() <= want.abs()[~zero].min()
                assert (getattr(m, mean_path[0]) == 0).all()
                xs = torch.randn(3, w.numel() // m.weight.shape[0], generator=g)
                if method == "lora":  # the module computes x (pruned merged weight)^T and nothing else
                    assert torch.equal(m(xs), xs @ m.weight.T)
            torch.manual_seed(3)
            assert not torch.allclose(model(x), ref)
        _assert_same(model, snap)
        torch.manual_seed(3)
        assert torch.equal(model(x), ref)


def test_pruning_restores_after_an_error(model):
    snap = _snapshot(model)
    for mode in ("activation", "weight"):
        with pytest.raises(RuntimeError, match="boom"), ev.pruned(model, 10, mode):
            raise RuntimeError("boom")
        _assert_same(model, snap)
    with pytest.raises(ValueError, match="mode"), ev.pruned(model, 10, "neurons"):
        pass


def test_pruning_report_format():
    probs, labels = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0])
    rep = ev.pruning_report({0: (probs, labels), 10: (probs, labels)}, "activation")
    assert rep == {"mode": "activation", "acc": {"0": 0.5, "10": 0.5},
                   "ece": {"0": pytest.approx(0.45), "10": pytest.approx(0.45)}}  # (.1 + .8) / 2


# ----------------------------------------------------------------------------- reports

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
    out = ev.report(root)
    capsys.readouterr()
    accuracy = out[out.index("### Test accuracy"):out.index("### Test ECE")]
    assert "| Chance (1 / options) | — | 37.5% |" in accuracy  # mean over the seeds' test sets
    assert accuracy.strip().endswith("37.5% |")


def test_moving_average():
    assert ev.moving_average([3, 6, 9, 0]) == [3, 4.5, 6, 5]


def test_report_cli_errors(tmp_path, capsys):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "report", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and r.stderr.strip() == f"eval.py: RUN_ROOT {tmp_path / 'missing'} is not a directory"
    (tmp_path / "nli" / "lora" / "seed0").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no finished runs"):
        ev.main(["report", str(tmp_path)])


# ----------------------------------------------------------------------------- more metrics


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


# ----------------------------------------------------------------------------- more pruning


@pytest.mark.parametrize("method,p", [("lora", 10), ("abmll", 30)])
def test_adapted_pruning_zeroes_smallest_outputs_per_token(model, method, p):
    abmll.inject(model, method)
    kinds = (abmll.LoRALinear, abmll.BayesLoRALinear)
    adapted = [m for m in model.modules() if isinstance(m, kinds)]
    assert len(adapted) == 3 * len(model.layers)
    x, snap = _tokens(), _snapshot(model)
    raw, cut = [], []
    for m in adapted:  # before pruned(): the layer's own output; after: what the model goes on with
        m.register_forward_hook(lambda mod, a, o: raw.append(o.clone()))
    with ev.pruned(model, p, "adapted"), torch.no_grad():
        for m in adapted:
            m.register_forward_hook(lambda mod, a, o: cut.append(o.clone()))
        model(x)
    assert len(raw) == len(cut) == len(adapted)
    for r, c in zip(raw, cut):
        zero = c == 0
        assert (zero.sum(-1) == int(p * c.shape[-1] / 100 + 0.5)).all()  # wq 64, wv 32 wide
        assert torch.equal(c[~zero], r[~zero])
        a = r.abs()
        assert (a.masked_fill(~zero, -1).amax(-1) <= a.masked_fill(zero, math.inf).amin(-1)).all()
    assert all(len(m._forward_hooks) == 2 for m in adapted)  # pruned()'s own hook is gone
    for m in adapted:
        m._forward_hooks.clear()
    _assert_same(model, snap)


def test_pruning_mode_errors(model):
    with pytest.raises(ValueError, match="no adapted layers"), ev.pruned(model, 10, "adapted"):
        pass
    with pytest.raises(ValueError, match="calib"), ev.pruned(model, 10, "channel"):
        pass
    with pytest.raises(ValueError, match="activation, weight, adapted, channel"):
        with ev.pruned(model, 10, "x"):
            pass
    assert ev.PRUNE_MODES == ("activation", "weight", "adapted", "channel")


def _calib():
    """Two right-padded batches: a row's tokens after answer_pos + 1 are padding (id 0)."""
    g = torch.Generator().manual_seed(6)
    batches = []
    for pos in ([5, 2], [3, 6, 4]):
        tokens = torch.randint(1, 512, (len(pos), 9), generator=g)
        pos = torch.tensor(pos)
        tokens[torch.arange(9) > pos[:, None] + 1] = 0
        batches.append({"tokens": tokens, "answer_pos": pos})
    return batches


@pytest.mark.parametrize("p", [10, 30])
def test_channel_pruning_zeroes_the_quietest_channels(model, p):
    with torch.no_grad():  # loud padding: counted by mistake, it would change the ranking
        model.tok_embeddings.weight[0] *= 300
    calib, x, snap = _calib(), _tokens(), _snapshot(model)
    total = [torch.zeros(64, dtype=torch.float64) for _ in model.layers]
    count = [0] * len(model.layers)
    for batch in calib:  # the reference ranking: its own hooks, its own mask
        outs = []
        handles = [la.register_forward_hook(lambda m, a, o: outs.append(o)) for la in model.layers]
        with torch.no_grad():
            model(batch["tokens"], logits_at=batch["answer_pos"][:, None])
        for h in handles:
            h.remove()
        for i, o in enumerate(outs):
            # (T_b, dim) real tokens of row b; the last block ran at answer_pos only: (1, dim)
            rows = [o[b, :batch["answer_pos"][b] + 2] if o.shape[1] > 1 else o[b] for b in range(len(o))]
            total[i] += torch.cat(rows).abs().double().sum(0)
            count[i] += sum(len(r) for r in rows)
    k = int(p * 64 / 100 + 0.5)
    want = [set((t / c).argsort()[:k].tolist()) for t, c in zip(total, count)]
    cut = []
    with ev.pruned(model, p, "channel", calib), torch.no_grad():
        for layer in model.layers:
            layer.register_forward_hook(lambda m, a, o: cut.append(o.clone()))
        model(x)
    for c, w in zip(cut, want):
        dead = (c == 0).all(dim=(0, 1))  # (dim,): zero at every token
        assert set(dead.nonzero()[:, 0].tolist()) == w
    for layer in model.layers:
        layer._forward_hooks.clear()
    _assert_same(model, snap)


# ----------------------------------------------------------------------------- more reports


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
    out = ev.report(root)
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
    out = ev.report(root)
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
