"""Train and evaluate one method on one split: the experiments of Section 5 of the paper.

    python train.py --method abmll --split nli             # defaults: SmolLM2-135M, offline nli
    python train.py --method reptile --split nli --seed 1 --prune
    python train.py --compare --split nli --seeds 0 1 2 --prune  # five methods x seeds, resumable
    python train.py --method abmll --split cls-45 --data-dir ~/MetaICL/data \\
        --model ~/Meta-Llama-3-8B-Instruct --preset paper --device cuda  # the paper's, on a GPU
    python eval.py report runs                     # tables and curves from the run directories

An epoch is one sweep over the training tasks, K = 5 batches of 2 from each (Regular LoRA takes
the same number of steps on pooled, shuffled batches). After every epoch the held-out tasks'
validation examples are scored after test-time adaptation on their support batches (heldout.py);
the adapters of the best validation-accuracy epoch are scored on the test examples at the end.
Every epoch leaves a checkpoint (adapters, optimizer state, RNG state, metrics) written
atomically (resume.py), so `--resume` continues a killed run and ends exactly where an
uninterrupted one would. Run directories are laid out as rundir.py's docstring says:
{out}/{split}/{method}/seed{seed}/. The flags and presets are flags.py's (built on abmll.Config);
torchrun's processes and --meta-batch's mean update are ranks.py's.

The shape is nanoGPT's train.py: an epoch of every method's updates (`train_epoch`, a task at a
time; `train_meta_batches`, T at a time), and the one training loop in plain sight (`run`: 1)
train, 2) validate, 3) keep the best, 4) checkpoint), its setup and its end in helpers around it.
"""

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

import abmll
import data
import eval as evaluation
import fetch
import heldout
import llama
import ranks
from flags import METHODS, RUN_ONLY, TEST_ONLY, UNTRAINED, parse_args
from ranks import autocast, to_device
from resume import RunError, load_checkpoint, save_checkpoint, write_atomic, write_json
from tokenizer import Tokenizer


def config(args) -> abmll.Config:
    """The method's hyperparameters: every field of abmll.Config that is a flag has its value."""
    fields = [f.name for f in dataclasses.fields(abmll.Config) if hasattr(args, f.name)]
    return abmll.Config(**{k: getattr(args, k) for k in fields})


# -----------------------------------------------------------------------------
# one epoch of each method


def epoch_tasks(split, epoch, args, cfg):
    """[(task, [batch of cfg.batch_size examples] * K, query batch or None)] for this epoch; the
    query batch only for FOMAML's outer gradient. Regular LoRA gets pooled, shuffled batches."""
    fo, b = args.method == "abmll" and cfg.outer_grad == "fo", cfg.batch_size
    episodes = list(data.epoch_episodes(split.train, epoch, args.seed, cfg.inner_steps, b,
                                        query_batch=fo))
    episodes = episodes[:args.tasks_per_epoch]  # the order is shuffled by (seed, epoch)
    if args.method != "lora":
        return episodes
    pool = [e for t in sorted(split.train) for e in split.train[t]]
    rng = random.Random(f"{args.seed}-{epoch}-pooled")
    k = b * cfg.inner_steps
    need = k * len(episodes)  # as many steps as the meta-learners take
    picks = rng.sample(pool, need) if len(pool) >= need else [rng.choice(pool) for _ in range(need)]
    return [("pooled", [picks[j:j + b] for j in range(i, i + k, b)], None)
            for i in range(0, need, k)]


def task_batches(support, query, tok, args):
    """A training task's K support batches and its query batch (or None), collated on the device."""
    def to(b):
        return to_device(data.collate(b, tok, args.max_len, args.prompt), args)
    return [to(b) for b in support], None if query is None else to(query)


def show(bar, task, steps, loss):
    """The progress bar (rank 0): `steps` more done, the last task and its last step's loss."""
    bar.set_postfix_str(f"task {task[:32]:32s} | loss {loss:.4f}", refresh=False)
    bar.update(steps)


