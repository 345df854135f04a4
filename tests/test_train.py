"""train.py end to end on a tiny Meta-layout checkpoint and a tiny offline-layout data dir
written here: runs, resume after SIGKILL, and one-line errors. No network."""

import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import benchmark
import data
import eval as evaluation
import llama
import prune

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    model_dir.mkdir()
    cfg = llama.CONFIGS["tiny"]
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(**cfg))
    torch.save(model.state_dict(), model_dir / "consolidated.00.pth")
    (model_dir / "params.json").write_text(json.dumps(dataclasses.asdict(llama.ModelArgs(**cfg))))
    # a byte-level tiktoken file: 256 single-byte tokens, then Llama 3's 256 specials = vocab 512
    (model_dir / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    data_dir = root / "data"
    held = benchmark.OFFLINE_HELD_OUT["nli"]
    meta = {t: {"category": "nli"} for t in held} | {f"train{i}": {"category": "cls"} for i in range(3)}
    data_dir.mkdir()
    (data_dir / "tasks.json").write_text(json.dumps({"tasks": meta}))

    def rows(task, n, tag):
        opts = ["yes", "no", "maybe"][: 2 + (n % 2)]
        return "".join(json.dumps({"task": task, "input": f"{tag} {i} {task[:6]}?", "output": opts[i % len(opts)],
                                   "options": opts}) + "\n" for i in range(n))

    for t in held:
        (data_dir / t).mkdir()
        for part, n in (("train", 12), ("dev", 6), ("test", 6)):
            (data_dir / t / f"{t}_16_100_{part}.jsonl").write_text(rows(t, n, part))
    for i in range(3):
        (data_dir / f"train{i}").mkdir()
        (data_dir / f"train{i}" / f"train{i}_16384_100_train.jsonl").write_text(rows(f"train{i}", 30, "q"))
    return model_dir, data_dir


def cmd(tiny, out, *extra, method="abmll"):
    model_dir, data_dir = tiny
    return [sys.executable, str(ROOT / "train.py"), "--method", method, "--split", "nli", "--model", str(model_dir),
            "--data-dir", str(data_dir), "--out", str(out), "--epochs", "3", "--max-query", "4",
            "--device", "cpu", *extra]


def run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kw)


def results(out, method="abmll"):
    d = Path(out) / "nli" / method / "seed0"
    final = json.loads((d / "final.json").read_text())
    final.pop("wall_s"), final.pop("test_time_s")
    hist = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    return final, [{k: v for k, v in h.items() if k not in ("time_s", "val_time_s")} for h in hist]


@pytest.mark.parametrize("method", ["pretrained", "pretrained-adapted", "lora", "structured", "reptile", "abmll"])
def test_every_method_runs_and_writes_the_run_layout(tiny, tmp_path, method):
    r = run(cmd(tiny, tmp_path, "--epochs", "2", "--prune", method=method))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test accuracy" in r.stdout
    final, hist = results(tmp_path, method)
    assert len(hist) == (1 if method.startswith("pretrained") else 2)
    assert final["n_test"] == 7 * 4 and 0 <= final["test_acc"] <= 1 and 0 <= final["test_ece"] <= 1
    assert final["test_chance"] == 0.5  # every tiny test example has two options
    assert set(final["pruning"]["acc"]) == {"0", "1", "10", "20", "30"}
    assert final["pruning"]["acc"]["0"] == final["test_acc"]
    d = tmp_path / "nli" / method / "seed0"
    rows = evaluation.read_predictions(d / "predictions" / "test-0.jsonl.gz")  # the file reproduces final.json
    assert {f"test_{k}": v for k, v in evaluation.metrics(rows).items() if k != "n"} == \
        {k: v for k, v in final.items() if k.startswith("test_") and k not in ("test_chance", "test_time_s")}
    assert len(rows) == final["n_test"] and (d / "predictions" / "val-0.jsonl.gz").exists()


