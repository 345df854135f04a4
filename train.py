"""Train and evaluate one method on one split: the experiments of Section 5 of the paper.

    python train.py --method abmll --split nli                  # built-in defaults: SmolLM2-135M, offline nli
    python train.py --method reptile --split nli --seed 1 --prune
    python train.py --compare --split nli --seeds 0 1 2 --prune # all five methods x seeds, resumable
    python train.py --method abmll --split cls-45 --data-dir ~/MetaICL/data --model ~/Meta-Llama-3-8B-Instruct \\
        --preset paper --device cuda                            # the paper's setting on a GPU
    python eval.py report runs                                  # tables and curves from the run directories

An epoch is one sweep over the training tasks, K = 5 batches of 2 from each (Regular LoRA takes
the same number of steps on pooled, shuffled batches). After every epoch the held-out tasks'
validation examples are scored after test-time adaptation on their support batches; the adapters
of the best validation-accuracy epoch are scored on the test examples at the end. Every epoch
leaves a checkpoint (adapters, optimizer state, RNG state, metrics) written atomically, so
`--resume` continues a killed run and ends exactly where an uninterrupted one would.
Run directories are laid out as eval.py's docstring says: {out}/{split}/{method}/seed{seed}/.
"""

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import abmll
import data
import eval as evaluation
import fetch
import llama

METHODS = ("pretrained", "pretrained-adapted", "lora", "structured", "reptile", "abmll")
UNTRAINED = ("pretrained", "pretrained-adapted")  # the second: a fresh LoRA (B = 0), adapted at test time only
RUN_ONLY = ("resume", "compare", "seeds", "device", "out", "fsdp")  # flags that may change when a run resumes
# "paper" is Section 5.1.1's setting (for a GPU). "quick" fits a 2-core CPU in minutes (the default command in
# < 10: 12 training tasks an epoch, as each costs ~8.6 s and each evaluation ~100 s): it takes ~1/1000
# of the paper's steps, and at the paper's learning rates the adapters barely move in so few (measured on
# nli: Structured LoRA 30.4% vs Pretrained 31.0% test accuracy), so it scales every learning rate by 10.
# "official" is the authors' code (github zhang-liyi/llm-meta-learning) at the paper's budget: README's table.
_PAPER_LR = dict(lr=abmll.Config.lr, inner_lr=abmll.Config.inner_lr, outer_lr=abmll.Config.outer_lr)
_TEXT = dict(targets="wq,wv,wo", noise="weight", kl="closed", weight_decay=abmll.Config.weight_decay,
             inner_opt="fresh", reptile_anneal="none", prior_weight="beta", prompt="paper", eval_noise="sample",
             outer_grad="kl")  # the paper's text, as this library reads it
_AUTHORS = dict(_TEXT, targets="wq,wv,wo,w1,w2,w3", noise="activation", kl="mc", weight_decay=0.0,
                inner_opt="persistent", reptile_anneal="linear", prior_weight="beta/M", prompt="official",
                eval_noise="mean")
_PAPER = dict(epochs=500, tasks_per_epoch=None, max_query=None, max_val=None, max_examples=None, **_PAPER_LR)
PRESETS = {"quick": dict(epochs=2, tasks_per_epoch=12, max_query=16, max_val=None, max_examples=200,
                         **{k: 10 * v for k, v in _PAPER_LR.items()}, **_TEXT),
           "paper": dict(_PAPER, **_TEXT),
           # quick's training with an evaluation that can tell methods apart: >= 1,000 test and >= 300 validation
           # examples per split and seed where the split has them (nli 1,030 / 318, cls 1,054 / 346)
           "compare": dict(epochs=2, tasks_per_epoch=20, max_query=250, max_val=60, max_examples=200,
                           **{k: 10 * v for k, v in _PAPER_LR.items()}, **_TEXT),
           "official": dict(_PAPER, **_AUTHORS)}
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # Meta's names of the linear layers an adapter can wrap


class RunError(RuntimeError):
    """A problem with the run's flags or directory that the user can fix (one line)."""


# -----------------------------------------------------------------------------
# processes: torchrun's ranks, or one


@dataclasses.dataclass
class Ranks:
    """This process among torchrun's (WORLD_SIZE > 1), or the only one. Rank r runs task j of every
    meta-batch with j % world == r and held-out task n with n % world == r (all of them under --fsdp, whose
    sharded forwards run in lockstep on every rank); only rank 0 writes files and prints progress."""

    rank: int = 0
    world: int = 1
    local: int = 0
    fsdp: bool = False

    def mine(self, n: int) -> bool:
        """Whether held-out task n is this rank's."""
        return self.fsdp or n % self.world == self.rank

    def gathered(self, items: list, held_out: bool = False) -> list:
        """[(n, value)] of every rank, sorted by n: each rank's share of the training tasks' losses, or of the
        held-out tasks' rows (which under --fsdp every rank has already)."""
        if self.world == 1 or held_out and self.fsdp:
            return items
        out = [None] * self.world
        dist.all_gather_object(out, items)
        return sorted((x for part in out for x in part), key=lambda x: x[0])

    def sum_(self, tensors: list, err: Exception | None = None):
        """Sum `tensors` over the ranks in place, one flat all-reduce that also carries whether any rank hit a
        non-finite loss: then every rank raises (its own error or another rank's) before an adapter moves."""
        bad = err is not None
        if self.world > 1:
            flat = torch.cat([t.reshape(-1) for t in tensors] + [tensors[0].new_full((1,), float(bad))])
            dist.all_reduce(flat)
            bad = bool(flat[-1] > 0)
            for t, f in zip(tensors, flat[:-1].split([t.numel() for t in tensors]) if not bad else ()):
                t.copy_(f.view_as(t))
        if err is not None:
            raise err
        if bad:
            raise FloatingPointError("non-finite loss on another rank: training stopped, adapters kept at "
                                     "their last good values")

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    @contextmanager
    def first(self):
        """Each node's local rank 0 runs the block (fetching and caching the model and data) before the others."""
        if self.local != 0:
            self.barrier()
        yield
        if self.local == 0:
            self.barrier()


DIST = Ranks()  # main() sets it under torchrun


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_ranks(args) -> Ranks:
    """torch.distributed for torchrun's processes: gloo on CPU, nccl on CUDA (device cuda:LOCAL_RANK)."""
    world = world_size()
    if world == 1:
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local, args.fsdp)


