"""Amortized Bayesian Meta-Learning for LoRA (ABMLL): the objective and every update rule.

Section 4, Eq. 2 and Algorithm 1 of the paper, and the baselines' steps, in reading order:
Config -> the weight-space terms of Eq. 2 -> inject / save / load -> update rules -> Algorithm 1
(`abmll_task`, in plain sight as nanoGPT's training step) -> its test section. The adapters it
trains, LoRALinear and BayesLoRALinear, are in lora.py (their kernels in kernels.py); the PEFT
names in hf.py. How we read the paper where it is ambiguous: docs/design.md.

    abmll.inject(model, "abmll")                                   # wq, wv, wo; rank 8, alpha 16
    outer = torch.optim.AdamW(abmll.param_groups(model)["theta"].values(), lr=cfg.outer_lr)
    abmll.abmll_task(model, outer, task_batches, cfg)              # one task of Algorithm 1
    with abmll.adapted(model, support_batches, cfg):               # test: adapt, score, restore
        probs = abmll.predictive_probs(model, query_batch, letters)

A batch is a dict with `tokens` (B, T), `answer_pos` (B,) and `answer_ids` (B,) (data.py).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import hf
import llama
from lora import BayesLoRALinear, LoRALinear, check_options


@dataclass
class Config:
    """Every hyperparameter of the method, the paper's names and defaults (Sections 4, 5.1.1)."""

    rank: int = 8  # r of every adapter pair
    alpha: float = 16  # scaling s = alpha / r
    log_c: float = -20.0  # log sigma^2 = s B A + log_c: the paper's "+ cI, c = e^-20"
    targets: tuple = ("wq", "wv", "wo")  # adapted linear layers of every decoder layer (Table 6)
    noise: str = "weight"  # lora.NOISE: on the weights (paper) or on the layer outputs (authors)
    kl: str = "closed"  # lora.KL: closed form, or the authors' one-sample estimate
    batch_size: int = 2  # examples per batch: training, support and test-time batches
    inner_steps: int = 5  # K: batches per task, in the inner loop and at test time
    lr: float = 5e-5  # Regular LoRA
    inner_lr: float = 1e-5  # Structured LoRA, Reptile's / ABMLL's inner loops, test-time adaptation
    outer_lr: float = 5e-5  # ABMLL's outer step on theta
    reptile_eps: float = 0.5
    reptile_factors: str = "AB"  # Reptile's meta step moves both factors; "B": A held (an ablation)
    beta: float = 1e-8  # tempers the weight-space terms, ~1e6 per weight entry (Eq. 2)
    a0: float = 1.0  # Gamma prior on the precision 1/sigma^2: shape
    b0: float = 0.01  # and rate
    weight_decay: float = 0.01  # torch's AdamW default; the paper names no decay (authors: 0)
    prior_scale: float = 1.0  # the prior's weight is beta * prior_scale: 1 (paper), 1 / M (authors)
    outer_grad: str = "kl"  # "kl": theta moves by the KL and prior; "fo": + grad_phi NLL(query)
    outer_opt: str = "adamw"  # theta's optimizer: AdamW (paper, authors) or plain SGD (an ablation:
    # AdamW's step is ~lr sign(g) whatever beta; SGD's is lr beta grad, so beta x lr sets its size)