def test_pruning_modes_adaptation_curve_and_diagnostics(tiny, tmp_path):
    r = run(cmd(tiny, tmp_path, "--epochs", "1", "--prune", "0", "20", "--prune-mode", *prune.PRUNE_MODES,
                "--adapt-curve", "0", "1", "3", "--eval-samples", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    final, hist = results(tmp_path)
    d = tmp_path / "nli" / "abmll" / "seed0" / "predictions"
    for mode in prune.PRUNE_MODES:
        by = final["pruning_modes"][mode]
        assert by["acc"]["0"] == final["test_acc"]
        rows = evaluation.read_predictions(d / f"test-{mode}-20.jsonl.gz")
        assert evaluation.metrics(rows)["acc"] == by["acc"]["20"] and len(rows) == final["n_test"]
    curve = final["adapt_curve"]
    assert curve["k"] == [0, 1, 3] and all(0 <= a <= 1 for a in curve["acc"])
    assert evaluation.metrics(evaluation.read_predictions(d / "adapt3-0.jsonl.gz"))["acc"] == curve["acc"][2]
    diag = hist[0]["diag"]
    assert set(diag["theta_logvar"]) == {"wq", "wv", "wo"} == set(diag["phi_logvar"]) == set(diag["noise_ratio"])
    lo, med, hi = diag["theta_logvar"]["wq"]
    assert lo <= med <= hi and med == pytest.approx(-20, abs=1)  # B starts at 0: log sigma^2 = log_c
    assert 0 < diag["noise_ratio"]["wq"] < 1e-2 and 0 <= diag["sample_vs_mean"] < 0.1


def test_resume_on_a_finished_run_retests_it_with_other_test_flags(tiny, tmp_path):
    """--prune / --prune-mode / --adapt-curve shape only the test: a finished run re-tested with them
    scores the same best epoch (its unpruned predictions byte for byte), records the new flags, and
    keeps no predictions file the new flags did not ask for; any other flag still may not change."""
    base = cmd(tiny, tmp_path, "--epochs", "2", method="reptile")
    assert run([*base, "--adapt-curve", "0", "2"]).returncode == 0
    d = tmp_path / "nli" / "reptile" / "seed0"
    before, speed = (d / "predictions" / "test-0.jsonl.gz").read_bytes(), (d / "speed.json").read_text()
    r = run([*base, "--resume", "--prune", "20", "--prune-mode", "activation", "adapted"])
    assert r.returncode == 0, r.stderr[-2000:]
    final, _ = results(tmp_path, "reptile")
    assert (d / "predictions" / "test-0.jsonl.gz").read_bytes() == before
    assert sorted(p.name for p in (d / "predictions").iterdir()) == [
        "test-0.jsonl.gz", "test-activation-20.jsonl.gz", "test-adapted-20.jsonl.gz", "val-0.jsonl.gz"]
    assert set(final["pruning_modes"]) == {"activation", "adapted"} and "adapt_curve" not in final
    config = json.loads((d / "config.json").read_text())
    assert config["prune"] == [20] and config["adapt_curve"] is None
    assert (d / "speed.json").read_text() == speed  # training's throughput, not the re-test's
    changed = run([*base, "--resume", "--prune", "20", "--lr", "1e-3"])
    assert changed.returncode != 0 and "--lr" in changed.stderr.strip().splitlines()[-1]


def test_pretrained_adapted_is_untrained_but_adapts(tiny, tmp_path):
    """A fresh LoRA (B = 0) adapted at test time only: its curve at k = 0 is Pretrained's zero-shot score."""
    for method in ("pretrained", "pretrained-adapted"):
        r = run(cmd(tiny, tmp_path, "--adapt-curve", "0", "2", method=method))
        assert r.returncode == 0, r.stderr[-2000:]
    zero, _ = results(tmp_path, "pretrained")
    adapted, hist = results(tmp_path, "pretrained-adapted")
    assert len(hist) == 1 and "adapt_curve" not in zero
    assert adapted["adapt_curve"]["acc"][0] == zero["test_acc"]
    assert not (tmp_path / "nli" / "pretrained-adapted" / "seed0" / "adapters.safetensors").exists()


OFFICIAL = ("--preset", "official", "--epochs", "3", "--tasks-per-epoch", "2", "--max-query", "4")


@pytest.mark.parametrize("method,extra", [("abmll", ()), ("structured", ()), ("abmll", OFFICIAL)])
def test_sigkill_mid_run_then_resume_ends_like_an_uninterrupted_run(tiny, tmp_path, method, extra):
    """ABMLL's noise RNG; a persistent optimizer; the authors' protocol (activation noise, MC KL, one inner
    AdamW carried across tasks in the checkpoint)."""
    def mk(tiny, out, *more, method):
        return cmd(tiny, out, *extra, *more, method=method)

    a, b = tmp_path / "a", tmp_path / "b"
    r = run(mk(tiny, a, method=method))
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(mk(tiny, b, method=method), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = b / "nli" / method / "seed0" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)  # after the first epoch's checkpoint, inside the second epoch
    p.wait()
    assert json.loads(state.read_text())["epoch"] < 3
    assert not (b / "nli" / method / "seed0" / "final.json").exists()
    again = run(mk(tiny, b, method=method))
    assert again.returncode != 0 and "--resume" in again.stderr  # never silently overwritten
    changed = run(mk(tiny, b, "--resume", "--lr", "1e-3", method=method))
    assert changed.returncode != 0 and "--lr" in changed.stderr.strip().splitlines()[-1]  # flags must match
    r = run(mk(tiny, b, "--resume", method=method))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr
    assert results(a, method) == results(b, method)


@pytest.mark.parametrize("extra,needle", [
    (["--method", "maml"], "--method"),
    (["--split", "nope"], "split"),
    (["--epochs", "0"], "--epochs"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--tasks-per-epoch", "0"], "--tasks-per-epoch"),
    (["--prune", "150"], "--prune"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--prune-mode", "neurons"], "--prune-mode"),
    (["--adapt-curve", "-1"], "--adapt-curve"),
    (["--targets", "wq,wx"], "--targets"),
    (["--noise", "space"], "--noise"),
    (["--kl", "exact"], "--kl"),
    (["--kl", "mc", "--noise", "weight"], "--kl mc"),
    (["--outer-opt", "sgd", "--inner-opt", "persistent"], "--outer-opt sgd"),
])
def test_bad_flags_end_in_one_line(tiny, tmp_path, extra, needle):
    r = run(cmd(tiny, tmp_path, *extra))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert needle in last and "Traceback" not in r.stderr


def test_missing_split_data_is_one_line(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    model_dir, _ = tiny
    r = run(cmd((model_dir, empty), tmp_path / "out"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "missing" in r.stderr.strip().splitlines()[-1]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    r = run(cmd(tiny, tmp_path, "--lr", "1e20", method="lora"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in last and "checkpoint" in last
    d = tmp_path / "nli" / "lora" / "seed0"
    assert not (d / "final.json").exists()
    if (d / "state.json").exists():  # whatever epoch it reached, its checkpoint is whole and finite
        state = json.loads((d / "state.json").read_text())
        from safetensors.torch import load_file

        assert all(torch.isfinite(v).all() for k, v in load_file(str(d / state["file"])).items() if k.startswith("adapter."))


def test_official_preset_records_the_authors_settings(tiny, tmp_path):
    r = run(cmd(tiny, tmp_path, *OFFICIAL[:2], "--epochs", "1", "--tasks-per-epoch", "2", "--max-query", "4"))
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((tmp_path / "nli" / "abmll" / "seed0" / "config.json").read_text())
    assert config["noise"] == "activation" and config["kl"] == "mc" and config["weight_decay"] == 0
    assert config["targets"] == ["wq", "wv", "wo", "w1", "w2", "w3"] and config["inner_opt"] == "persistent"
    assert (config["prompt"], config["eval_noise"], config["prior_weight"]) == ("official", "mean", "beta/M")
    assert (config["lr"], config["inner_lr"], config["outer_lr"], config["epochs"]) == (5e-5, 1e-5, 5e-5, 1)


def test_test_lr_and_max_held_out(tiny, tmp_path):
    """--test-lr moves test-time adaptation only (training and k = 0 alike); --max-held-out keeps the first tasks."""
    import train
    assert train.parse_args(["--inner-lr", "3e-5"]).test_lr == 3e-5  # default: the inner lr
    finals = {}
    for lr in ("1e-4", "1e-1"):
        out = tmp_path / lr
        r = run(cmd(tiny, out, "--epochs", "1", "--tasks-per-epoch", "1", "--max-held-out", "2", "--test-lr", lr,
                    "--adapt-curve", "0", "2", "--eval-noise", "mean"))
        assert r.returncode == 0, r.stderr[-2000:]
        finals[lr], hist = results(out)
        assert finals[lr]["n_test"] == 2 * 4
        assert json.loads((out / "nli" / "abmll" / "seed0" / "config.json").read_text())["test_lr"] == float(lr)
    pred = [tmp_path / lr / "nli" / "abmll" / "seed0" / "predictions" for lr in finals]
    curve = [[evaluation.read_predictions(p / f"adapt{k}-0.jsonl.gz") for k in (0, 2)] for p in pred]
    assert curve[0][0] == curve[1][0] and curve[0][1] != curve[1][1]
    assert {r["task"] for r in curve[0][0]} == set(benchmark.OFFLINE_HELD_OUT["nli"][:2])


def test_presets_set_learning_rates_unless_given():
    import abmll
    import train
    quick, paper = train.parse_args([]), train.parse_args(["--preset", "paper"])
    c = abmll.Config()
    assert (paper.lr, paper.inner_lr, paper.outer_lr) == (c.lr, c.inner_lr, c.outer_lr)  # Section 5.1.1
    assert (quick.lr, quick.inner_lr, quick.outer_lr) == pytest.approx((10 * c.lr, 10 * c.inner_lr, 10 * c.outer_lr))
    assert train.parse_args(["--inner-lr", "3e-5"]).inner_lr == 3e-5  # a flag wins over the preset


def test_outer_opt_sgd_is_plain_gradient_descent_on_theta(tiny):
    """--outer-opt sgd: theta's step is theta - lr grad of beta [KL + prior] (abmll's outer loss,
    whose gradient tests/test_abmll.py checks against torch.distributions); AdamW's would be
    ~lr sign(g). phi is not in the optimizer."""
    import abmll
    import train
    model_dir, data_dir = tiny
    args = train.parse_args(["--method", "abmll", "--model", str(model_dir), "--outer-opt", "sgd",
                             "--outer-lr", "0.5", "--beta", "1e-6", "--device", "cpu"])
    cfg = train.config(args)
    model, tok, opt = train.build(args, cfg)
    theta = abmll.param_groups(model)["theta"]
    assert cfg.outer_opt == "sgd" and type(opt) is torch.optim.SGD
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in theta.values()}
    with torch.no_grad():  # phi away from theta, so that the KL has a gradient
        for k, p in abmll.param_groups(model)["phi"].items():
            p.add_(0.01 * torch.randn_like(p))
    before = {k: p.detach().clone() for k, p in theta.items()}
    loss, _ = abmll.abmll_outer_loss(model, cfg)
    grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
    abmll.abmll_outer_step(model, opt, cfg)
    for k, p in theta.items():
        torch.testing.assert_close(p.detach(), before[k] - 0.5 * grads[k])