def parallel(args) -> bool:
    """Tasks run side by side (--meta-batch > 1 or several processes): each draws its own noise stream."""
    return args.meta_batch > 1 or DIST.world > 1


@contextmanager
def task_stream(args, *key):
    """Torch's CPU generator (where every noise seed is drawn) seeded by (seed, *key) inside the block and
    restored after it, when tasks run in parallel, so that whichever rank runs a task draws what one process
    draws; otherwise the run's single stream, as on one process with --meta-batch 1."""
    if not parallel(args):
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(random.Random("-".join(map(str, (args.seed, *key)))).getrandbits(63))
        yield


# -----------------------------------------------------------------------------
# scoring


@torch.no_grad()
def score(model, examples, tok, args) -> list[dict]:
    """Prediction rows (eval.py's format) of one task's examples, with the S-sample predictive: the letter
    probabilities over the example's options (accuracy, ECE, NLL, Brier), the softmax over all four letters
    A-D (the authors' per-example "ECE") and the argmax over the whole vocabulary (the authors' accuracy)."""
    mean = args.method == "abmll" and args.eval_noise == "mean"  # the authors score the posterior mean
    samples = args.eval_samples if args.method == "abmll" and not mean else 1  # else deterministic
    four, rows = torch.tensor(data.letter_tokens(tok), device=args.device), []
    # batches of similar length waste less on padding; rows keep each example's index in the task
    order = sorted(range(len(examples)), key=lambda n: len(examples[n].input) + sum(map(len, examples[n].options)))
    for i in range(0, len(examples), args.eval_batch):
        idx = order[i:i + args.eval_batch]
        chunk = [examples[n] for n in idx]
        batch = to_device(data.collate(chunk, tok, args.max_len, args.prompt), args)
        ids, probs, probs4, vocab = batch["letter_ids"], 0.0, 0.0, 0.0
        with autocast(args), abmll.bayes_mode(model, "mean") if mean else nullcontext():
            for _ in range(samples):
                logits = model(batch["tokens"], logits_at=batch["answer_pos"][:, None])[:, 0].float()  # (B, V)
                own = logits.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))  # (B, 4)
                probs = probs + own.softmax(-1) / samples
                probs4 = probs4 + logits[:, four].softmax(-1) / samples
                vocab = vocab + logits.softmax(-1) if samples > 1 else logits
        probs, probs4, top = probs.double().cpu(), probs4.double().cpu(), vocab.argmax(-1).cpu()
        for j, e in enumerate(chunk):
            n = len(e.options)
            rows.append({"task": e.task, "id": idx[j], "label": e.label, "n_options": n, "probs": probs[j, :n].tolist(),
                         "probs4": probs4[j].tolist(), "answer_id": int(batch["answer_ids"][j]),
                         "vocab_argmax": int(top[j])})
    return sorted(rows, key=lambda r: r["id"])


def at_test(cfg, args):
    """The method's settings at test time: adaptation at --test-lr, the same for every method."""
    return dataclasses.replace(cfg, inner_lr=args.test_lr)


def support_batches(held, tok, args):
    """A held-out task's K support batches of 2, on the device."""
    return [to_device(data.collate(held.support[i:i + 2], tok, args.max_len, args.prompt), args)
            for i in range(0, len(held.support), 2)]


def evaluate(model, tasks, part, tok, args, cfg, prunes=(("none", 0),), diag=None, stream=()) -> dict:
    """Prediction rows of the held-out tasks' `part` examples after test-time adaptation on each task's
    support batches (none for Pretrained), per (pruning mode, percent). `diag`, a dict, gets ABMLL's
    diagnostics on the first task (on the rank that runs it). Several ranks deal the tasks out, task n
    drawing from stream (*stream, n), and gather the rows in task order."""
    done = []
    for n, (task, held) in enumerate(tasks.items()):
        if not DIST.mine(n):
            continue
        rows = {key: [] for key in prunes}
        support, examples = support_batches(held, tok, args), getattr(held, part)
        adapts = args.method not in ("pretrained",)
        with task_stream(args, *stream, n):
            if diag is not None and n == 0:
                with torch.random.fork_rng(devices=[]):  # diagnostics draw noise; the run's RNG stream stays
                    diag |= diagnostics(model, support, held.val, tok, args, "theta")
            with autocast(args), abmll.adapted(model, support, at_test(cfg, args)) if adapts else nullcontext():
                if diag is not None and n == 0:
                    with torch.random.fork_rng(devices=[]):
                        diag |= diagnostics(model, support, [], tok, args, "phi")
                for mode, p in prunes:
                    with evaluation.pruned(model, p, mode if p else "activation", calib=support):
                        rows[(mode, p)] += score(model, examples, tok, args)
        done.append((n, rows))
    return {key: [r for _, rows in DIST.gathered(done, held_out=True) for r in rows[key]] for key in prunes}


def adapt_curve(model, tasks, tok, args, cfg) -> dict:
    """Prediction rows of the test examples after k test-time steps, for each k of --adapt-curve: k batches
    of the support set, cycled, from one fresh AdamW; the same k for every method."""
    ks, mine = sorted(set(args.adapt_curve)), []
    for n, (task, held) in enumerate(tasks.items()):
        if not DIST.mine(n):  # dealt out and gathered as in evaluate()
            continue
        support, rows = support_batches(held, tok, args), {}
        opt, done = abmll.inner_optimizer(model, at_test(cfg, args)), 0
        with abmll.restored(model), task_stream(args, "curve", n):
            for k in ks:
                with autocast(args):
                    abmll.adapt(model, [support[j % len(support)] for j in range(done, k)], at_test(cfg, args), opt)
                done = k
                rows[k] = score(model, held.test, tok, args)
        mine.append((n, rows))
    gathered = DIST.gathered(mine, held_out=True)
    return {k: [r for _, rows in gathered for r in rows[k]] for k in ks} if gathered else {}