# -----------------------------------------------------------------------------
# the weight-space terms of Eq. 2: per entry (the reference), and summed over a model's layers


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, e^lv_q) || N(mu_p, e^lv_p)) per entry
        = ½ [lv_p - lv_q + (e^lv_q + (mu_q - mu_p)^2) / e^lv_p - 1]."""
    ratio = torch.exp(logvar_q - logvar_p)
    return 0.5 * (logvar_p - logvar_q + ratio + (mu_q - mu_p) ** 2 * torch.exp(-logvar_p) - 1)


def neg_log_prior(mu, logvar, a0: float = 1.0, b0: float = 0.01):
    """-log [N(mu; 0, 1) Gamma(tau; a0, b0)] per entry, tau = 1/sigma^2 = e^-logvar, shape a0, rate b0:
        ½ mu^2 + ½ log 2pi - a0 log b0 + lgamma(a0) - (a0 - 1) log tau + b0 tau."""
    const = 0.5 * math.log(2 * math.pi) - a0 * math.log(b0) + math.lgamma(a0)
    return 0.5 * mu**2 + const + (a0 - 1) * logvar + b0 * torch.exp(-logvar)


def bayes_layers(model) -> list[BayesLoRALinear]:
    return [m for m in model.modules() if isinstance(m, BayesLoRALinear)]


def model_kl(model, wrt: str | None = None):
    """KL(q(phi|D) || p(phi|theta)) over all adapted layers, an fp64 scalar (BayesLoRALinear.kl)."""
    return sum(m.kl(wrt) for m in bayes_layers(model))


def model_neg_log_prior(model, a0: float = 1.0, b0: float = 0.01):
    """-log p(theta) over all adapted layers: the paper's KL(q(theta) || p(theta)), after Ravi &
    Beatson."""
    return sum(m.neg_log_prior(a0, b0) for m in bayes_layers(model))


@contextmanager
def bayes_mode(model, mode: str):
    """Every BayesLoRALinear runs in `mode` ("sample" or "mean") inside the block, as before after
    it."""
    old = {m: m.mode for m in bayes_layers(model)}
    try:
        for m in old:
            m.mode = mode
        yield model
    finally:
        for m, o in old.items():
            m.mode = o


# -----------------------------------------------------------------------------
# injecting, grouping, saving and loading adapters


def inject(model, method: str, targets=Config.targets, rank: int = Config.rank,
           alpha: float = Config.alpha, log_c: float = Config.log_c, noise: str = Config.noise,
           kl: str = Config.kl):
    """Replace the nn.Linear modules named in `targets` by LoRALinear ("lora") or BayesLoRALinear
    ("abmll", with its `noise` and `kl`), in place, and freeze everything else. The paper's targets
    are wq, wv, wo (Table 6); the authors' code adds the MLP's w1, w2, w3. Returns the model."""
    if method not in ("lora", "abmll"):
        raise ValueError(f"unknown method {method!r}: adapters are 'lora' or 'abmll'")
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if method == "abmll":  # before any module is replaced
        check_options(noise, kl)
    found = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in targets]
    for t in targets:
        if not any(n.rpartition(".")[2] == t for n, _ in found):
            raise ValueError(f"target module {t!r} not found in the model")
    for n, m in found:
        if type(m) not in (nn.Linear, llama.Linear):
            raise ValueError(f"target {n!r} is a {type(m).__name__}, not an nn.Linear "
                             "(adapters already injected?)")
    model.requires_grad_(False)
    for n, m in found:
        parent, _, leaf = n.rpartition(".")
        if method == "lora":
            new = LoRALinear(m, rank, alpha)
        else:
            new = BayesLoRALinear(m, rank, alpha, log_c, noise, kl)
        setattr(model.get_submodule(parent), leaf, new)
    return model


def param_groups(model) -> dict[str, dict[str, nn.Parameter]]:
    """Adapter parameters by name: {"lora": ...}, or {"theta": ..., "phi": ...}."""
    groups = {}
    for name, p in model.named_parameters():
        leaf = name.rpartition(".")[2]
        group = "lora" if leaf.startswith("lora_") else leaf.split("_")[0]
        if group in ("lora", "theta", "phi"):
            groups.setdefault(group, {})[name] = p
    return groups


def adapter_params(model) -> dict[str, nn.Parameter]:
    return {k: p for group in param_groups(model).values() for k, p in group.items()}


def save_adapters(model, path):
    """The adapters only, never the base weights, as safetensors."""
    save_file({k: p.detach().contiguous() for k, p in adapter_params(model).items()}, str(path))


@torch.no_grad()
def load_adapters(model, path):
    """Adapters saved by `save_adapters`; their keys and shapes must match the model's exactly."""
    own = adapter_params(model)
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: cannot read adapters ({e})") from None
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, p in own.items():
        if state[k].shape != p.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, "
                             f"the model's is {tuple(p.shape)}")
        p.copy_(state[k])


