"""--meta-batch and torchrun: two gloo processes on the tiny model (test_train's fixture) compute what one
process computes with the same flags (adapters, every prediction row, the metrics), --fsdp included; the
meta-batch's updates are the mean of the tasks' own; one-line errors. No network."""

import argparse
import copy
import dataclasses
import json
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

import abmll
import eval as evaluation
import llama
import ranks
import train
from test_train import cmd, run, tiny  # noqa: F401 (tiny is a fixture)

# 3 training tasks in the fixture: meta-batches of 2 and 1, so the second leaves rank 1 without a task
FLAGS = ("--epochs", "1", "--tasks-per-epoch", "4", "--meta-batch", "2", "--max-query", "2")


def torchrun(args, procs=2):
    """`args` (python train.py ...) under torchrun: `procs` gloo processes on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run([args[0], "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
                "127.0.0.1", "--master-port", str(port), *args[1:]])


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):  # noqa: F811
    """runs(method, *flags, procs=1) -> the run directory, each command run once per module."""
    done = {}

    def get(method, *extra, procs=1):
        key = (method, extra, procs)
        if key not in done:
            out = tmp_path_factory.mktemp(f"{method}-{procs}")
            args = cmd(tiny, out, *FLAGS, *extra, method=method)
            r = run(args) if procs == 1 else torchrun(args, procs)
            assert r.returncode == 0, r.stderr[-3000:]
            done[key] = out / "nli" / method / "seed0"
        return done[key]
    return get


def max_diff(a, b):
    a, b = (load_file(str(d / "adapters.safetensors")) for d in (a, b))
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def outputs(d):
    """final.json, metrics.jsonl and the prediction rows, without the timings."""
    final = {k: v for k, v in json.loads((d / "final.json").read_text()).items() if not k.endswith("_s")}
    hist = [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
            for line in (d / "metrics.jsonl").read_text().splitlines()]
    rows = {p.name: evaluation.read_predictions(p) for p in sorted((d / "predictions").iterdir())}
    return final, hist, rows


def assert_same_run(one, two):
    assert max_diff(one, two) <= 1e-5
    (f1, h1, r1), (f2, h2, r2) = outputs(one), outputs(two)
    assert f1 == f2 and h1 == h2  # test and validation metrics, best epoch, train loss
    assert set(r1) == {"test-0.jsonl.gz", "val-0.jsonl.gz"} and r1 == r2  # rows gathered from both ranks


@pytest.mark.parametrize("method", ["abmll", "reptile", "lora"])
def test_two_processes_compute_what_one_computes(runs, method):
    assert_same_run(runs(method), runs(method, procs=2))


def test_fsdp_shards_the_base_and_computes_the_same(runs):
    """FSDP2 on gloo: sharded forwards, FOMAML's query term and activation noise's outer forward included."""
    extra = ("--tasks-per-epoch", "2", "--outer-grad", "fo", "--noise", "activation")
    assert_same_run(runs("abmll", *extra), runs("abmll", *extra, "--fsdp", procs=2))


def test_fsdp_with_a_rank_left_idle_is_one_line(tiny, tmp_path, monkeypatch):  # noqa: F811
    """Sharded forwards run in lockstep: 3 tasks in meta-batches of 2 leave one for 2 ranks. Checked before
    anything is sharded, so this rank's view of 2 ranks is enough (no process group)."""
    monkeypatch.setattr(ranks, "DIST", ranks.Ranks(rank=0, world=2, fsdp=True))
    monkeypatch.setattr(ranks.Ranks, "barrier", lambda self: None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = train.parse_args(cmd(tiny, tmp_path, *FLAGS)[2:])
    with pytest.raises(train.RunError, match="--fsdp: every rank must run as many tasks .* leave 1 for 2 ranks"):
        train.run(args)


def test_meta_batch_2_on_one_process_differs_from_1(runs):
    """One theta step per two tasks is not one per task."""
    assert max_diff(runs("abmll"), runs("abmll", "--meta-batch", "1")) > 1e-6


def test_a_nan_on_the_ranks_stops_both_with_one_line(tiny, tmp_path):  # noqa: F811
    r = torchrun(cmd(tiny, tmp_path, *FLAGS, "--lr", "1e20", method="lora"))
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and lines and all("non-finite loss" in line for line in lines)
    assert not (tmp_path / "nli" / "lora" / "seed0" / "state.json").exists()


# -----------------------------------------------------------------------------
# a meta-batch's update is the mean of its tasks' own


CFG = abmll.Config(inner_lr=1e-3, outer_lr=1e-3, beta=1e-4, reptile_eps=0.5)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, 512, (2, 12), generator=g), "answer_pos": torch.randint(6, 12, (2,), generator=g),
            "answer_ids": torch.randint(0, 512, (2,), generator=g)}