@torch.no_grad()
def diagnostics(model, support, val, tok, args, group) -> dict:
    """ABMLL's posterior, per adapted module kind: the log-variance of `group` (5th, 50th, 95th percentile;
    over weight entries, or over output elements of the first support batch with activation noise); for
    theta also the noise's size against each layer's output (RMS of sample - mean over RMS of the mean) and
    the share of output elements it changes in the run's dtype, and the mean |difference| of the validation
    letter probabilities between the --eval-samples predictive and the posterior mean."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, abmll.BayesLoRALinear)}
    if not layers:
        return {}
    lv, noise, changed = {}, {}, {}

    def hook(name):
        def fn(m, inputs, y):
            x, kind = inputs[0], name.rpartition(".")[2]
            v = m.logvar(group, x).flatten()
            lv.setdefault(kind, []).append(v[:: max(1, v.numel() // 100_000)].float())  # a strided sample
            if group == "theta":
                y_mean = m.mean_forward(x).to(y.dtype)
                d = (y - y_mean).float()
                noise.setdefault(kind, []).append(d.square().mean().sqrt() / y_mean.float().square().mean().sqrt())
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
            rows = [score(model, val[:8], tok, argparse.Namespace(**{**vars(args), "eval_noise": noise}))
                    for noise in ("sample", "mean")]
            diffs = [abs(a - b) for r, q in zip(*rows) for a, b in zip(r["probs"], q["probs"])]
            out["sample_vs_mean"] = sum(diffs) / len(diffs)
    return out


def chance(held_out) -> float:
    """Expected accuracy of a uniform guess over each test example's options (what a method without skill
    scores on average; a letter bias moves it up or down with each sample's label balance)."""
    examples = [e for held in held_out for e in held.test]
    return sum(1 / len(e.options) for e in examples) / max(len(examples), 1)


def autocast(args):
    # bf16 autocast on CUDA; on CPU fp32 unless asked (the adapters' noise path stays apart from W0 x)
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()