def train_epoch(model, opt, split, epoch, tok, args, cfg, bar) -> tuple[float, int]:
    """One sweep over the epoch's training tasks, an update per task: returns the mean loss over
    every step and the tokens of the training batches (padding included: what the device computes;
    this rank's)."""
    losses, tokens = [], 0
    inner_opt = opt if args.inner_opt == "persistent" else None  # see build()
    if args.reptile_anneal == "linear":  # the authors' Reptile: eps = eps0 (1 - epoch / epochs)
        cfg = dataclasses.replace(cfg, reptile_eps=cfg.reptile_eps * (1 - epoch / args.epochs))
    if args.meta_batch > 1:
        return train_meta_batches(model, opt, split, epoch, tok, args, cfg, bar)
    for task, support, query in epoch_tasks(split, epoch, args, cfg):
        batches, query = task_batches(support, query, tok, args)
        tokens += sum(b["tokens"].numel() for b in batches)
        with autocast(args):
            if args.method in ("lora", "structured"):  # persistent optimizer, no reset
                step_losses = [abmll.lora_step(model, opt, b) for b in batches]
            elif args.method == "reptile":
                step_losses = abmll.reptile_task(model, batches, cfg, inner_opt)
            else:  # abmll: K inner steps on phi, one outer step on theta, phi <- theta
                step_losses = abmll.abmll_task(model, opt, batches, cfg, inner_opt, query)["inner"]
        losses += step_losses
        show(bar, task, len(batches), step_losses[-1])
    return sum(losses) / max(len(losses), 1), tokens


def train_meta_batches(model, opt, split, epoch, tok, args, cfg, bar) -> tuple[float, int]:
    """--meta-batch T: the epoch's tasks in meta-batches of T consecutive ones (the last smaller
    when T does not divide them), task j of each on rank j % world, one update per meta-batch from
    the mean over its tasks, summed across the ranks in one all-reduce (ranks.mean_update /
    ranks.mean_steps, what DDP over T replicas would do). Task i of the epoch draws noise from its
    own stream (seed, epoch, i), so any number of ranks computes what one process computes."""
    T, K, done, tokens, r = args.meta_batch, cfg.inner_steps, [], 0, ranks.DIST
    episodes = list(enumerate(epoch_tasks(split, epoch, args, cfg)))
    for start in range(0, len(episodes), T):
        group = episodes[start:start + T]
        mine = [(i, task, *task_batches(support, query, tok, args))
                for j, (i, (task, support, query)) in enumerate(group) if j % r.world == r.rank]
        tokens += sum(b["tokens"].numel() for *_, batches, _ in mine for b in batches)
        with autocast(args):
            if args.method in ("lora", "structured"):
                losses = ranks.mean_steps(model, opt, mine, len(group), K)
            else:
                losses = ranks.mean_update(model, opt, mine, len(group), epoch, args, cfg)
        done += losses
        last = losses[-1][1][-1] if losses else float("nan")
        show(bar, mine[-1][1] if mine else "", K * len(group), last)
    losses = [x for _, ls in r.gathered(done) for x in ls]  # every rank's, in task order
    return sum(losses) / max(len(losses), 1), tokens


# -----------------------------------------------------------------------------
# one run: setup, the training loop, the test


def build(args, cfg):
    """The model (random weights of the --model shape under --random-init), its tokenizer, the
    method's adapters and its optimizer."""
    # fp32 unless bf16 on a GPU, whatever dtype the checkpoint stores
    gpu_bf16 = args.dtype == "bf16" and not args.device.startswith("cpu")
    dtype = torch.bfloat16 if gpu_bf16 else torch.float32
    if args.random_init:  # the named shape (parse_args checked it), weights drawn from --seed
        margs = llama.ModelArgs.from_name(args.model)
        if margs.vocab_size < 512:
            raise RunError(f"--random-init: --model {args.model} has {margs.vocab_size} tokens, "
                           f"fewer than the byte-level tokenizer's 512")
        model = llama.random_model(margs, args.device, dtype, args.seed)
        tok = Tokenizer.byte_level()
    else:
        try:
            path = fetch.resolve_model(args.model)
            model, tok = llama.load(path, device=args.device, dtype=dtype)
        except (llama.LoadError, fetch.FetchError) as e:
            raise RunError(f"--model: {e}") from None
    check_model(model, tok, args)
    if args.method != "pretrained":  # adapters are fp32 whatever the base dtype
        abmll.inject(model, "abmll" if args.method == "abmll" else "lora", targets=cfg.targets,
                     rank=cfg.rank, alpha=cfg.alpha, log_c=cfg.log_c, noise=cfg.noise, kl=cfg.kl)
    groups, wd, opt, inner_opt = abmll.param_groups(model), cfg.weight_decay, None, args.inner_opt
    if args.method == "lora":
        opt = torch.optim.AdamW(groups["lora"].values(), lr=cfg.lr, weight_decay=wd)
    elif args.method == "structured" or (args.method == "reptile" and inner_opt == "persistent"):
        opt = torch.optim.AdamW(groups["lora"].values(), lr=cfg.inner_lr, weight_decay=wd)
    elif args.method == "abmll" and cfg.outer_opt == "sgd":  # flags.py: inner AdamW fresh
        opt = torch.optim.SGD(groups["theta"].values(), lr=cfg.outer_lr)
    elif args.method == "abmll":
        # a persistent inner optimizer is a second group of the same AdamW: a parameter without a
        # gradient is skipped, so inner steps move phi and outer steps theta, each with its own
        # state, as two AdamWs would; one optimizer state is then what a checkpoint holds
        inner = [{"params": list(groups["phi"].values()), "lr": cfg.inner_lr}]
        outer = {"params": list(groups["theta"].values()), "lr": cfg.outer_lr}
        opt = torch.optim.AdamW([outer, *inner * (inner_opt == "persistent")], weight_decay=wd)
    return model, tok, opt


