"""The held-out tasks: test-time adaptation, then scoring (Algorithm 1's test section, Section 5).

Every method is scored alike. Each held-out task's K support batches of 2 adapt a copy of the
adapters (`abmll.adapted`: a fresh AdamW at --test-lr, K steps; none for Pretrained), the task's
validation or test examples are scored inside that block, and the adapters are put back. A
prediction row (compare.py's format) holds the letter probabilities over the example's options,
the softmax over all four letters and the argmax over the vocabulary, so that eval.metrics gives
accuracy, ECE, NLL, Brier and the authors' numbers from the same rows.

    val = evaluate(model, split.held_out, "val", tok, args, cfg)[("none", 0)]   # rows
    final = test_and_record(model, split, tok, args, cfg, rundir)          # final.json's metrics

Under torchrun the tasks are dealt out (task n on rank n % world) and the rows gathered in task
order; `diagnostics` is ABMLL's posterior at a glance (metrics.jsonl's "diag"). The loop calls
`evaluate` once an epoch, as nanoGPT's train.py calls estimate_loss: a function of its own.
"""

import argparse
import dataclasses
import time
from contextlib import nullcontext

import torch

import abmll
import data
import eval as evaluation
import prune
import ranks
from resume import RunError
from ranks import autocast, task_stream, to_device


@torch.no_grad()
def score(model, examples, tok, args) -> list[dict]:
    """Prediction rows (eval.py's format) of one task's examples, with the S-sample predictive: the
    letter probabilities over the example's options (accuracy, ECE, NLL, Brier), the softmax over
    all four letters A-D (the authors' per-example "ECE") and the argmax over the whole vocabulary
    (the authors' accuracy)."""
    mean = args.method == "abmll" and args.eval_noise == "mean"  # the authors score the mean
    samples = args.eval_samples if args.method == "abmll" and not mean else 1  # else deterministic
    four, rows = torch.tensor(data.letter_tokens(tok), device=args.device), []
    # batches of similar length waste less on padding; rows keep each example's index in the task
    order = sorted(range(len(examples)),
                   key=lambda n: len(examples[n].input) + sum(map(len, examples[n].options)))
    for i in range(0, len(examples), args.eval_batch):
        idx = order[i:i + args.eval_batch]
        chunk = [examples[n] for n in idx]
        batch = to_device(data.collate(chunk, tok, args.max_len, args.prompt), args)
        ids, probs, probs4, vocab = batch["letter_ids"], 0.0, 0.0, 0.0
        with autocast(args), abmll.bayes_mode(model, "mean") if mean else nullcontext():
            for _ in range(samples):
                logits = model(batch["tokens"], logits_at=batch["answer_pos"][:, None])
                logits = logits[:, 0].float()  # (B, V)
                own = logits.gather(1, ids.clamp(min=0))  # (B, 4): the example's letters
                own = own.masked_fill(ids < 0, float("-inf"))  # none beyond its options
                probs = probs + own.softmax(-1) / samples
                probs4 = probs4 + logits[:, four].softmax(-1) / samples
                vocab = vocab + logits.softmax(-1) if samples > 1 else logits
        probs, probs4, top = probs.double().cpu(), probs4.double().cpu(), vocab.argmax(-1).cpu()
        for j, e in enumerate(chunk):
            n = len(e.options)
            rows.append({"task": e.task, "id": idx[j], "label": e.label, "n_options": n,
                         "probs": probs[j, :n].tolist(), "probs4": probs4[j].tolist(),
                         "answer_id": int(batch["answer_ids"][j]), "vocab_argmax": int(top[j])})
    return sorted(rows, key=lambda r: r["id"])


def at_test(cfg, args):
    """The method's settings at test time: adaptation at --test-lr, the same for every method."""
    return dataclasses.replace(cfg, inner_lr=args.test_lr)


def support_batches(held, tok, args, cfg):
    """A held-out task's K support batches of cfg.batch_size, on the device."""
    b = cfg.batch_size
    return [to_device(data.collate(held.support[i:i + b], tok, args.max_len, args.prompt), args)
            for i in range(0, len(held.support), b)]