def model(method):
    torch.manual_seed(0)
    m = abmll.inject(llama.Transformer(llama.ModelArgs.from_name("tiny")), method)
    with torch.no_grad():
        for p in abmll.adapter_params(m).values():
            p.normal_(0, 0.05)
    for layer in abmll.bayes_layers(m):
        layer.reset_phi()
    return m


@pytest.mark.parametrize("outer_grad", ["kl", "fo"])
def test_abmll_task_grads_is_the_outer_steps_gradient(outer_grad):
    """abmll_task with SGD(lr 1) on theta moves theta by exactly the gradient abmll_task_grads returns."""
    cfg, batches, query = dataclasses.replace(CFG, outer_grad=outer_grad), [batch(1), batch(2)], batch(3)
    a = model("abmll")
    b = copy.deepcopy(a)
    theta = {k: p.detach().clone() for k, p in abmll.param_groups(b)["theta"].items()}
    torch.manual_seed(7)
    grads, inner = abmll.abmll_task_grads(a, batches, cfg, query)
    torch.manual_seed(7)
    sgd = torch.optim.SGD(abmll.param_groups(b)["theta"].values(), lr=1.0)
    out = abmll.abmll_task(b, sgd, batches, cfg, query=query)
    assert inner == out["inner"]
    names = {p: k for k, p in abmll.param_groups(a)["theta"].items()}
    assert {names[p] for p in grads} == set(theta)
    for p, g in grads.items():
        assert torch.equal(theta[names[p]] - g, abmll.param_groups(b)["theta"][names[p]])
    for m in abmll.bayes_layers(a):  # phi <- theta, theta itself untouched
        assert all(torch.equal(p, t) for p, t in zip(m.pairs("phi"), m.pairs("theta")))
    assert all(torch.equal(theta[k], p) for k, p in abmll.param_groups(a)["theta"].items())


def test_reptile_delta_is_the_task_step_and_puts_theta_back():
    """reptile_task with eps = 1 lands on theta + reptile_delta; the delta leaves theta where it was."""
    batches = [batch(1), batch(2)]
    a = model("lora")
    b = copy.deepcopy(a)
    theta = {k: p.detach().clone() for k, p in abmll.param_groups(a)["lora"].items()}
    delta, losses = abmll.reptile_delta(a, batches, CFG)
    assert losses == abmll.reptile_task(b, batches, dataclasses.replace(CFG, reptile_eps=1.0))
    for k, p in abmll.param_groups(a)["lora"].items():
        assert torch.equal(p, theta[k])
        after = abmll.param_groups(b)["lora"][k]
        torch.testing.assert_close(theta[k] + delta[k], after, rtol=0, atol=1e-7)  # lerp rounds otherwise