def check_model(model, tok, args):
    """What the run needs of the model, said before any training: a tokenizer, single-token answer
    letters, a context as long as --max-len."""
    if tok is None:
        raise RunError(f"--model {args.model}: no tokenizer beside the weights")
    try:
        data.letter_tokens(tok)
    except data.DataError as e:
        raise RunError(f"--model {args.model}: {e}") from None
    if args.max_len > model.args.max_seq_len:  # now, not when a long prompt first reaches the model
        raise RunError(f"--max-len {args.max_len} exceeds the context of --model {args.model} "
                       f"({model.args.max_seq_len} tokens)")


def load_split(args, tok) -> data.Split:
    if args.random_init:
        return data.synthetic_split(args)
    try:
        return data.load_split(args.split, args.data_dir, tok, args.max_len, args.seed,
                               k_shot=args.inner_steps, max_examples=args.max_examples,
                               max_query=args.max_query, max_val=args.max_val)
    except (data.DataError, fetch.FetchError) as e:
        raise RunError(f"--split {args.split}: {e}") from None


def tasks_per_epoch(split, args) -> int:
    return min(len(split.train), args.tasks_per_epoch or len(split.train))


def setup(args, cfg, rundir: Path):
    """The run's model, tokenizer, optimizer and split, and its directory with data_report.json."""
    if (rundir / "state.json").exists() and not args.resume:
        raise RunError(f"{rundir} already holds a run: pass --resume to continue it or --out "
                       f"elsewhere")
    torch.manual_seed(args.seed)
    with ranks.DIST.first():  # under torchrun one process per node fetches, the others find it
        model, tok, opt = build(args, cfg)
        split = load_split(args, tok)
    n, T, world = tasks_per_epoch(split, args), args.meta_batch, ranks.DIST.world
    if ranks.DIST.fsdp and args.method not in UNTRAINED:  # a rank with fewer tasks would hang
        idle = [m for m in (min(T, n - i) for i in range(0, n, T)) if m % world]
        if idle:
            raise RunError(f"--fsdp: every rank must run as many tasks as the others (sharded "
                           f"forwards run in lockstep), but {n} tasks an epoch in meta-batches of "
                           f"{T} leave {idle[0]} for {world} ranks; choose --meta-batch and "
                           f"--tasks-per-epoch as multiples of {world}")
    if ranks.DIST.fsdp:
        ranks.shard(model)
    if args.max_held_out:
        split.held_out = dict(list(split.held_out.items())[:args.max_held_out])
    rundir.mkdir(parents=True, exist_ok=True)
    if ranks.DIST.rank == 0:
        data.save_report(split, rundir / "data_report.json")  # what was kept and dropped per task
    return model, tok, opt, split


def adapters(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in abmll.adapter_params(model).items()}