def evaluate(model, tasks, part, tok, args, cfg, prunes=(("none", 0),), diag=None, stream=()):
    """Prediction rows of the held-out tasks' `part` examples after test-time adaptation on each
    task's support batches (none for Pretrained), per (pruning mode, percent). `diag`, a dict, gets
    ABMLL's diagnostics on the first task (on the rank that runs it). Several ranks deal the tasks
    out, task n drawing from stream (*stream, n), and gather the rows in task order."""
    done = []
    for n, (task, held) in enumerate(tasks.items()):
        if not ranks.DIST.mine(n):
            continue
        rows = {key: [] for key in prunes}
        support, examples = support_batches(held, tok, args, cfg), getattr(held, part)
        adapts = args.method not in ("pretrained",)
        with task_stream(args, *stream, n):
            if diag is not None and n == 0:
                with torch.random.fork_rng(devices=[]):  # diagnostics draw noise; the run's stays
                    diag |= diagnostics(model, support, held.val, tok, args, "theta")
            adapted = abmll.adapted(model, support, at_test(cfg, args)) if adapts else nullcontext()
            with autocast(args), adapted:
                if diag is not None and n == 0:
                    with torch.random.fork_rng(devices=[]):
                        diag |= diagnostics(model, support, [], tok, args, "phi")
                for mode, p in prunes:
                    with prune.pruned(model, p, mode if p else "activation", calib=support):
                        rows[(mode, p)] += score(model, examples, tok, args)
        done.append((n, rows))
    gathered = ranks.DIST.gathered(done, held_out=True)
    return {key: [r for _, rows in gathered for r in rows[key]] for key in prunes}


def adapt_curve(model, tasks, tok, args, cfg) -> dict:
    """Prediction rows of the test examples after k test-time steps, for each k of --adapt-curve:
    k batches of the support set, cycled, from one fresh AdamW; the same k for every method."""
    ks, mine = sorted(set(args.adapt_curve)), []
    for n, (task, held) in enumerate(tasks.items()):
        if not ranks.DIST.mine(n):  # dealt out and gathered as in evaluate()
            continue
        support, rows = support_batches(held, tok, args, cfg), {}
        opt, done = abmll.inner_optimizer(model, at_test(cfg, args)), 0
        with abmll.restored(model), task_stream(args, "curve", n):
            for k in ks:
                batches = [support[j % len(support)] for j in range(done, k)]
                with autocast(args):
                    abmll.adapt(model, batches, at_test(cfg, args), opt)
                done = k
                rows[k] = score(model, held.test, tok, args)
        mine.append((n, rows))
    gathered = ranks.DIST.gathered(mine, held_out=True)
    return {k: [r for _, rows in gathered for r in rows[k]] for k in ks} if gathered else {}


@torch.no_grad()
def diagnostics(model, support, val, tok, args, group) -> dict:
    """ABMLL's posterior, per adapted module kind: the log-variance of `group` (5th, 50th, 95th
    percentile; over weight entries, or over output elements of the first support batch with
    activation noise); for theta also the noise's size against each layer's output (RMS of sample -
    mean over RMS of the mean) and the share of output elements it changes in the run's dtype, and
    the mean |difference| of the validation letter probabilities between the --eval-samples
    predictive and the posterior mean."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, abmll.BayesLoRALinear)}
    if not layers:
        return {}
    lv, noise, changed = {}, {}, {}

    def hook(name):
        def fn(m, inputs, y):
            x, kind = inputs[0], name.rpartition(".")[2]
            v = m.logvar(group, x).flatten()
            lv.setdefault(kind, []).append(v[:: max(1, v.numel() // 100_000)].float())  # strided
            if group == "theta":
                y_mean = m.mean_forward(x).to(y.dtype)
                d = (y - y_mean).float()
                rms = d.square().mean().sqrt() / y_mean.float().square().mean().sqrt()
                noise.setdefault(kind, []).append(rms)
                changed.setdefault(kind, []).append((d != 0).float().mean())
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        with autocast(args), abmll.bayes_mode(model, "sample"):
            model(support[0]["tokens"], logits_at=support[0]["answer_pos"][:, None])
    finally:
        for h in handles:
            h.remove()
    q = torch.tensor([0.05, 0.5, 0.95])
    out = {f"{group}_logvar": {k: torch.quantile(torch.cat(v), q).tolist() for k, v in lv.items()}}
    if group == "theta":
        out["noise_ratio"] = {k: torch.stack(v).mean().item() for k, v in noise.items()}
        out["noise_changed"] = {k: torch.stack(v).mean().item() for k, v in changed.items()}
        if val:
            out["sample_vs_mean"] = _sample_vs_mean(model, val[:8], tok, args)
    return out


def _sample_vs_mean(model, val, tok, args) -> float:
    """Mean |difference| of the letter probabilities: --eval-samples samples vs the mean."""
    rows = [score(model, val, tok, argparse.Namespace(**{**vars(args), "eval_noise": noise}))
            for noise in ("sample", "mean")]
    diffs = [abs(a - b) for r, q in zip(*rows) for a, b in zip(r["probs"], q["probs"])]
    return sum(diffs) / len(diffs)


def chance(held_out) -> float:
    """Expected accuracy of a uniform guess over each test example's options (what a method without
    skill scores on average; a letter bias moves it up or down with each sample's label balance)."""
    examples = [e for held in held_out for e in held.test]
    return sum(1 / len(e.options) for e in examples) / max(len(examples), 1)