def to_device(batch, args):
    return {k: v.to(args.device) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# one epoch of each method


def epoch_tasks(split, epoch, args, cfg):
    """[(task, [batch of 2 examples] * K, query batch or None)] for this epoch; the query batch only for
    FOMAML's outer gradient. Regular LoRA gets pooled, shuffled batches."""
    fo = args.method == "abmll" and cfg.outer_grad == "fo"
    episodes = list(data.epoch_episodes(split.train, epoch, args.seed, cfg.inner_steps, 2, query_batch=fo))
    episodes = episodes[:args.tasks_per_epoch]  # the order is shuffled by (seed, epoch)
    if args.method != "lora":
        return episodes
    pool = [e for t in sorted(split.train) for e in split.train[t]]
    rng = random.Random(f"{args.seed}-{epoch}-pooled")
    need = 2 * cfg.inner_steps * len(episodes)  # as many steps as the meta-learners take
    picks = rng.sample(pool, need) if len(pool) >= need else [rng.choice(pool) for _ in range(need)]
    k = 2 * cfg.inner_steps
    return [("pooled", [picks[j:j + 2] for j in range(i, i + k, 2)], None) for i in range(0, need, k)]


def task_batches(support, query, tok, args):
    """A training task's K support batches and its query batch (or None), collated on the device."""
    to = lambda b: to_device(data.collate(b, tok, args.max_len, args.prompt), args)  # noqa: E731
    return [to(b) for b in support], None if query is None else to(query)


def train_epoch(model, opt, split, epoch, tok, args, cfg, progress):
    losses, inner_opt = [], opt if args.inner_opt == "persistent" else None  # see build()
    if args.reptile_anneal == "linear":  # the authors' Reptile: eps = eps0 (1 - epoch / epochs)
        cfg = dataclasses.replace(cfg, reptile_eps=cfg.reptile_eps * (1 - epoch / args.epochs))
    if args.meta_batch > 1:
        return train_meta_batches(model, opt, split, epoch, tok, args, cfg, progress)
    for task, support, query in epoch_tasks(split, epoch, args, cfg):
        batches, query = task_batches(support, query, tok, args)
        progress.task = task
        with autocast(args):
            if args.method in ("lora", "structured"):  # persistent optimizer, no reset
                step_losses = [abmll.lora_step(model, opt, b) for b in batches]
            elif args.method == "reptile":
                step_losses = abmll.reptile_task(model, batches, cfg, inner_opt)
            else:  # abmll: K inner steps on phi, one outer step on theta, phi <- theta
                step_losses = abmll.abmll_task(model, opt, batches, cfg, inner_opt, query)["inner"]
        losses += step_losses
        progress.advance(len(batches), step_losses[-1])
    return sum(losses) / max(len(losses), 1)


def train_meta_batches(model, opt, split, epoch, tok, args, cfg, progress):
    """--meta-batch T: the epoch's tasks in meta-batches of T consecutive ones (the last smaller when T does not
    divide them), task j of each on rank j % world, and one update per meta-batch from the mean over its tasks,
    summed across the ranks (one all-reduce):
        ABMLL       theta <- AdamW(1/T sum_t grad_theta beta [KL(q(phi_t) || p(phi_t|theta)) + prior_scale
                    (-log p(theta))] (+ FOMAML's query terms)), each phi_t K inner steps from theta
        Reptile     theta <- theta + eps 1/T sum_t (theta_t - theta), each theta_t K steps from theta
        LoRA, Structured LoRA: K AdamW steps, step k on 1/T sum_t grad NLL(batch k of task / pooled episode t)
    (what DDP over T replicas would do). Task i of the epoch draws noise from its own stream (seed, epoch, i),
    so any number of ranks computes what one process computes. Returns the mean loss over every step."""
    T, K, done = args.meta_batch, cfg.inner_steps, []
    episodes = list(enumerate(epoch_tasks(split, epoch, args, cfg)))
    for start in range(0, len(episodes), T):
        group = episodes[start:start + T]
        mine = [(i, task, *task_batches(support, query, tok, args))
                for j, (i, (task, support, query)) in enumerate(group) if j % DIST.world == DIST.rank]
        with autocast(args):
            if args.method in ("lora", "structured"):
                losses = _mean_steps(model, opt, mine, len(group), K)
            else:
                losses = _mean_update(model, opt, mine, len(group), epoch, args, cfg)
        done += losses
        progress.task = mine[-1][1] if mine else ""
        progress.advance(K * len(group), losses[-1][1][-1] if losses else float("nan"))
    losses = [x for _, ls in DIST.gathered(done) for x in ls]  # every rank's, in the epoch's task order
    return sum(losses) / max(len(losses), 1)


def _mean_update(model, opt, mine, n, epoch, args, cfg) -> list:
    """ABMLL's one theta step or Reptile's one meta step from this rank's tasks of a meta-batch of n."""
    err, total, losses = None, None, []
    reptile = args.method == "reptile"
    try:
        for i, task, batches, query in mine:
            with task_stream(args, epoch, i):
                delta, step_losses = (abmll.reptile_delta(model, batches, cfg) if reptile
                                      else abmll.abmll_task_grads(model, batches, cfg, query))
            total = delta if total is None else {k: t.add_(delta[k]) for k, t in total.items()}
            losses.append((i, step_losses))
    except FloatingPointError as e:  # raised on every rank by sum_, once the others know
        err = e
    params = abmll.param_groups(model)["lora"] if reptile else \
        {p: p for p in abmll.layers_pairs(abmll.bayes_layers(model), "theta")}
    total = {k: torch.zeros_like(p) for k, p in params.items()} if total is None or err else total
    DIST.sum_(list(total.values()), err)
    with torch.no_grad():
        for k, p in params.items():
            if reptile:  # theta <- theta + eps mean_t (theta_t - theta)
                p.add_(total[k].div_(n), alpha=cfg.reptile_eps)
            else:
                p.grad = total[k].div_(n)
    if not reptile:
        opt.step()
        for m in abmll.bayes_layers(model):  # phi <- theta, the stepped one
            m.reset_phi()
    return losses


def _mean_steps(model, opt, mine, n, K) -> list:
    """Regular / Structured LoRA on this rank's tasks of a meta-batch of n: K steps, step k's gradient the mean
    over the n tasks' batch k."""
    params, losses = list(abmll.param_groups(model)["lora"].values()), {i: [] for i, *_ in mine}
    for k in range(K):
        err, total = None, [torch.zeros_like(p) for p in params]
        try:
            for i, task, batches, _ in mine:
                loss = abmll.nll_loss(model, batches[k])
                abmll.check_finite(loss)
                for t, g in zip(total, torch.autograd.grad(loss, params)):
                    t.add_(g)
                losses[i].append(loss.item())
        except FloatingPointError as e:
            err = e
        DIST.sum_(total, err)
        for p, t in zip(params, total):
            p.grad = t.div_(n)
        opt.step()
    return list(losses.items())


class Progress:
    """One live line: epoch, task, step, loss, ETA (a line per task when not on a terminal)."""

    def __init__(self, total_steps, epochs):
        self.total, self.done, self.epochs, self.epoch, self.task = total_steps, 0, epochs, 0, ""
        self.t0, self.last = time.time(), 0.0
        self.tty, self.quiet = sys.stderr.isatty(), DIST.rank != 0

    def advance(self, steps, loss):
        self.done += steps
        if self.quiet:
            return
        elapsed = time.time() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        line = (f"epoch {self.epoch + 1}/{self.epochs} | task {self.task[:32]:32s} | step {self.done}/{self.total}"
                f" | loss {loss:.4f} | ETA {eta / 60:.1f} min")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif time.time() - self.last > 10 or self.done == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last = time.time()

    def end_line(self):
        if self.tty and not self.quiet:
            print(file=sys.stderr)


# -----------------------------------------------------------------------------
# checkpoints: everything needed to continue, written atomically


def write_atomic(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves no half file behind; `path` is untouched
        tmp.unlink(missing_ok=True)


def save_checkpoint(run: Path, model, opt, state: dict):
    """Versioned tensor files first, then state.json (the commit point) naming them; old files go last."""
    e = state["epoch"]
    tensors = {f"adapter.{k}": p.detach().cpu().contiguous() for k, p in abmll.adapter_params(model).items()}
    tensors |= {f"best.{k}": v for k, v in state["best_adapters"].items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = None
    if opt is not None:
        sd = opt.state_dict()
        groups = sd["param_groups"]
        for i, s in sd["state"].items():
            tensors |= {f"opt.{i}.{k}": v.cpu().contiguous() for k, v in s.items()}
    meta = {k: v for k, v in state.items() if k != "best_adapters"}
    meta |= {"file": f"ckpt-{e}.safetensors", "opt_groups": groups}
    try:
        write_atomic(run / meta["file"], lambda p: save_file(tensors, str(p)))
        write_atomic(run / "state.json", lambda p: p.write_text(json.dumps(meta)))
    except (OSError, SafetensorError) as err:  # a full disk: state.json still names the previous checkpoint
        (run / meta["file"]).unlink(missing_ok=True)  # so a new file it does not name goes
        raise RunError(f"{run / meta['file']}: cannot write the checkpoint of epoch {e} ({_line(err)}); "
                       f"the previous checkpoint and state.json are left as they were") from None
    for old in run.glob("ckpt-*.safetensors"):
        if old.name != meta["file"]:
            old.unlink()


def _line(err) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_checkpoint(run: Path, model, opt, epochs: int | None = None) -> dict:
    """state.json and the checkpoint it names, checked against each other and against this run: an epoch
    in [0, epochs] with as many history lines, its own ckpt-{epoch}.safetensors inside the run directory,
    every key present, adapter shapes that fit. Anything wrong is one RunError naming the file."""
    path = run / "state.json"

    def bad(where, what):
        return RunError(f"{where}: {what}; cannot resume (start the run again with another --out)")

    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise bad(path, f"unreadable ({_line(e)})") from None
    missing = [k for k in ("epoch", "best_acc", "best_epoch", "history", "file", "opt_groups")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise bad(path, f"missing keys {', '.join(missing)}")
    e, top = state["epoch"], state["epoch"] if epochs is None else epochs
    if type(e) is not int or not 0 <= e <= top:
        raise bad(path, f"epoch {json.dumps(e)} is not an epoch of this run (0 to {top})")
    if not isinstance(state["history"], list) or len(state["history"]) != e:
        raise bad(path, f"epoch {e} but {json.dumps(state['history'])[:40]} as its history (a line per epoch)")
    if type(state["best_epoch"]) is not int or not -1 <= state["best_epoch"] <= e \
            or type(state["best_acc"]) not in (int, float):
        raise bad(path, f"best_epoch {json.dumps(state['best_epoch'])} / best_acc "
                        f"{json.dumps(state['best_acc'])} are not those of a run at epoch {e}")
    if state["file"] != f"ckpt-{e}.safetensors":  # a plain name, inside the run directory, of this epoch
        raise bad(path, f"file {json.dumps(state['file'])} is not ckpt-{e}.safetensors, epoch {e}'s checkpoint")
    ckpt = run / state["file"]
    try:
        tensors = load_file(str(ckpt))
    except (OSError, SafetensorError) as err:  # SafetensorError is not an OSError
        raise bad(ckpt, f"unreadable checkpoint ({_line(err)})") from None
    params = abmll.adapter_params(model)
    missing = [k for k in [f"{w}.{k}" for w in ("adapter", "best") for k in params] + ["rng.torch"]
               if k not in tensors]
    if missing:
        raise bad(ckpt, f"{len(missing)} tensors missing, such as {missing[0]} (another method or model?)")
    for k, p in params.items():
        for w in ("adapter", "best"):
            if tuple(tensors[f"{w}.{k}"].shape) != tuple(p.shape):
                raise bad(ckpt, f"{w}.{k} has shape {tuple(tensors[f'{w}.{k}'].shape)}, this run's "
                                f"adapter {tuple(p.shape)}")
    try:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[f"adapter.{k}"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        if opt is not None:
            per = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, i, name = k.split(".", 2)
                    per.setdefault(int(i), {})[name] = v
            opt.load_state_dict({"state": per, "param_groups": state["opt_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise bad(ckpt, f"does not fit this run's optimizer or RNG ({_line(err)})") from None
    state["best_adapters"] = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    return state


# -----------------------------------------------------------------------------
# one run


def build(args, cfg):
    try:
        # fp32 unless bf16 on a GPU, whatever dtype the checkpoint stores
        dtype = torch.bfloat16 if args.dtype == "bf16" and not args.device.startswith("cpu") else torch.float32
        model, tok = llama.load(fetch.resolve_model(args.model), device=args.device, dtype=dtype)
    except (llama.LoadError, fetch.FetchError) as e:
        raise RunError(f"--model: {e}") from None
    if tok is None:
        raise RunError(f"--model {args.model}: no tokenizer beside the weights")
    try:
        data.letter_tokens(tok)  # the answer letters must be single tokens: say so before any training
    except data.DataError as e:
        raise RunError(f"--model {args.model}: {e}") from None
    if args.max_len > model.args.max_seq_len:  # say so now, not when a long prompt first reaches the model
        raise RunError(f"--max-len {args.max_len} exceeds the context of --model {args.model} "
                       f"({model.args.max_seq_len} tokens)")
    if args.method != "pretrained":
        bayes = dict(noise=args.noise, kl=args.kl) if args.method == "abmll" else {}
        abmll.inject(model, "abmll" if args.method == "abmll" else "lora", targets=args.targets, rank=args.rank,
                     alpha=args.alpha, log_c=args.log_c, **bayes)  # adapters are fp32 whatever the base dtype
    groups, wd = abmll.param_groups(model), cfg.weight_decay
    opt = None
    if args.method == "lora":
        opt = torch.optim.AdamW(groups["lora"].values(), lr=cfg.lr, weight_decay=wd)
    elif args.method == "structured" or (args.method == "reptile" and args.inner_opt == "persistent"):
        opt = torch.optim.AdamW(groups["lora"].values(), lr=cfg.inner_lr, weight_decay=wd)
    elif args.method == "abmll":
        # a persistent inner optimizer is a second group of the same AdamW: a parameter without a gradient is
        # skipped, so inner steps move phi and outer steps theta, each with its own state, as two AdamWs
        # would; one optimizer state is then what a checkpoint holds
        inner = [{"params": list(groups["phi"].values()), "lr": cfg.inner_lr}] * (args.inner_opt == "persistent")
        opt = torch.optim.AdamW([{"params": list(groups["theta"].values()), "lr": cfg.outer_lr}, *inner],
                                weight_decay=wd)
    return model, tok, opt


def shard(model):
    """--fsdp: FSDP2's fully_shard on every decoder layer, then on the rest (embeddings, norm, head): the frozen
    base is split across the ranks and gathered a layer at a time; the adapters stay whole on every rank
    (ignored_params), as the meta-batch's all-reduce expects."""
    from torch.distributed.fsdp import fully_shard

    keep = set(abmll.adapter_params(model).values())
    for layer in model.layers:
        fully_shard(layer, ignored_params=keep & set(layer.parameters()))
    fully_shard(model, ignored_params=keep)
    return model


def test_and_record(model, split, tok, args, cfg, rundir) -> dict:
    """The test examples scored unpruned, at every pruning level and mode, and along the adaptation curve;
    every set of prediction rows written to {rundir}/predictions/, and final.json's metrics computed from
    those same rows (`eval.py compare` recomputes any of them)."""
    modes = [m for m in args.prune_mode if not (m == "adapted" and args.method == "pretrained")]  # no adapters
    levels = [p for p in (args.prune or []) if p != 0]
    t0 = time.time()
    try:
        test = evaluate(model, split.test, "test", tok, args, cfg,
                        [("none", 0)] + [(m, p) for m in modes for p in levels], stream=("test",))
        curve = adapt_curve(model, split.test, tok, args, cfg) if args.adapt_curve and args.method != "pretrained" else {}
    except (FloatingPointError, ValueError) as e:
        raise RunError(f"test: {e}; the checkpoint is in {rundir}") from None
    pred = rundir / "predictions"
    for (mode, p), rows in test.items() if DIST.rank == 0 else ():
        evaluation.write_predictions(pred / (f"test-{mode}-{p:g}.jsonl.gz" if p else "test-0.jsonl.gz"), rows)
    for k, rows in curve.items() if DIST.rank == 0 else ():
        evaluation.write_predictions(pred / f"adapt{k}-0.jsonl.gz", rows)
    m = evaluation.metrics(test[("none", 0)])
    final = dict(method=args.method, split=args.split, seed=args.seed, **{f"test_{k}": v for k, v in m.items() if k != "n"},
                 n_test=m["n"], test_chance=chance(split.test.values()), test_time_s=time.time() - t0)
    if args.prune:
        by = {mode: {key: {"0": m[key]} | {f"{p:g}": evaluation.metrics(test[(mode, p)])[key] for p in levels}
                     for key in ("acc", "ece", "paper_ece")} for mode in modes}
        final["pruning_modes"] = by
        final["pruning"] = {"mode": modes[0], "acc": by[modes[0]]["acc"], "ece": by[modes[0]]["ece"]} if modes else None
    if curve:
        points = {k: evaluation.metrics(rows) for k, rows in sorted(curve.items())}
        final["adapt_curve"] = {"k": list(points)} | {key: [pt[key] for pt in points.values()]
                                                      for key in ("acc", "ece", "paper_ece")}
    return final


def run(args) -> dict:
    """Train (unless Pretrained), validate every epoch, test the best epoch; returns final.json's content."""
    cfg = abmll.Config(inner_steps=args.inner_steps, lr=args.lr, inner_lr=args.inner_lr, outer_lr=args.outer_lr,
                       reptile_eps=args.reptile_eps, beta=args.beta, a0=args.a0, b0=args.b0,
                       weight_decay=args.weight_decay, outer_grad=args.outer_grad)
    rundir = Path(args.out) / args.split / args.method / f"seed{args.seed}"
    if (rundir / "state.json").exists() and not args.resume:
        raise RunError(f"{rundir} already holds a run: pass --resume to continue it or --out elsewhere")
    torch.manual_seed(args.seed)
    with DIST.first():  # under torchrun one process per node fetches, the others find the cache
        model, tok, opt = build(args, cfg)
        try:
            split = data.load_split(args.split, args.data_dir, tok, args.max_len, args.seed, k_shot=args.inner_steps,
                                    max_examples=args.max_examples, max_query=args.max_query, max_val=args.max_val)
        except (data.DataError, fetch.FetchError) as e:
            raise RunError(f"--split {args.split}: {e}") from None
    n_tasks = min(len(split.train), args.tasks_per_epoch or len(split.train))
    if DIST.fsdp and args.method not in UNTRAINED:  # a rank with fewer tasks would wait for the others' forwards
        sizes = [min(args.meta_batch, n_tasks - i) for i in range(0, n_tasks, args.meta_batch)]
        if any(m % DIST.world for m in sizes):
            raise RunError(f"--fsdp: every rank must run as many tasks as the others (sharded forwards run in "
                           f"lockstep), but {n_tasks} tasks an epoch in meta-batches of {args.meta_batch} leave "
                           f"{next(m for m in sizes if m % DIST.world)} for {DIST.world} ranks; choose "
                           f"--meta-batch and --tasks-per-epoch as multiples of {DIST.world}")
    if DIST.fsdp:
        shard(model)
    if args.max_held_out:
        split.test = dict(list(split.test.items())[:args.max_held_out])
    if args.prior_weight == "beta/M":  # the authors weight -log p(theta) by beta / (number of training tasks)
        cfg.prior_scale = 1 / len(split.train)
    epochs = 1 if args.method in UNTRAINED else args.epochs
    rundir.mkdir(parents=True, exist_ok=True)
    if DIST.rank == 0:
        data.save_report(split, rundir / "data_report.json")  # what was kept and dropped per task: stderr, file
    config = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    if args.resume and (rundir / "state.json").exists():
        try:
            old = json.loads((rundir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{rundir}/config.json: cannot read ({e}); continue elsewhere with --out") from None
        changed = [k for k in config if k in old and old[k] != config[k]]
        if changed:
            k = changed[0]
            raise RunError(f"{rundir}: --{k.replace('_', '-')} was {old[k]!r}, now {config[k]!r}; "
                           f"resume with the run's flags or use another --out")
    elif DIST.rank == 0:
        write_atomic(rundir / "config.json", lambda p: p.write_text(json.dumps(config, indent=1)))

    state = {"epoch": 0, "best_acc": -1.0, "best_epoch": -1, "history": [],
             "best_adapters": {k: v.detach().cpu().clone() for k, v in abmll.adapter_params(model).items()}}
    if args.resume and (rundir / "state.json").exists():
        state = load_checkpoint(rundir, model, opt, epochs)  # every problem is one RunError naming the file
        if DIST.rank == 0:
            print(f"resuming {rundir} after epoch {state['epoch']}", file=sys.stderr)
    DIST.barrier()  # every rank has read the run directory before rank 0 writes to it
    progress = Progress((epochs - state["epoch"]) * n_tasks * cfg.inner_steps, epochs)
    for epoch in range(state["epoch"], epochs):
        t0 = time.time()
        progress.epoch = epoch
        try:
            loss = None if args.method in UNTRAINED else train_epoch(
                model, opt, split, epoch, tok, args, cfg, progress)
        except FloatingPointError as e:
            progress.end_line()
            raise RunError(f"epoch {epoch + 1}: {e}; " + (f"the last good checkpoint (epoch {state['epoch']}) is in "
                           f"{rundir}" if state["epoch"] else "no epoch had finished, so there is no checkpoint"))
        progress.end_line()
        t1, diag = time.time(), {} if args.method == "abmll" else None
        try:
            val_rows = evaluate(model, split.test, "val", tok, args, cfg, diag=diag,
                                stream=("val", epoch))[("none", 0)]
        except (FloatingPointError, ValueError) as e:
            raise RunError(f"epoch {epoch + 1}, validation: {e}; " + (
                f"the last good checkpoint (epoch {state['epoch']}) is in {rundir}" if state["epoch"]
                else "no epoch had finished, so there is no checkpoint")) from None
        val = evaluation.metrics(val_rows)
        line = dict(epoch=epoch + 1, train_loss=loss, **{f"val_{k}": v for k, v in val.items() if k != "n"},
                    val_time_s=time.time() - t1, time_s=time.time() - t0)
        if diag:
            line["diag"] = diag
        state["history"].append(line)
        state["epoch"] = epoch + 1
        best = val["acc"] > state["best_acc"]
        if best:
            state["best_acc"], state["best_epoch"] = val["acc"], epoch + 1
            state["best_adapters"] = {k: v.detach().cpu().clone() for k, v in abmll.adapter_params(model).items()}
        if DIST.rank != 0:  # the same state on every rank; rank 0 alone prints and writes it
            continue
        print(f"epoch {epoch + 1}: train loss {'-' if loss is None else f'{loss:.4f}'} | val acc {val['acc']:.3f} "
              f"ece {val['ece']:.3f} nll {val['nll']:.3f} | {line['time_s']:.0f}s", file=sys.stderr)
        if best:
            evaluation.write_predictions(rundir / "predictions" / "val-0.jsonl.gz", val_rows)  # the best epoch's
        # metrics first: it is rebuilt from the whole history, and state.json is the commit point
        write_atomic(rundir / "metrics.jsonl",
                     lambda p: p.write_text("".join(json.dumps(h) + "\n" for h in state["history"])))
        save_checkpoint(rundir, model, opt, state)

    with torch.no_grad():  # the best validation epoch's adapters are the ones tested
        for k, p in abmll.adapter_params(model).items():
            p.copy_(state["best_adapters"][k])
    final = test_and_record(model, split, tok, args, cfg, rundir)
    final |= dict(best_epoch=state["best_epoch"], wall_s=sum(h["time_s"] for h in state["history"]))
    final = {k: final[k] for k in ("method", "split", "seed", "best_epoch")} | final  # the old key order
    if DIST.rank != 0:
        return final
    abmll.save_adapters(model, rundir / "adapters.safetensors") if args.method not in UNTRAINED else None
    write_atomic(rundir / "final.json", lambda p: p.write_text(json.dumps(final, indent=1)))
    print(f"{args.method} on {args.split} (seed {args.seed}): test accuracy {final['test_acc']:.3f}, "
          f"ECE {final['test_ece']:.3f}, NLL {final['test_nll']:.3f} over {final['n_test']} examples "
          f"(best epoch {final['best_epoch']}) -> {rundir}")
    return final


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    d = abmll.Config()
    p = argparse.ArgumentParser(description="Train and evaluate ABMLL and its baselines (Section 5).")
    p.add_argument("--method", default="abmll", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--split", default="nli", help="offline: cls, nli, para, mcqa, diag; MetaICL: cls-45, cls-23, nli, para, mcqa")
    p.add_argument("--model", default="smollm2-135m", help="built-in name or a Meta / HF directory or .gguf file")
    p.add_argument("--data-dir", default=None, help="MetaICL-layout data (default: the offline benchmark)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, adapters and episodes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="quick (CPU, minutes), compare "
                   "(quick with >= 1,000 test examples), paper (the paper's text) or official (the authors' code); "
                   "explicit flags override it")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--tasks-per-epoch", type=int, default=None, help="training tasks per epoch, a fresh seeded "
                   "sample each epoch (default: the preset's; paper: all)")
    p.add_argument("--max-examples", type=int, default=None, help="examples kept per training task")
    p.add_argument("--max-query", type=int, default=None, help="validation / test examples per held-out task")
    p.add_argument("--max-val", type=int, default=None, help="validation examples per held-out task "
                   "(default: --max-query)")
    p.add_argument("--max-held-out", type=int, default=None, help="only the first N held-out tasks (smoke runs; "
                   "default: all)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per example (long questions lose their start)")
    p.add_argument("--meta-batch", type=int, default=1, metavar="T", help="tasks per update, run side by side "
                   "(under torchrun, task j of each meta-batch on rank j %% world): ABMLL's theta step on the mean "
                   "of T tasks' outer gradients, Reptile's on the mean of their deltas, Regular / Structured LoRA "
                   "step k on the mean gradient of T tasks' (pooled episodes') batch k; an epoch's last meta-batch "
                   "is smaller when T does not divide its tasks; each task draws its own seeded noise; needs "
                   "--inner-opt fresh. Default 1: an update per task")
    p.add_argument("--fsdp", action="store_true", help="shard the frozen base with FSDP2 across ranks (torchrun, "
                   "more than one process); the adapters stay replicated, held-out tasks run on every rank")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps, help="K: steps per task and at test time")
    p.add_argument("--lr", type=float, default=None, help=f"Regular LoRA's learning rate (paper: {d.lr:g}; "
                   "default: the preset's, quick = 10x the paper's)")
    p.add_argument("--inner-lr", type=float, default=None, help=f"inner-loop / structured / test-time lr "
                   f"(paper: {d.inner_lr:g})")
    p.add_argument("--outer-lr", type=float, default=None, help=f"ABMLL's outer-step lr (paper: {d.outer_lr:g})")
    p.add_argument("--test-lr", type=float, default=None, help="test-time adaptation's lr, the same for every "
                   "method (default: --inner-lr)")
    p.add_argument("--reptile-eps", type=float, default=d.reptile_eps, help="Reptile's meta step size")
    p.add_argument("--beta", type=float, default=d.beta, help="weight of the KL and prior terms (Eq. 2)")
    p.add_argument("--log-c", type=float, default=-20.0, help="log-variance offset c (DESIGN.md)")
    p.add_argument("--a0", type=float, default=d.a0, help="Gamma prior shape")
    p.add_argument("--b0", type=float, default=d.b0, help="Gamma prior rate")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    # the paper's text vs the authors' code (README's table); defaults: the preset's
    p.add_argument("--targets", default=None, help=f"adapted linear layers, comma-separated, of {','.join(TARGETS)} "
                   "(paper: wq,wv,wo; authors: + w1,w2,w3)")
    p.add_argument("--noise", choices=abmll.NOISE, default=None, help="ABMLL's sample: on the weights (paper) or "
                   "on the adapted layers' outputs (authors)")
    p.add_argument("--kl", choices=abmll.KL, default=None, help="KL(q(phi)||p(phi|theta)): closed form, or the "
                   "authors' one-sample estimate (activation noise only)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW's (library 0.01, authors 0)")
    p.add_argument("--inner-opt", choices=["fresh", "persistent"], default=None, help="ABMLL's / Reptile's inner "
                   "AdamW: fresh per task, or one carried across tasks (authors); test time is always fresh")
    p.add_argument("--reptile-anneal", choices=["none", "linear"], default=None,
                   help="Reptile's eps: constant, or eps (1 - epoch / epochs) (authors)")
    p.add_argument("--prior-weight", choices=["beta", "beta/M"], default=None,
                   help="weight of -log p(theta): beta, or beta / number of training tasks (authors)")
    p.add_argument("--prompt", choices=sorted(data.PROMPTS), default=None, help="Appendix A.3's or the authors'")
    p.add_argument("--eval-noise", choices=["sample", "mean"], default=None,
                   help="ABMLL's scoring: --eval-samples samples (paper) or the posterior mean (authors)")
    p.add_argument("--outer-grad", choices=["kl", "fo"], default=None, help="theta's gradient: the KL and prior "
                   "(paper, authors), or + grad_phi NLL on a query batch (first-order MAML ablation)")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scaling alpha / rank)")
    p.add_argument("--eval-samples", type=int, default=1, help="weight samples averaged when scoring ABMLL")
    p.add_argument("--eval-batch", type=int, default=8, help="examples per scoring batch")
    p.add_argument("--prune", type=int, nargs="*", default=None, help="pruning study at these percents "
                   "(bare --prune: 0 1 10 20 30)")
    p.add_argument("--prune-mode", nargs="+", choices=evaluation.PRUNE_MODES, default=["activation"],
                   help="what --prune prunes, one or more of: activation (decoder-layer outputs), weight, adapted "
                   "(every adapted layer's outputs, the authors'), channel (whole hidden channels)")
    p.add_argument("--adapt-curve", type=int, nargs="+", default=None, metavar="K", help="also score the test "
                   "examples after K test-time steps for each K (e.g. 0 1 2 5 10), the same K for every method")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default="runs", help="root of the run directories")
    p.add_argument("--resume", action="store_true", help="continue the run in its directory")
    p.add_argument("--compare", action="store_true", help="run every method for each of --seeds (resumable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for --compare")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        p.error(f"--method: unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    if args.split not in data.PAPER_SPLITS and args.split not in data.OFFLINE_HELD_OUT:
        p.error(f"--split: unknown split {args.split!r}; the paper's: {', '.join(data.PAPER_SPLITS)}; "
                f"the offline benchmark's: {', '.join(data.OFFLINE_HELD_OUT)}")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        p.error(f"--targets: unknown module {unknown[0]!r}; choose from {','.join(TARGETS)}" if unknown
                else "--targets: name at least one module")
    if args.kl == "mc" and args.noise == "weight":
        p.error("--kl mc: the one-sample KL is the authors' estimate on the layer outputs; it needs --noise activation")
    for flag in ("epochs", "tasks_per_epoch", "max_examples", "max_query", "max_val", "inner_steps", "rank", "eval_samples",
                 "eval_batch", "max_len", "meta_batch"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    if args.adapt_curve is not None and min(args.adapt_curve) < 0:
        p.error(f"--adapt-curve: steps must be >= 0, got {args.adapt_curve}")
    if args.prune is not None and not args.prune:
        args.prune = list(evaluation.PRUNE_LEVELS)
    if args.prune is not None:
        if any(not 0 <= x < 100 for x in args.prune):
            p.error(f"--prune: percents must be in [0, 100), got {args.prune}")
        args.prune = sorted(set(args.prune))
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.dtype == "auto":
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    check_args(args, p)
    check_parallel(args, p, world_size())
    return args


def check_parallel(args, p, world: int):
    """--meta-batch, --fsdp and torchrun's world size together (exit 2)."""
    trains = args.compare or args.method not in UNTRAINED
    if args.fsdp and world == 1:
        p.error("--fsdp shards the base across ranks and needs more than one process: "
                "torchrun --nproc-per-node N train.py ...")
    if trains and world > args.meta_batch:
        p.error(f"world size {world} > --meta-batch {args.meta_batch}: a rank would have no task; pass "
                f"--meta-batch {world} or more (a multiple of {world} keeps every rank busy)")
    if trains and args.meta_batch > 1 and args.inner_opt == "persistent" and (
            args.compare or args.method in ("abmll", "reptile")):
        p.error(f"--inner-opt persistent carries one inner AdamW from task to task, which tasks run side by side "
                f"(--meta-batch {args.meta_batch}) do not have; pass --inner-opt fresh")
    if args.fsdp and args.prune and "weight" in args.prune_mode:
        p.error("--fsdp: --prune-mode weight ranks each whole weight matrix, which FSDP splits across ranks; "
                "prune another mode or run without --fsdp")


def check_args(args, p):
    """The numeric hyperparameters, once the presets have filled them: one line naming the flag (exit 2).
    Each test is written as `lo < v < hi`, which nan fails too."""
    inf = float("inf")
    if args.test_lr is None:
        args.test_lr = args.inner_lr
    if args.max_held_out is not None and args.max_held_out < 1:
        p.error(f"--max-held-out must be >= 1, got {args.max_held_out}")
    for k in ("lr", "inner_lr", "outer_lr", "test_lr", "a0", "b0", "alpha"):
        v = getattr(args, k)
        if not 0 < v < inf:
            p.error(f"--{k.replace('_', '-')} must be a finite number > 0, got {v}")
    for k in ("beta", "weight_decay"):
        v = getattr(args, k, 0.0)
        if not 0 <= v < inf:
            p.error(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v}")
    if not -inf < args.log_c < inf:
        p.error(f"--log-c must be a finite number, got {args.log_c}")
    if not 0 < args.reptile_eps <= 1:
        p.error(f"--reptile-eps must be in (0, 1], got {args.reptile_eps}")


def main(argv=None):
    global DIST
    args = parse_args(argv)
    if args.device == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        DIST = init_ranks(args)
        if not args.compare:
            run(args)
            return
        t0 = time.time()
        for seed in args.seeds:
            for method in METHODS:
                rundir = Path(args.out) / args.split / method / f"seed{seed}"
                if (rundir / "final.json").exists():
                    print(f"{rundir}: done, skipped", file=sys.stderr) if DIST.rank == 0 else None
                    continue
                run(argparse.Namespace(**{**vars(args), "method": method, "seed": seed, "resume": True}))
        if DIST.rank == 0:
            print(f"comparison on {args.split} finished in {(time.time() - t0) / 60:.1f} min; "
                  f"tables: python eval.py report {args.out}")
    except (RunError, OSError, SafetensorError, data.DataError) as e:  # a full disk at the last write too
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: continue with --resume (the last finished epoch is checkpointed)")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        DIST = Ranks()


if __name__ == "__main__":
    main()