@pytest.mark.parametrize("method", ["abmll", "reptile", "lora"])
def test_one_update_per_meta_batch_from_the_mean_of_its_tasks(method):
    """train.py's meta-batch of 2 on one process: ABMLL one AdamW step on theta with the mean of the tasks'
    outer gradients, phi <- theta; Reptile theta + eps mean(delta); LoRA step k on the mean of the batch-k
    gradients. The reference applies the tasks' own updates, computed by hand, to a copy."""
    args = argparse.Namespace(method=method, seed=0, meta_batch=2)
    tasks = [(i, f"t{i}", [batch(10 * i + k) for k in range(2)], None) for i in range(2)]
    a = model("abmll" if method == "abmll" else "lora")
    b = copy.deepcopy(a)
    group = "theta" if method == "abmll" else "lora"
    opt_a, opt_b = (torch.optim.AdamW(abmll.param_groups(m)[group].values(), lr=1e-3) for m in (a, b))
    if method == "lora":
        ranks.mean_steps(a, opt_a, tasks, 2, 2)
        params = list(abmll.param_groups(b)["lora"].values())
        for k in range(2):
            grads = [torch.autograd.grad(abmll.nll_loss(b, t[2][k]), params) for t in tasks]
            for p, g0, g1 in zip(params, *grads):
                p.grad = (g0 + g1) / 2
            opt_b.step()
    else:
        ranks.mean_update(a, opt_a, tasks, 2, 5, args, CFG)
        own = []
        update = abmll.reptile_delta if method == "reptile" else abmll.abmll_task_grads
        for i, _, batches, _ in tasks:
            with ranks.task_stream(args, 5, i):  # the stream of task i of epoch 5
                own.append(update(b, batches, CFG)[0])
        with torch.no_grad():
            if method == "reptile":
                for k, p in abmll.param_groups(b)["lora"].items():
                    p.add_((own[0][k] + own[1][k]) / 2, alpha=CFG.reptile_eps)
            else:
                for p in own[0]:
                    p.grad = (own[0][p] + own[1][p]) / 2
                opt_b.step()
                for m in abmll.bayes_layers(b):
                    m.reset_phi()
    pa, pb = abmll.adapter_params(a), abmll.adapter_params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    before = model("abmll" if method == "abmll" else "lora")
    assert any(not torch.equal(pa[k], p) for k, p in abmll.adapter_params(before).items())  # it moved


def test_a_nan_on_another_rank_stops_this_one_before_any_change(monkeypatch):
    """The flat all-reduce carries a flag: a rank whose own tasks were fine raises too, its tensors unsummed."""
    def other_rank(flag):  # the other rank's [1, 1, 1] and its flag, as the all-reduce would add them
        return lambda flat: flat.add_(torch.tensor([1.0, 1.0, 1.0, flag]))

    monkeypatch.setattr(ranks.dist, "all_reduce", other_rank(1.0))
    two, grads = ranks.Ranks(rank=0, world=2), [torch.zeros(2), torch.zeros(1)]
    with pytest.raises(FloatingPointError, match="non-finite loss on another rank"):
        two.sum_(grads)
    assert all(not g.any() for g in grads)
    monkeypatch.setattr(ranks.dist, "all_reduce", other_rank(0.0))
    two.sum_(grads)
    assert [g.tolist() for g in grads] == [[1.0, 1.0], [1.0]]


# -----------------------------------------------------------------------------
# one-line errors, before anything loads


@pytest.mark.parametrize("world,extra,needle", [
    (1, ["--meta-batch", "0"], "--meta-batch must be at least 1"),
    (4, ["--meta-batch", "2"], "world size 4 > --meta-batch 2: a rank would have no task"),
    (2, [], "world size 2 > --meta-batch 1"),
    (1, ["--fsdp"], "--fsdp shards the base across ranks and needs more than one process"),
    (1, ["--meta-batch", "2", "--preset", "official"], "--inner-opt persistent"),
    (2, ["--meta-batch", "2", "--fsdp", "--prune", "10", "--prune-mode", "weight"], "--prune-mode weight"),
])
def test_bad_parallel_flags_end_in_one_line(monkeypatch, capsys, world, extra, needle):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as e:
        train.parse_args(extra)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and needle in last, last


def test_parallel_flags_that_are_fine(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.parse_args(["--method", "pretrained"]).meta_batch == 1  # evaluation alone is dealt out
    assert train.parse_args(["--meta-batch", "3", "--fsdp"]).fsdp  # a rank may hold two tasks
    monkeypatch.delenv("WORLD_SIZE")
    assert train.parse_args(["--meta-batch", "2", "--preset", "official", "--inner-opt", "fresh"]).meta_batch == 2
    assert "fsdp" in train.RUN_ONLY and "meta_batch" not in train.RUN_ONLY  # T changes the run; sharding not