def start(args, rundir: Path, model, opt, epochs: int) -> dict:
    """The run's state: a fresh one (config.json written), or with --resume the checkpoint's, once
    config.json shows that the run's flags are the same."""
    flags = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}  # config.json
    resume, changed = args.resume and (rundir / "state.json").exists(), []
    if resume:
        try:
            old = json.loads((rundir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{rundir}/config.json: cannot read ({e}); continue elsewhere with "
                           f"--out") from None
        changed = [k for k in flags if k in old and old[k] != flags[k]]
        fixed = [k for k in changed if k not in TEST_ONLY]
        if fixed:
            k = fixed[0]
            raise RunError(f"{rundir}: --{k.replace('_', '-')} was {old[k]!r}, now {flags[k]!r}; "
                           f"resume with the run's flags or use another --out")
    if (not resume or changed) and ranks.DIST.rank == 0:  # a test-only flag changed: recorded
        write_json(rundir / "config.json", flags)
    state = {"epoch": 0, "best_acc": -1.0, "best_epoch": -1, "history": [],
             "best_adapters": adapters(model)}
    if resume:
        state = load_checkpoint(rundir, model, opt, epochs)  # every problem: one RunError
        if ranks.DIST.rank == 0:
            print(f"resuming {rundir} after epoch {state['epoch']}", file=sys.stderr)
    ranks.DIST.barrier()  # every rank has read the run directory before rank 0 writes to it
    return state


@contextmanager
def stops(where: str, rundir: Path, state: dict, errors=(FloatingPointError,)):
    """A non-finite loss (or a bad value) inside the block ends the run in one line that says
    where, and which checkpoint is left."""
    try:
        yield
    except errors as e:
        left = (f"the last good checkpoint (epoch {state['epoch']}) is in {rundir}"
                if state["epoch"] else "no epoch had finished, so there is no checkpoint")
        raise RunError(f"{where}: {e}; {left}") from None


def speed_report(args, steps: int, tokens: int, train_s: float, run_s: float) -> dict:
    """speed.json: the training steps' throughput of this process's epochs (a resumed run counts
    those after the resume; under torchrun, this rank's tasks), and on CUDA the run's peak of
    allocated and reserved memory (torch.cuda.max_memory_allocated / max_memory_reserved: weights,
    adapters, optimizer state, activations)."""
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = {"model": args.model, "random_init": args.random_init, "method": args.method,
           "device": args.device, "device_name": name, "dtype": args.dtype,
           "torch": torch.__version__, "max_len": args.max_len, "train_steps": steps,
           "train_tokens": tokens, "train_s": train_s, "run_s": run_s,
           "train_steps_per_s": steps / train_s if train_s else None,
           "train_tokens_per_s": tokens / train_s if train_s else None}
    if dev.type == "cuda":
        out |= {"cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
                "cuda_peak_reserved_bytes": torch.cuda.max_memory_reserved(dev)}
    return out


def finish(model, split, tok, args, cfg, rundir: Path, state: dict, speed: dict, t_run) -> dict:
    """The best validation epoch's adapters tested; final.json, adapters.safetensors and
    speed.json written (rank 0). Returns final.json's content."""
    with torch.no_grad():  # the best validation epoch's adapters are the ones tested
        for k, p in abmll.adapter_params(model).items():
            p.copy_(state["best_adapters"][k])
    final = heldout.test_and_record(model, split, tok, args, cfg, rundir)
    final |= dict(best_epoch=state["best_epoch"], wall_s=sum(h["time_s"] for h in state["history"]))
    final = {k: final[k] for k in ("method", "split", "seed", "best_epoch")} | final  # key order
    if ranks.DIST.rank != 0:
        return final
    if args.method not in UNTRAINED:
        abmll.save_adapters(model, rundir / "adapters.safetensors")
    if speed["steps"] or not (rundir / "speed.json").exists():  # a re-test keeps training's
        write_json(rundir / "speed.json", speed_report(args, **speed, run_s=time.time() - t_run))
    write_json(rundir / "final.json", final)
    print(f"{args.method} on {args.split} (seed {args.seed}): test accuracy "
          f"{final['test_acc']:.3f}, ECE {final['test_ece']:.3f}, NLL {final['test_nll']:.3f} over "
          f"{final['n_test']} examples (best epoch {final['best_epoch']}) -> {rundir}")
    return final


def run_dir(out, split, method, seed) -> Path:
    return Path(out) / split / method / f"seed{seed}"


def run(args) -> dict:
    """Train (unless Pretrained), validate every epoch, test the best epoch; returns final.json's
    content. The loop of Algorithm 1 over epochs, each: 1) one sweep over the training tasks,
    2) validation after test-time adaptation, 3) the best epoch's adapters kept, 4) a checkpoint."""
    t_run, cfg = time.time(), config(args)
    rundir = run_dir(args.out, args.split, args.method, args.seed)
    model, tok, opt, split = setup(args, cfg, rundir)
    if args.prior_weight == "beta/M":  # the authors weight -log p(theta) by beta / M training tasks
        cfg.prior_scale = 1 / len(split.train)
    trains, rank0 = args.method not in UNTRAINED, ranks.DIST.rank == 0
    epochs = args.epochs if trains else 1
    state = start(args, rundir, model, opt, epochs)
    per_epoch = tasks_per_epoch(split, args) * cfg.inner_steps if trains else 0  # training steps
    speed = dict(steps=(epochs - state["epoch"]) * per_epoch, tokens=0, train_s=0.0)
    # rank 0's one live line; off a terminal (a log file) a line every 10 s rather than 10 a second
    desc = f"epoch {state['epoch'] + 1}/{epochs}" if state["epoch"] < epochs else "re-test"
    bar = tqdm(total=speed["steps"], desc=desc, unit="step", disable=not (rank0 and trains),
               file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10)
    with bar:
        for epoch in range(state["epoch"], epochs):
            t0, where, loss = time.time(), f"epoch {epoch + 1}", None
            bar.set_description(f"{where}/{epochs}")
            # 1) train: one sweep over the epoch's tasks (a NaN ends in one line, adapters kept)
            if trains:
                with stops(where, rundir, state):
                    loss, tokens = train_epoch(model, opt, split, epoch, tok, args, cfg, bar)
                speed["tokens"] += tokens
            t1 = time.time()
            speed["train_s"] += t1 - t0 if trains else 0.0
            # 2) validate: the held-out tasks' validation examples after test-time adaptation
            diag = {} if args.method == "abmll" else None
            with stops(f"{where}, validation", rundir, state, (FloatingPointError, ValueError)):
                val_rows = heldout.evaluate(model, split.held_out, "val", tok, args, cfg, diag=diag,
                                            stream=("val", epoch))[("none", 0)]
            val = evaluation.metrics(val_rows)
            line = dict(epoch=epoch + 1, train_loss=loss,
                        **{f"val_{k}": v for k, v in val.items() if k != "n"},
                        val_time_s=time.time() - t1, time_s=time.time() - t0)
            if diag:
                line["diag"] = diag
            state["history"].append(line)
            state["epoch"] = epoch + 1
            # 3) the best validation epoch's adapters are the ones tested at the end
            best = val["acc"] > state["best_acc"]
            if best:
                state["best_acc"], state["best_epoch"] = val["acc"], epoch + 1
                state["best_adapters"] = adapters(model)
            if not rank0:  # the same state on every rank; rank 0 alone prints and writes it
                continue
            bar.write(f"{where}: train loss {'-' if loss is None else f'{loss:.4f}'} | val acc "
                      f"{val['acc']:.3f} ece {val['ece']:.3f} nll {val['nll']:.3f} | "
                      f"{line['time_s']:.0f}s", file=sys.stderr)
            if best:  # the best epoch's validation rows
                evaluation.write_predictions(rundir / "predictions" / "val-0.jsonl.gz", val_rows)
            # 4) checkpoint: metrics first (rebuilt from the whole history), state.json commits
            write_atomic(rundir / "metrics.jsonl", lambda p: p.write_text(
                "".join(json.dumps(h) + "\n" for h in state["history"])))
            save_checkpoint(rundir, model, opt, state)
    return finish(model, split, tok, args, cfg, rundir, state, speed, t_run)


# -----------------------------------------------------------------------------
# the command line: flags.py's flags, one run or the whole comparison


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        ranks.DIST = ranks.init_ranks(args)
        if not args.compare:
            run(args)
            return
        t0, rank0 = time.time(), ranks.DIST.rank == 0
        for seed in args.seeds:
            for method in METHODS:
                rundir = run_dir(args.out, args.split, method, seed)
                if (rundir / "final.json").exists():
                    print(f"{rundir}: done, skipped", file=sys.stderr) if rank0 else None
                    continue
                run(argparse.Namespace(**{**vars(args), "method": method, "seed": seed,
                                          "resume": True}))
        if rank0:
            print(f"comparison on {args.split} finished in {(time.time() - t0) / 60:.1f} min; "
                  f"tables: python eval.py report {args.out}")
    except (RunError, OSError, SafetensorError, data.DataError) as e:  # a full disk at the end too
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: continue with --resume (the last finished epoch is checkpointed)")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        ranks.DIST = ranks.Ranks()


if __name__ == "__main__":
    main()