def save_peft(model, out_dir, source: str = "theta"):
    """A PEFT LoRA adapter for the matching transformers LlamaForCausalLM (hf.write_peft): LoRA
    layers export A and B; ABMLL layers the posterior mean mu = s B A of `source` ("theta", or "phi"
    after test-time adaptation)."""
    kinds = (LoRALinear, BayesLoRALinear)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    if not layers:
        raise ValueError("save_peft: the model has no adapters (inject them first)")
    factors = {n: (m.lora_B, m.lora_A) if isinstance(m, LoRALinear) else m.pairs(source)[:2]
               for n, m in layers}
    return hf.write_peft(out_dir, factors, model.args, layers[-1][1].rank, layers[-1][1].alpha)


# -----------------------------------------------------------------------------
# losses and update rules, shared by train.py and test-time adaptation


def nll_loss(model, batch):
    """-log p(D|phi): cross-entropy of the answer letter over the whole vocabulary, batch mean."""
    logits = model(batch["tokens"], logits_at=batch["answer_pos"][:, None])[:, 0]  # (B, V)
    return F.cross_entropy(logits.float(), batch["answer_ids"])


@torch.no_grad()
def predictive_probs(model, batch, choices=None, samples: int = 1):
    """p(y|x) ~ 1/S sum_s softmax(logits(x; phi_s)), the S-sample predictive, in the layers' current
    mode. choices (B, C) restricts the softmax to those token ids (the example's letters); ids < 0
    are padding."""
    probs = 0.0
    for _ in range(samples):
        logits = model(batch["tokens"], logits_at=batch["answer_pos"][:, None])[:, 0].float()  # (B, V)
        if choices is not None:
            logits = logits.gather(1, choices.clamp(min=0))  # (B, C)
            logits = logits.masked_fill(choices < 0, float("-inf"))
        probs = probs + logits.softmax(-1)
    return probs / samples


