"""Where train.py's work runs: torchrun's processes, each task's noise stream, the device.

One process is the default; under torchrun (WORLD_SIZE > 1) every process is a rank and `DIST`
says which, set up from the environment as nanoGPT's train.py sets up DDP (init_process_group,
LOCAL_RANK's device, rank 0 the one that writes files and prints progress). Rank r runs task j of
every meta-batch with j % world == r, and held-out task n with n % world == r; one flat all-reduce
per update sums the ranks' gradients (`mean_update`, `mean_steps`: what DDP over T replicas would
do). --fsdp shards the frozen base (`shard`, FSDP2) while the adapters stay whole on every rank.

    torchrun --nproc-per-node 2 train.py --meta-batch 2 ...   # gloo on CPU, nccl on CUDA

main() sets `ranks.DIST = init_ranks(args)`; the other modules read `ranks.DIST` when they run.
"""

import os
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import abmll


@dataclass
class Ranks:
    """This process among torchrun's (WORLD_SIZE > 1), or the only one. Rank r runs task j of every
    meta-batch with j % world == r and held-out task n with n % world == r (all of them under
    --fsdp, whose sharded forwards run in lockstep on every rank); only rank 0 writes files and
    prints progress."""

    rank: int = 0
    world: int = 1
    local: int = 0
    fsdp: bool = False

    def mine(self, n: int) -> bool:
        """Whether held-out task n is this rank's."""
        return self.fsdp or n % self.world == self.rank

    def gathered(self, items: list, held_out: bool = False) -> list:
        """[(n, value)] of every rank, sorted by n: each rank's share of the training tasks' losses,
        or of the held-out tasks' rows (which under --fsdp every rank has already)."""
        if self.world == 1 or held_out and self.fsdp:
            return items
        out = [None] * self.world
        dist.all_gather_object(out, items)
        return sorted((x for part in out for x in part), key=lambda x: x[0])

    def sum_(self, tensors: list, err: Exception | None = None):
        """Sum `tensors` over the ranks in place, one flat all-reduce that also carries whether any
        rank hit a non-finite loss: then every rank raises (its own error or another rank's) before
        an adapter moves."""
        bad = err is not None
        if self.world > 1:
            flags = tensors[0].new_full((1,), float(bad))
            flat = torch.cat([t.reshape(-1) for t in tensors] + [flags])  # (sum of numels + 1,)
            dist.all_reduce(flat)
            bad = bool(flat[-1] > 0)
            parts = flat[:-1].split([t.numel() for t in tensors]) if not bad else ()
            for t, f in zip(tensors, parts):
                t.copy_(f.view_as(t))
        if err is not None:
            raise err
        if bad:
            raise FloatingPointError("non-finite loss on another rank: training stopped, adapters "
                                     "kept at their last good values")

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    @contextmanager
    def first(self):
        """Each node's local rank 0 runs the block (fetching and caching the model and data) before
        the others."""
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
    """torch.distributed for torchrun's processes: gloo on CPU, nccl on CUDA (cuda:LOCAL_RANK)."""
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
    """Tasks run side by side (--meta-batch > 1 or several processes): each draws its own noise."""
    return args.meta_batch > 1 or DIST.world > 1


@contextmanager
def task_stream(args, *key):
    """Torch's CPU generator (where every noise seed is drawn) seeded by (seed, *key) inside the
    block and restored after it, when tasks run in parallel, so that whichever rank runs a task
    draws what one process draws; otherwise the run's single stream, as on one process with
    --meta-batch 1."""
    if not parallel(args):
        yield
        return
    with torch.random.fork_rng(devices=[]):
        seed = random.Random("-".join(map(str, (args.seed, *key)))).getrandbits(63)
        torch.default_generator.manual_seed(seed)
        yield


# -----------------------------------------------------------------------------
# a meta-batch's one update: the mean over its tasks, one all-reduce across the ranks


def mean_update(model, opt, mine, n, epoch, args, cfg) -> list:
    """ABMLL's one theta step or Reptile's one meta step from this rank's tasks `mine`, [(i, task,
    batches, query)], of a meta-batch of n (train.py's train_meta_batches):
        ABMLL    theta <- AdamW(1/n sum_t grad_theta beta [KL(q(phi_t) || p(phi_t|theta))
                 + prior_scale (-log p(theta))] (+ FOMAML's query terms)), each phi_t K inner
                 steps from theta; then phi <- theta
        Reptile  theta <- theta + eps 1/n sum_t (theta_t - theta), each theta_t K steps from theta
    Task i draws its noise from the stream (seed, epoch, i). Returns [(i, its step losses)]."""
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


def mean_steps(model, opt, mine, n, K) -> list:
    """Regular / Structured LoRA on this rank's tasks of a meta-batch of n: K AdamW steps, step k's
    gradient the mean over the n tasks' (pooled episodes') batch k,
        grad_k = 1/n sum_t grad NLL(batch k of task t).
    Returns [(i, its step losses)]."""
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


# -----------------------------------------------------------------------------
# FSDP2 and the device


def shard(model):
    """--fsdp: FSDP2's fully_shard on every decoder layer, then on the rest (embeddings, norm,
    head): the frozen base is split across the ranks and gathered a layer at a time; the adapters
    stay whole on every rank (ignored_params), as the meta-batch's all-reduce expects."""
    from torch.distributed.fsdp import fully_shard

    keep = set(abmll.adapter_params(model).values())
    for layer in model.layers:
        fully_shard(layer, ignored_params=keep & set(layer.parameters()))
    fully_shard(model, ignored_params=keep)
    return model


def autocast(args):
    # bf16 autocast on CUDA; on CPU fp32 unless asked (the adapters' noise path stays apart)
    if args.dtype != "bf16":
        return nullcontext()
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)


def to_device(batch, args):
    return {k: v.to(args.device) for k, v in batch.items()}