# -----------------------------------------------------------------------------
# the test: every set of rows written, final.json's metrics from the same rows

METRIC_KEYS = ("acc", "ece", "paper_ece")  # the pruning table's and the adaptation curve's


def test_and_record(model, split, tok, args, cfg, rundir) -> dict:
    """The test examples scored unpruned, at every pruning level and mode, and along the adaptation
    curve; every set of prediction rows written to {rundir}/predictions/, and final.json's metrics
    computed from those same rows (`eval.py compare` recomputes any of them)."""
    modes = [m for m in args.prune_mode if not (m == "adapted" and args.method == "pretrained")]
    levels = [p for p in (args.prune or []) if p != 0]
    t0 = time.time()
    try:
        test = evaluate(model, split.held_out, "test", tok, args, cfg,
                        [("none", 0)] + [(m, p) for m in modes for p in levels], stream=("test",))
        curves = args.adapt_curve and args.method != "pretrained"  # Pretrained has no adapters
        curve = adapt_curve(model, split.held_out, tok, args, cfg) if curves else {}
    except (FloatingPointError, ValueError) as e:
        raise RunError(f"test: {e}; the checkpoint is in {rundir}") from None
    pred, names = rundir / "predictions", {}
    for (mode, p), rows in test.items():
        names[f"test-{mode}-{p:g}.jsonl.gz" if p else "test-0.jsonl.gz"] = rows
    names |= {f"adapt{k}-0.jsonl.gz": rows for k, rows in curve.items()}
    if ranks.DIST.rank == 0:
        for name, rows in names.items():
            evaluation.write_predictions(pred / name, rows)
        for old in [*pred.glob("test-*.jsonl.gz"), *pred.glob("adapt*-0.jsonl.gz")]:
            if old.name not in names:  # a re-test's flags did not ask for it: not this test's
                old.unlink()
    m = evaluation.metrics(test[("none", 0)])
    final = dict(method=args.method, split=args.split, seed=args.seed,
                 **{f"test_{k}": v for k, v in m.items() if k != "n"}, n_test=m["n"],
                 test_chance=chance(split.held_out.values()), test_time_s=time.time() - t0)
    if args.prune:
        by = {mode: {key: {"0": m[key]} | {f"{p:g}": evaluation.metrics(test[(mode, p)])[key]
                                           for p in levels} for key in METRIC_KEYS}
              for mode in modes}
        final["pruning_modes"] = by
        top = modes[0] if modes else None  # pruning: the first mode's, as older runs have it
        final["pruning"] = {"mode": top, "acc": by[top]["acc"], "ece": by[top]["ece"]} \
            if modes else None
    if curve:
        points = {k: evaluation.metrics(rows) for k, rows in sorted(curve.items())}
        final["adapt_curve"] = {"k": list(points)} | {key: [pt[key] for pt in points.values()]
                                                      for key in METRIC_KEYS}
    return final