def check_finite(loss):
    """A non-finite loss (NLL or KL) stops training before any adapter moves: FloatingPointError."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}): training stopped, "
                                 "adapters kept at their last good values")


def _step(opt, loss, extra: dict | None = None) -> float:
    """One optimizer step; a non-finite loss (NLL or KL) stops before any adapter changes. `extra`
    maps parameters to gradients added after backward (FOMAML's query gradient)."""
    check_finite(loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p, g in (extra or {}).items():
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
    opt.step()
    return loss.item()


def lora_step(model, opt, batch) -> float:
    """One AdamW step on the NLL. Regular LoRA: pooled shuffled batches, lr 5e-5. Structured LoRA:
    K of them on one task at a time, one optimizer throughout, no reset, lr 1e-5."""
    return _step(opt, nll_loss(model, batch))


def abmll_inner_step(model, opt, batch, cfg: Config) -> float:
    """Algorithm 1, inner loop: a step on phi for
        -E_q log p(D|phi) + beta KL(q(phi|D) || p(phi|theta))."""
    return _step(opt, nll_loss(model, batch) + cfg.beta * model_kl(model, wrt="phi"))


def abmll_outer_step(model, opt, cfg: Config, batch=None, query=None) -> float:
    """Algorithm 1, outer step: a step on theta for
        -E_q log p(D|phi) + beta KL(q(phi|D) || p(phi|theta)) + beta prior_scale (-log p(theta)).
    First-order, like Reptile: phi is not differentiated through the inner loop, so the NLL does not
    depend on theta and contributes no gradient. With weight noise the step runs no forward pass:
    the KL pulls theta toward the adapted phi, the prior toward N(0, I) x Gamma(a0, b0). With
    activation noise both terms live on the layer outputs, so a forward on `batch` (the last inner
    batch, as the authors' code) comes first, without gradients: they would reach phi only.
    cfg.outer_grad "fo" (first-order MAML, an ablation neither the paper nor the authors' code has)
    adds grad_phi NLL(query) at the adapted phi onto theta: the identity path of d phi / d theta.
    Returns the KL-and-prior part of the loss."""
    return _step(opt, *abmll_outer_loss(model, cfg, batch, query))


def abmll_outer_loss(model, cfg: Config, batch=None, query=None):
    """`abmll_outer_step`'s loss beta [KL + prior_scale (-log p(theta))] and, for cfg.outer_grad "fo",
    its extra {theta factor: grad_phi NLL(query)} (else None), before any step."""
    layers = bayes_layers(model)
    extra = None
    if cfg.outer_grad == "fo":
        phi, theta = (list(layers_pairs(layers, g)) for g in ("phi", "theta"))
        extra = dict(zip(theta, torch.autograd.grad(nll_loss(model, query), phi)))
    if any(m.noise == "activation" for m in layers):
        with torch.no_grad():
            nll_loss(model, batch)  # records each layer's input; a fresh sample, as any forward
    loss = model_kl(model, wrt="theta") + cfg.prior_scale * model_neg_log_prior(model, cfg.a0, cfg.b0)
    return cfg.beta * loss, extra


def layers_pairs(layers, group: str):
    """Every (B, A) factor of `group` over the layers, in one order for theta and phi."""
    return (t for m in layers for t in m.pairs(group))


def inner_optimizer(model, cfg: Config):
    """AdamW (lr inner_lr) on phi, or on the LoRA adapters."""
    groups = param_groups(model)
    params = groups["phi" if "phi" in groups else "lora"].values()
    return torch.optim.AdamW(params, lr=cfg.inner_lr, weight_decay=cfg.weight_decay)


def adapt(model, batches, cfg: Config, opt=None) -> list[float]:
    """One step per batch: on phi with the ABMLL inner loss, or on the LoRA adapters with the NLL.
    Reptile's inner loop and test-time adaptation use it (and ABMLL's, as abmll_task spells out),
    so adaptation starts alike at training and at test time: from a fresh AdamW, unless `opt` is one
    carried across tasks (the authors' code)."""
    opt = inner_optimizer(model, cfg) if opt is None else opt
    bayes = "phi" in param_groups(model)
    return [abmll_inner_step(model, opt, b, cfg) if bayes else lora_step(model, opt, b) for b in batches]


@torch.no_grad()
def _copy_into(params: dict, values: dict):
    for k, p in params.items():
        p.copy_(values[k])


def reptile_moves(name: str, cfg: Config) -> bool:
    """Whether Reptile's meta step moves this LoRA factor (cfg.reptile_factors "AB" or "B")."""
    return cfg.reptile_factors == "AB" or name.endswith("_B")


def reptile_task(model, batches, cfg: Config, opt=None) -> list[float]:
    """Reptile: theta_i <- theta; K steps on task i (fresh AdamW, or `opt` carried across tasks);
    theta <- theta + eps (theta_i - theta). cfg.reptile_factors "B" (an ablation) moves only the B
    factors: every A comes back to theta's, as ABMLL's weight-space pull leaves A_theta while
    B_theta = 0."""
    params = param_groups(model)["lora"]
    theta = {k: p.detach().clone() for k, p in params.items()}
    try:
        losses = adapt(model, batches, cfg, opt)
    except BaseException:  # a NaN, or Ctrl-C: the last good theta comes back
        _copy_into(params, theta)
        raise
    _copy_into(params, {k: torch.lerp(theta[k], p, cfg.reptile_eps * reptile_moves(k, cfg))
                        for k, p in params.items()})
    return losses


# -----------------------------------------------------------------------------
# Algorithm 1


def end_task(model):
    """phi <- theta in every layer (Algorithm 1's last line); the last forward's input dropped."""
    for m in bayes_layers(model):
        m.reset_phi()
        m.last = None


def abmll_task(model, outer_opt, batches, cfg: Config, inner_opt=None, query=None) -> dict:
    """One task of Algorithm 1, entered with phi = theta, first-order (phi is not differentiated
    through the inner loop, so the NLL gives theta no gradient):

        1) for k = 1..K:  phi <- AdamW(phi; -log p(D_k|phi) + beta KL(q(phi|D) || p(phi|theta)))
        2) theta <- AdamW(theta; beta KL(q(phi|D) || p(phi|theta)) + beta prior_scale (-log p(theta)))
        3) phi <- theta

    `inner_opt`: an AdamW carried across tasks (the authors' code), else a fresh one per task;
    `query`: one more batch of the task, for cfg.outer_grad "fo". Returns the losses of 1) and 2)."""
    inner_opt = inner_optimizer(model, cfg) if inner_opt is None else inner_opt
    try:
        # 1) K steps on phi, one per batch D_k of the task
        inner = [abmll_inner_step(model, inner_opt, batch, cfg) for batch in batches]
        # 2) one step on theta: the KL pulls it toward the adapted phi, the prior toward N(0, I)
        outer = abmll_outer_step(model, outer_opt, cfg, batches[-1], query)
    finally:  # after a NaN or Ctrl-C too: the next task starts from phi = theta
        end_task(model)  # 3) phi <- theta
    return {"inner": inner, "outer": outer}


# one task of a meta-batch: its update computed, not applied; train.py averages them over the
# meta-batch's tasks (and ranks) into one step


def abmll_task_grads(model, batches, cfg: Config, query=None) -> tuple[dict, list[float]]:
    """`abmll_task` with theta's outer-step gradient returned rather than stepped: K inner steps on
    phi (a fresh AdamW), then ({theta factor: d/dtheta beta [KL + prior_scale (-log p(theta))]
    (+ FOMAML's query term)}, the inner losses); phi <- theta. Theta's .grad is left alone."""
    theta = list(layers_pairs(bayes_layers(model), "theta"))
    try:
        inner = adapt(model, batches, cfg)  # 1)
        loss, extra = abmll_outer_loss(model, cfg, batches[-1], query)  # 2), differentiated only
        check_finite(loss)
        grads = torch.autograd.grad(loss, theta, allow_unused=True)
    finally:
        end_task(model)  # 3)
    grads = {p: torch.zeros_like(p) if g is None else g for p, g in zip(theta, grads)}
    for p, g in (extra or {}).items():
        grads[p].add_(g)
    return grads, inner


def reptile_delta(model, batches, cfg: Config) -> tuple[dict, list[float]]:
    """Reptile's task update, not applied: theta_i <- theta, K steps on task i (a fresh AdamW);
    returns ({name: theta_i - theta}, the losses) with theta put back."""
    params = param_groups(model)["lora"]
    theta = {k: p.detach().clone() for k, p in params.items()}
    try:
        losses = adapt(model, batches, cfg)
        delta = {k: (p.detach() - theta[k]) * reptile_moves(k, cfg) for k, p in params.items()}
    finally:  # a NaN, or Ctrl-C, too
        _copy_into(params, theta)
    return delta, losses


# -----------------------------------------------------------------------------
# the test section of Algorithm 1


@contextmanager
def restored(model):
    """The adapters (never the base model) are copied on entering the block, put back on leaving."""
    saved = {k: p.detach().clone() for k, p in adapter_params(model).items()}
    try:
        yield model
    finally:
        _copy_into(adapter_params(model), saved)


@contextmanager
def adapted(model, support, cfg: Config):
    """Test section of Algorithm 1: copy the adapters, K steps on the support batches, score the
    query inside the block; the adapters are restored after it."""
    with restored(model):
        adapt(model, support, cfg)
        yield model
