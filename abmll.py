"""Amortized Bayesian Meta-Learning for LoRA (ABMLL): the adapters, the objective, every update rule.

Section 4, Algorithm 1 and Eq. 2 of the paper, and the baselines' adapters and steps, in reading order:
LoRALinear -> the sampled layer (BayesLoRALinear) -> the weight-space terms -> inject / save / load ->
update rules -> save_peft. How we read the paper where it is ambiguous: ../shared/DESIGN.md.

    abmll.inject(model, "abmll")                                   # wq, wv, wo; rank 8, alpha 16
    outer = torch.optim.AdamW(abmll.param_groups(model)["theta"].values(), lr=cfg.outer_lr)
    abmll.abmll_task(model, outer, task_batches, cfg)              # one task of Algorithm 1
    with abmll.adapted(model, support_batches, cfg):               # test section: adapt, score, restore
        probs = abmll.predictive_probs(model, query_batch, letters)

A batch is a dict with `tokens` (B, T), `answer_pos` (B,) and `answer_ids` (B,) (data.py).
"""

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# weight-sized transients are made this many entries at a time (16 MiB in fp32), so the full
# d_out x d_in matrices of sigma, eps or the KL terms never exist at once, whatever the model's size
CHUNK = 1 << 22
NOISE = ("weight", "activation")  # where BayesLoRALinear draws its sample: the paper's text, the authors' code
KL = ("closed", "mc")  # KL(q(phi|D) || p(phi|theta)): closed form, or the authors' one-sample estimate


def _check_options(noise: str, kl: str):
    if noise not in NOISE:
        raise ValueError(f"noise must be one of {', '.join(NOISE)}, not {noise!r}")
    if kl not in KL:
        raise ValueError(f"kl must be one of {', '.join(KL)}, not {kl!r}")
    if kl == "mc" and noise == "weight":
        raise ValueError("kl='mc' is the authors' one-sample KL on the layer outputs: it needs noise='activation'")


@dataclass
class Config:
    """Update-rule hyperparameters, with the paper's names and defaults (Section 5.1.1, DESIGN.md)."""

    inner_steps: int = 5  # K: batches per task, in the inner loop and at test time
    lr: float = 5e-5  # Regular LoRA
    inner_lr: float = 1e-5  # Structured LoRA, Reptile's and ABMLL's inner loops, test-time adaptation
    outer_lr: float = 5e-5  # ABMLL's outer step on theta
    reptile_eps: float = 0.5
    beta: float = 1e-8  # tempers the weight-space terms, ~1e6 per weight entry (Eq. 2)
    a0: float = 1.0  # Gamma prior on the precision 1/sigma^2: shape
    b0: float = 0.01  # and rate
    weight_decay: float = 0.01  # torch's AdamW default; the paper names AdamW and no decay (authors: 0)
    prior_scale: float = 1.0  # the prior's weight is beta * prior_scale: 1 (paper), 1 / M tasks (authors' code)
    outer_grad: str = "kl"  # "kl": theta moves by the KL and prior only; "fo": + grad_phi NLL(query) (FOMAML)


def _lowrank(x, A, B, s):
    """s x A^T B^T; scaling B rather than the output saves a pass over the activations."""
    return F.linear(F.linear(x, A.to(x.dtype)), (B * s).to(x.dtype))


def _pair(rank, base: nn.Linear):
    """(B, A): A as nn.Linear initializes its weight (kaiming-uniform, as loralib), B = 0. Adapters stay fp32
    (fp64 for an fp64 base) so AdamW's small steps are not rounded away in a bf16 model."""
    dt, dev = torch.promote_types(base.weight.dtype, torch.float32), base.weight.device
    A = nn.init.kaiming_uniform_(torch.empty(rank, base.in_features, dtype=dt, device=dev), a=math.sqrt(5))
    return nn.Parameter(torch.zeros(base.out_features, rank, dtype=dt, device=dev)), nn.Parameter(A)


class LoRALinear(nn.Module):
    """y = x W0^T + s x A^T B^T, s = alpha / r, with W0 frozen under its original key `weight`."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling, self.merged = rank, alpha, alpha / rank, False
        self.lora_B, self.lora_A = _pair(rank, base)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + _lowrank(x, self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self, sign: int = 1):
        """W0 <- W0 + s B A (one matmul per layer at inference); `unmerge()` takes it back out."""
        if self.merged != (sign > 0):
            self.weight += (sign * self.scaling * self.lora_B @ self.lora_A).to(self.weight.dtype)
            self.merged = sign > 0

    def unmerge(self):
        self.merge(-1)


# -----------------------------------------------------------------------------
# one reparameterized weight sample per forward, with nothing weight-sized kept for backward


def _noise_rows(b_lv, a_lv, s, log_c, seed):
    """Yield (rows, sigma * eps) chunk by chunk, sigma = exp(½ (s B A + log_c)), eps ~ N(0, I).

    Same seed, same chunks, same order: backward regenerates exactly the forward's eps, never stored.
    """
    gen = torch.Generator(a_lv.device).manual_seed(seed)
    half_c = torch.full((), 0.5 * log_c, dtype=a_lv.dtype, device=a_lv.device)  # no host-to-device copy
    step = max(1, CHUNK // a_lv.shape[1])
    for i in range(0, b_lv.shape[0], step):
        rows = slice(i, i + step)
        sigma = torch.addmm(half_c, b_lv[rows], a_lv, alpha=0.5 * s).exp_()  # (rows, d_in)
        yield rows, sigma.mul_(torch.randn(sigma.shape, generator=gen, dtype=sigma.dtype, device=sigma.device))


class _SampledLinear(torch.autograd.Function):
    """y = x phi^T, phi = W0 + mu + sigma * eps, mu = s B_mu A_mu, sigma = exp(½ (s B_lv A_lv + log_c)).

    Saves x, W0 (a parameter), the four factors and the seed; backward regenerates sigma * eps chunk by
    chunk and makes G = g^T x per chunk, dropping it after:
        dL/dx = g phi,   dL/dmu = G,   dL/dlogvar = ½ G * sigma * eps,
        dL/dB = s (dL/dM) A^T,   dL/dA = s B^T (dL/dM)   for M = mu and M = logvar.
    """

    @staticmethod
    def forward(ctx, x, w0, b_mu, a_mu, b_lv, a_lv, s, log_c, seed):
        ctx.save_for_backward(x, w0, b_mu, a_mu, b_lv, a_lv)
        dev = x.device.type  # the big matmuls run in autocast's dtype if on; the noise always in fp32
        ctx.s, ctx.log_c, ctx.seed = s, log_c, seed
        ctx.dt = dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        # fp32 keeps sigma * eps (~1e-3 of W0) to ~1e-4 relative inside phi: one matmul, like LoRA's base.
        # In bf16 (weights or autocast) W0 + sigma * eps would round back to W0: the noise gets its own product.
        full = w0.dtype == b_lv.dtype == dt
        with torch.autocast(dev, enabled=False):
            x2, outs = x.reshape(-1, x.shape[-1]).to(dt), []  # (N, d_in)
            for rows, noise in _noise_rows(b_lv, a_lv, s, log_c, seed):
                if full:
                    outs.append(x2 @ noise.add_(w0[rows]).addmm_(b_mu[rows], a_mu, alpha=s).T)
                else:
                    outs.append(x2 @ w0[rows].to(dt).T + x2 @ noise.to(dt).T + _lowrank(x2, a_mu, b_mu[rows], s))
        return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)).view(*x.shape[:-1], -1)  # (..., d_out)

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):  # dtypes are explicit, as in forward
            return _SampledLinear._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x, w0, b_mu, a_mu, b_lv, a_lv = ctx.saved_tensors
        s, dt = ctx.s, ctx.dt
        x2, g2 = x.reshape(-1, x.shape[-1]).to(dt), g.reshape(-1, g.shape[-1]).to(dt)  # (N, d_in), (N, d_out)
        grads = [torch.empty_like(b_mu), torch.zeros_like(a_mu), torch.empty_like(b_lv), torch.zeros_like(a_lv)]
        gx = None
        for rows, noise in _noise_rows(b_lv, a_lv, s, ctx.log_c, ctx.seed):
            g_rows = g2[:, rows]  # (N, rows)
            G = (g_rows.T @ x2).to(b_lv.dtype)  # dL/dphi = dL/dmu, (rows, d_in)
            for i, (B, A, alpha) in enumerate([(b_mu, a_mu, s), (b_lv, a_lv, 0.5 * s)]):
                dM = G if i == 0 else G.mul_(noise)  # then 2 dL/dlogvar, in place: mu's share is taken
                torch.mm(dM, A.T, out=grads[2 * i][rows]).mul_(alpha)
                grads[2 * i + 1].addmm_(B[rows].T, dM, alpha=alpha)
            if ctx.needs_input_grad[0]:  # dL/dx = g phi, summed over row chunks
                phi = noise.add_(w0[rows]).addmm_(b_mu[rows], a_mu, alpha=s).to(dt)
                gx = g_rows @ phi if gx is None else gx.addmm_(g_rows, phi)
        return None if gx is None else gx.to(x.dtype).view_as(x), None, *grads, None, None, None


# -----------------------------------------------------------------------------
# the authors' reading: noise on the layer's output, one log-variance per output element and token


def _act_dtype(x, factor):
    return torch.promote_types(torch.promote_types(x.dtype, factor.dtype), torch.float32)  # fp32, fp64 for fp64


def _act_eps(shape, seed, dtype, device):
    """eps ~ N(0, 1) of the output's shape from its own generator: the same seed gives the same eps."""
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), dtype=dtype, device=device)


def _act_noise(u_lv, b_lv, s, log_c, seed):
    """e^(l/2) eps (N, d_out), l = s B_logvar u + log_c for u = A_logvar x (N, r), in one buffer."""
    sigma = torch.mm(u_lv, (0.5 * s * b_lv.to(u_lv.dtype)).T).add_(0.5 * log_c).exp_()
    return sigma.mul_(_act_eps(sigma.shape, seed, sigma.dtype, sigma.device))


class _ActSample(torch.autograd.Function):
    """y = x W0^T + m + e^(l/2) eps, m = s B_mean A_mean x, l = s B_logvar A_logvar x + log_c, eps ~ N(0, 1)
    of y's shape: the authors' sampled layer.

    Keeps x, W0, the factors and u = [A_mean; A_logvar] x (N, 2r); backward regenerates e^(l/2) eps from
    the seed rather than keep anything output-sized:
        dL/dm = g,   dL/dl = ½ g e^(l/2) eps,   dL/dB_M = s (dL/dM)^T u_M,   dL/du_M = s (dL/dM) B_M,
        dL/dA = (dL/du)^T x,   dL/dx = g W0 + (dL/du) [A_mean; A_logvar]   for M = m and M = l.
    Each pass adds its terms into one output-sized buffer, the product with W0 last (a GEMM's C): on a CPU
    a fresh buffer of that size costs as much as the arithmetic done in it.
    """

    @staticmethod
    def forward(ctx, x, w0, b_mu, a_mu, b_lv, a_lv, s, log_c, seed):
        dev, dt, r = x.device.type, _act_dtype(x, b_lv), a_mu.shape[0]
        # x W0^T in autocast's dtype if on, as F.linear would run; the noise in fp32 (fp64) always
        ctx.dt = y_dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        ctx.s, ctx.log_c, ctx.seed = s, log_c, seed
        with torch.autocast(dev, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
            u = x2.to(dt) @ torch.cat([a_mu, a_lv]).to(dt).T  # (N, 2r)
            y = _act_noise(u[:, r:], b_lv, s, log_c, seed).addmm_(u[:, :r], b_mu.to(dt).T, alpha=s)
            if y_dt == dt == w0.dtype:
                y.addmm_(x2, w0.T)  # (N, d_out)
            else:  # bf16 weights or autocast: the sum in the GEMM's dtype, F.linear's output dtype
                y = torch.addmm(y.to(y_dt), x2.to(y_dt), w0.to(y_dt).T)
        ctx.save_for_backward(x, w0, b_mu, a_mu, b_lv, a_lv, u)
        return y.view(*x.shape[:-1], -1)  # (..., d_out)

    @staticmethod
    def backward(ctx, g):
        x, w0, b_mu, a_mu, b_lv, a_lv, u = ctx.saved_tensors
        s, r, dt, need = ctx.s, a_mu.shape[0], u.dtype, ctx.needs_input_grad
        with torch.autocast(g.device.type, enabled=False):  # dtypes are explicit, as in forward
            g2 = g.reshape(-1, g.shape[-1])  # (N, d_out)
            g_m = g2.to(dt)  # dL/dm
            g_l2 = _act_noise(u[:, r:], b_lv, s, ctx.log_c, ctx.seed).mul_(g_m)  # 2 dL/dl
            du = torch.cat([g_m @ (s * b_mu.to(dt)), g_l2 @ (0.5 * s * b_lv.to(dt))], 1)  # (N, 2r)
            d_b_mu = (g_m.T @ u[:, :r]).mul_(s).to(b_mu.dtype) if need[2] else None  # (d_out, r)
            d_b_lv = (g_l2.T @ u[:, r:]).mul_(0.5 * s).to(b_lv.dtype) if need[4] else None
            x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
            d_a = (du.T @ x2.to(dt)).split(r) if need[3] or need[5] else (None, None)  # (r, d_in) each
            dx = None
            if need[0]:  # g W0 in forward's dtype, then the low-rank part added into the same buffer
                dx = (g2.to(ctx.dt) @ w0.to(ctx.dt)).to(dt).addmm_(du, torch.cat([a_mu, a_lv]).to(dt))
                dx = dx.to(x.dtype).view_as(x)
        d_a_mu, d_a_lv = (None if d is None else d.to(a.dtype) for d, a in zip(d_a, (a_mu, a_lv)))
        return dx, None, d_b_mu, d_a_mu, d_b_lv, d_a_lv, None, None, None


def _act_kl_terms(d, dlv, neg_lv_p, need):
    """`_kl_terms` on the outputs, dKL/d(-l_p) = ½ d^2 e^-l_p made in d's buffer rather than a new one."""
    value, (d_w, d_dlv, _) = _kl_terms(d, dlv, neg_lv_p, (need[0], need[1], False))  # leaves d as it was
    return value, (d_w, d_dlv, d.mul_(d_w).mul_(0.5) if need[2] else None)


def _act_mc_terms(d, dlv, neg_lv_p, need, seed):
    """The authors' one-sample KL, log N(y~; m_q, e^l_q) - log N(y~; m_p, e^l_p) summed over the output
    elements at the forward's sample y~ = m_q + e^(l_q / 2) eps (log 2 pi cancels), and its derivatives:
        KL = ½ [z^2 e^-l_p - dlv - eps^2],   z = y~ - m_p = d + e^(l_q / 2) eps,   l_q = dlv - (-l_p),
        dKL/dd = w,   dKL/d(dlv) = ½ (w e^(l_q / 2) eps - 1),   dKL/d(-l_p) = ½ (z w - w e^(l_q / 2) eps),
    w = z e^-l_p, d = m_q - m_p, dlv = l_q - l_p. The inputs are `_ActSum`'s transients: this works in place."""
    eps = _act_eps(d.shape, seed, d.dtype, d.device)  # the forward's eps: same seed, shape and dtype
    value = -0.5 * (torch.dot(eps.flatten(), eps.flatten()) + dlv.sum())
    noise = dlv.sub_(neg_lv_p).mul_(0.5).exp_().mul_(eps)  # e^(l_q / 2) eps, in dlv's buffer
    z = d.add_(noise)
    w = neg_lv_p.exp_().mul_(z)  # z / sigma_p^2
    value = value + 0.5 * torch.dot(w.flatten(), z.flatten())
    w_noise = noise.mul_(w)
    d_neg_lv_p = z.mul_(w).sub_(w_noise).mul_(0.5) if need[2] else None
    return value, (w, w_noise.sub_(1).mul_(0.5), d_neg_lv_p)


class _ActSum(torch.autograd.Function):
    """sum_ij f(M_1, ..., M_k)_ij over the output elements of one forward, M_n = s B_n A_n x + c_n (N, d_out):
    `_LowRankSum` on a layer's outputs, with the same `terms`.

    Forward turns their elementwise dF/dM_n into dL/dB_n = s (dF/dM_n)^T u_n and dL/du_n = s (dF/dM_n) B_n,
    u_n = A_n x (N, r_n); backward only multiplies: dL/dA_n = (dL/du_n)^T x, dL/dx = sum_n (dL/du_n) A_n.
    So x (which the layer's own product keeps already) and rank-sized tensors are all it keeps: no
    output-sized term is stored or recomputed. Sums in fp32 (fp64 factors: fp64), returned in fp64.
    """

    @staticmethod
    def forward(ctx, terms, s, offsets, x, *factors):
        with torch.autocast(x.device.type, enabled=False):  # the KL and prior stay fp32 under autocast
            return _ActSum._forward(ctx, terms, s, offsets, x, *factors)

    @staticmethod
    def _forward(ctx, terms, s, offsets, x, *factors):
        Bs, dt, need_in = factors[0::2], _act_dtype(x, factors[0]), ctx.needs_input_grad[4:]
        need = [ctx.needs_input_grad[3] or need_in[2 * n] or need_in[2 * n + 1] for n in range(len(Bs))]
        ranks = [A.shape[0] for A in factors[1::2]]
        A = torch.cat(factors[1::2]).to(dt)  # (sum r_n, d_in)
        us = (x.reshape(-1, x.shape[-1]).to(dt) @ A.T).split(ranks, 1)  # (N, r_n) each, one GEMM
        Ms = [torch.mm(u, (s * B.to(dt)).T) for B, u in zip(Bs, us)]  # (N, d_out)
        value, dMs = terms(*[M.add_(c) if c else M for M, c in zip(Ms, offsets)], need=need)
        if any(need):
            d_bs = [(dM.T @ u).mul_(s).to(B.dtype) if need_in[2 * n] else None
                    for n, (dM, u, B) in enumerate(zip(dMs, us, Bs))]  # (d_out, r_n)
            du = torch.cat([torch.mm(dM, B.to(dt)).mul_(s) if need[n] else torch.zeros_like(u)
                            for n, (dM, u, B) in enumerate(zip(dMs, us, Bs))], 1)  # dF/du (N, sum r_n)
            ctx.ranks, ctx.a_dtypes = ranks, [f.dtype for f in factors[1::2]]
            ctx.save_for_backward(x, A, du, *[t for t in d_bs if t is not None])
        return value.to(torch.float64)

    @staticmethod
    def backward(ctx, g):
        x, A, du, *d_bs = ctx.saved_tensors
        need_x, need_in = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        with torch.autocast(g.device.type, enabled=False):
            du = du * g.to(du.dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(du.dtype)  # (N, d_in)
            d_as = (du.T @ x2).split(ctx.ranks) if any(need_in[1::2]) else None  # (r_n, d_in) each
            dx = (du @ A).to(x.dtype).view_as(x) if need_x else None
        d_bs, grads = iter(d_bs), []
        for n, dt in enumerate(ctx.a_dtypes):
            grads.append(next(d_bs) * g.to(dt) if need_in[2 * n] else None)
            grads.append(d_as[n].to(dt) if need_in[2 * n + 1] else None)
        return None, None, None, dx, *grads


class BayesLoRALinear(nn.Module):
    """Four LoRA pairs around a frozen W0 (Section 4): the mean and log-variance of theta and of phi.

        mu = s B_mean A_mean,   log sigma^2 = s B_logvar A_logvar + log_c
        q(phi | D) = N(W0 + mu_phi, sigma_phi^2),   p(phi | theta) = N(W0 + mu_theta, sigma_theta^2)

    The paper's "+ cI, c = e^-20" is read as the log-variance's offset (sigma ~ 4.5e-5 at the start; read
    literally sigma ~ 1 would drown W0). `mode` is explicit; .train() / .eval() never touch it:
    "sample": phi = W0 + mu_phi + sigma_phi * eps, one eps ~ N(0, I) of W0's shape per forward, shared
    by the batch (training, and the paper's one-sample inference); "mean": phi = W0 + mu_phi.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, log_c: float = -20.0,
                 noise: str = "weight", kl: str = "closed"):
        super().__init__()
        _check_options(noise, kl)
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling, self.log_c, self.mode = rank, alpha, alpha / rank, log_c, "sample"
        self.noise, self.kl_estimator = noise, kl
        self.last = None  # activation noise: (x, seed) of the last sampled forward, which kl() and the prior use
        for name in ("theta_mean", "theta_logvar", "phi_mean", "phi_logvar"):
            B, A = _pair(rank, base)
            self.register_parameter(f"{name}_B", B)
            self.register_parameter(f"{name}_A", A)
        self.reset_phi()

    @torch.no_grad()
    def reset_phi(self):
        """phi <- theta, all four A and B (Algorithm 1, after the outer step)."""
        for p, t in zip(self.pairs("phi"), self.pairs("theta")):
            p.copy_(t)

    def pairs(self, group: str, grad: bool = True):
        """(B_mean, A_mean, B_logvar, A_logvar) of "theta" or "phi", detached unless gradients are wanted."""
        ts = tuple(getattr(self, f"{group}_{n}") for n in ("mean_B", "mean_A", "logvar_B", "logvar_A"))
        return ts if grad and torch.is_grad_enabled() else tuple(t.detach() for t in ts)

    def forward(self, x):
        if self.mode == "mean":
            return self.mean_forward(x)
        if self.mode != "sample":
            raise ValueError(f"BayesLoRALinear.mode must be 'sample' or 'mean', not {self.mode!r}")
        seed = int(torch.randint(2**62, ()))  # torch's global generator: torch.manual_seed reproduces a run
        if self.noise == "activation":
            return self._forward_activation(x, seed)
        y = _SampledLinear.apply(x, self.weight, *self.pairs("phi"), self.scaling, self.log_c, seed)
        return y if self.bias is None else y + self.bias

    def _forward_activation(self, x, seed):
        """The authors' layer: y = W0 x + m + e^(l/2) eps, m = s B_mean A_mean x, l = s B_logvar A_logvar x + log_c,
        eps ~ N(0, 1) of y's shape. m + e^(l/2) eps keeps nothing output-sized for backward (`_ActSample`)."""
        self.last = (x, seed)
        y = _ActSample.apply(x, self.weight, *self.pairs("phi"), self.scaling, self.log_c, seed)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # as F.linear's, in autocast's dtype

    def kl(self, wrt: str | None = None):
        """KL(q(phi|D) || p(phi|theta)) summed over the weight (W0 cancels in mu_q - mu_p). wrt = "phi" or
        "theta" detaches the other group. mu_q - mu_p = s [B_q B_p] [A_q; -A_p] is one low-rank product.

        Activation noise: summed over every output element of the last sampled forward (batch x tokens x d_out),
        in closed form between N(m_phi, e^l_phi) and N(m_theta, e^l_theta), or with kl="mc" as the authors'
        one-sample estimate log N(y~; m_phi, e^l_phi) - log N(y~; m_theta, e^l_theta) at that forward's sample
        y~ = m_phi + e^(l_phi / 2) eps. Valid after a forward: the terms depend on its input x."""
        bq, aq, blq, alq = self.pairs("phi", grad=wrt in (None, "phi"))
        bp, ap, blp, alp = self.pairs("theta", grad=wrt in (None, "theta"))
        factors = (torch.cat([bq, bp], 1), torch.cat([aq, -ap]),  # mu_q - mu_p
                   torch.cat([blq, blp], 1), torch.cat([alq, -alp]),  # lv_q - lv_p: log_c cancels
                   blp, -alp)  # -lv_p
        if self.noise == "activation":  # the same three low-rank terms, on the outputs s B A x
            x, seed = self._last_input()
            terms = _act_kl_terms if self.kl_estimator == "closed" else partial(_act_mc_terms, seed=seed)
            return _ActSum.apply(terms, self.scaling, (0.0, 0.0, -self.log_c), x, *factors)
        return _LowRankSum.apply(_kl_terms, self.scaling, (0.0, 0.0, -self.log_c), *factors)

    def neg_log_prior(self, a0: float = 1.0, b0: float = 0.01):
        """-log p(theta) = -log [N(mu_theta; 0, I) Gamma(1/sigma_theta^2; a0, b0)] summed over the weight; with
        activation noise over theta's output activations m_theta, l_theta of the last sampled forward."""
        b_mu, a_mu, b_lv, a_lv = self.pairs("theta")
        terms = partial(_prior_terms, a0=a0, b0=b0)
        if self.noise == "activation":  # the same two terms, on the outputs s B A x
            x = self._last_input()[0]
            return _ActSum.apply(terms, self.scaling, (0.0, -self.log_c), x, b_mu, a_mu, b_lv, -a_lv)
        return _LowRankSum.apply(terms, self.scaling, (0.0, -self.log_c), b_mu, a_mu, b_lv, -a_lv)  # mu, -lv

    def logvar(self, group: str, x=None):
        """log sigma^2 of `group`: per weight entry (d_out, d_in), or with activation noise per output element
        for the input x (..., d_out)."""
        b_lv, a_lv = self.pairs(group)[2:]
        if self.noise == "activation":
            return _lowrank(x, a_lv, b_lv, self.scaling) + self.log_c
        return self.scaling * b_lv @ a_lv + self.log_c

    def mean_forward(self, x):
        """W0 x + s B_mean A_mean x with phi's mean: the layer in "mean" mode."""
        return F.linear(x, self.weight, self.bias) + _lowrank(x, self.phi_mean_A, self.phi_mean_B, self.scaling)

    def _last_input(self):
        if self.last is None:
            raise RuntimeError("activation noise: kl() and neg_log_prior() need a sampled forward first")
        return self.last


# -----------------------------------------------------------------------------
# the weight-space terms of Eq. 2


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, e^lv_q) || N(mu_p, e^lv_p)) per entry = ½ [lv_p - lv_q + (e^lv_q + (mu_q - mu_p)^2) / e^lv_p - 1]."""
    return 0.5 * (logvar_p - logvar_q + torch.exp(logvar_q - logvar_p) + (mu_q - mu_p) ** 2 * torch.exp(-logvar_p) - 1)


def neg_log_prior(mu, logvar, a0: float = 1.0, b0: float = 0.01):
    """-log [N(mu; 0, 1) Gamma(tau; a0, b0)] per entry, tau = 1/sigma^2 = e^-logvar, shape a0, rate b0:
        ½ mu^2 + ½ log 2pi - a0 log b0 + lgamma(a0) - (a0 - 1) log tau + b0 tau."""
    const = 0.5 * math.log(2 * math.pi) - a0 * math.log(b0) + math.lgamma(a0)
    return 0.5 * mu**2 + const + (a0 - 1) * logvar + b0 * torch.exp(-logvar)


def _kl_terms(d, dlv, neg_lv_p, need):
    """gaussian_kl summed over a chunk of d = mu_q - mu_p, dlv = lv_q - lv_p, -lv_p, and its derivatives:
        KL = ½ [-dlv + e^dlv + d^2 e^-lv_p - 1],
        dKL/dd = d e^-lv_p,   dKL/d(dlv) = ½ (e^dlv - 1),   dKL/d(-lv_p) = ½ d^2 e^-lv_p.
    The chunks are `_LowRankSum`'s transients, so this works in place."""
    d_w = neg_lv_p.exp_().mul_(d)  # d / sigma_p^2
    value = 0.5 * (torch.dot(d_w.flatten(), d.flatten()) - dlv.sum() - d.numel())
    ratio = dlv.exp_()  # sigma_q^2 / sigma_p^2
    value = value + 0.5 * ratio.sum()
    return value, (d_w, ratio.sub_(1).mul_(0.5), 0.5 * d_w * d if need[2] else None)


def _prior_terms(mu, neg_lv, need, a0, b0):
    """neg_log_prior summed over a chunk; d/dmu = mu, d/d(-lv) = b0 e^-lv - (a0 - 1)."""
    const = 0.5 * math.log(2 * math.pi) - a0 * math.log(b0) + math.lgamma(a0)
    value = 0.5 * torch.dot(mu.flatten(), mu.flatten()) - (a0 - 1) * neg_lv.sum() + const * mu.numel()
    b0_tau = neg_lv.exp_().mul_(b0)  # b0 / sigma^2
    return value + b0_tau.sum(), (mu, b0_tau.sub_(a0 - 1))


class _LowRankSum(torch.autograd.Function):
    """sum_ij f(M_1, ..., M_k)_ij, M_n = s B_n A_n + c_n, row chunk by row chunk, gradients made in forward.

    `terms` gives a chunk's sum and the elementwise dF/dM_n; dL/dB_n = s (dF/dM_n) A_n^T and
    dL/dA_n = s B_n^T (dF/dM_n) accumulate as we go, so only they (adapter-sized) are kept for backward.
    Elementwise work and each chunk's sum in fp32 (fp64 factors: fp64), chunk sums accumulated in fp64:
    the prior is ~5e6 per entry at the start, ~1e14 over a model.
    """

    @staticmethod
    def forward(ctx, terms, s, offsets, *factors):
        with torch.autocast(factors[0].device.type, enabled=False):  # weight-space terms stay fp32 under autocast
            return _LowRankSum._forward(ctx, terms, s, offsets, *factors)

    @staticmethod
    def _forward(ctx, terms, s, offsets, *factors):
        Bs, As = factors[0::2], factors[1::2]
        dt, dev = torch.promote_types(As[0].dtype, torch.float32), As[0].device
        need = [ctx.needs_input_grad[3 + 2 * n] or ctx.needs_input_grad[4 + 2 * n] for n in range(len(Bs))]
        grads = [torch.zeros(f.shape, dtype=dt, device=dev) if need[i // 2] else None for i, f in enumerate(factors)]
        As, offsets = [A.to(dt) for A in As], [torch.full((), c, dtype=dt, device=dev) for c in offsets]
        total, step = torch.zeros((), dtype=torch.float64, device=dev), max(1, CHUNK // As[0].shape[1])
        for i in range(0, Bs[0].shape[0], step):
            rows = slice(i, i + step)
            Ms = [torch.addmm(c, B[rows].to(dt), A, alpha=s) for B, A, c in zip(Bs, As, offsets)]  # (rows, d_in)
            value, dMs = terms(*Ms, need=need)
            total += value
            for n, dM in enumerate(dMs):
                if need[n]:
                    torch.mm(dM, As[n].T, out=grads[2 * n][rows]).mul_(s)
                    grads[2 * n + 1].addmm_(Bs[n][rows].to(dt).T, dM, alpha=s)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, g):
        return None, None, None, *(None if t is None else t * g.to(t.dtype) for t in ctx.saved_tensors)


def bayes_layers(model) -> list[BayesLoRALinear]:
    return [m for m in model.modules() if isinstance(m, BayesLoRALinear)]


def model_kl(model, wrt: str | None = None):
    """KL(q(phi|D) || p(phi|theta)) over all adapted layers, an fp64 scalar (see `_LowRankSum`)."""
    return sum(m.kl(wrt) for m in bayes_layers(model))


def model_neg_log_prior(model, a0: float = 1.0, b0: float = 0.01):
    """-log p(theta) over all adapted layers: the paper's KL(q(theta) || p(theta)), after Ravi & Beatson."""
    return sum(m.neg_log_prior(a0, b0) for m in bayes_layers(model))


@contextmanager
def bayes_mode(model, mode: str):
    """Every BayesLoRALinear runs in `mode` ("sample" or "mean") inside the block, as before after it."""
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


def inject(model, method: str, targets=("wq", "wv", "wo"), rank: int = 8, alpha: float = 16, log_c: float = -20.0,
           noise: str = "weight", kl: str = "closed"):
    """Replace the nn.Linear modules named in `targets` by LoRALinear ("lora") or BayesLoRALinear ("abmll",
    with its `noise` and `kl`), in place, and freeze everything else. The paper's targets are wq, wv, wo
    (Table 6); the authors' code adds the MLP's w1, w2, w3. Returns the model."""
    if method not in ("lora", "abmll"):
        raise ValueError(f"unknown method {method!r}: adapters are 'lora' or 'abmll'")
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if method == "abmll":  # before any module is replaced
        _check_options(noise, kl)
    found = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in targets]
    for t in targets:
        if not any(n.rpartition(".")[2] == t for n, _ in found):
            raise ValueError(f"target module {t!r} not found in the model")
    for n, m in found:
        if type(m) is not nn.Linear:
            raise ValueError(f"target {n!r} is a {type(m).__name__}, not an nn.Linear (adapters already injected?)")
    model.requires_grad_(False)
    for n, m in found:
        parent, _, leaf = n.rpartition(".")
        new = LoRALinear(m, rank, alpha) if method == "lora" else BayesLoRALinear(m, rank, alpha, log_c, noise, kl)
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
            raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, the model's is {tuple(p.shape)}")
        p.copy_(state[k])


# -----------------------------------------------------------------------------
# losses and update rules, shared by train.py and test-time adaptation


def nll_loss(model, batch):
    """-log p(D|phi): cross-entropy of the answer letter over the full vocabulary, mean over the batch."""
    logits = model(batch["tokens"], logits_at=batch["answer_pos"][:, None])[:, 0]  # (B, V)
    return F.cross_entropy(logits.float(), batch["answer_ids"])


@torch.no_grad()
def predictive_probs(model, batch, choices=None, samples: int = 1):
    """p(y|x) ~ 1/S sum_s softmax(logits(x; phi_s)), the S-sample predictive, in the layers' current mode.
    choices (B, C) restricts the softmax to those token ids (the example's letters); ids < 0 are padding."""
    probs = 0.0
    for _ in range(samples):
        logits = model(batch["tokens"], logits_at=batch["answer_pos"][:, None])[:, 0].float()  # (B, V)
        if choices is not None:
            logits = logits.gather(1, choices.clamp(min=0)).masked_fill(choices < 0, float("-inf"))  # (B, C)
        probs = probs + logits.softmax(-1)
    return probs / samples


def check_finite(loss):
    """A non-finite loss (NLL or KL) stops training before any adapter changes: FloatingPointError."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}): training stopped, "
                                 "adapters kept at their last good values")


def _step(opt, loss, extra: dict | None = None) -> float:
    """One optimizer step; a non-finite loss (NLL or KL) stops before any adapter changes. `extra` maps
    parameters to gradients added after backward (FOMAML's query gradient)."""
    check_finite(loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p, g in (extra or {}).items():
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
    opt.step()
    return loss.item()


def lora_step(model, opt, batch) -> float:
    """One AdamW step on the NLL. Regular LoRA: pooled shuffled batches, lr 5e-5. Structured LoRA: K of
    them on one task at a time, one optimizer throughout, no reset, lr 1e-5."""
    return _step(opt, nll_loss(model, batch))


def abmll_inner_step(model, opt, batch, cfg: Config) -> float:
    """Algorithm 1, inner loop: a step on phi for -E_q log p(D|phi) + beta KL(q(phi|D) || p(phi|theta))."""
    return _step(opt, nll_loss(model, batch) + cfg.beta * model_kl(model, wrt="phi"))


def abmll_outer_step(model, opt, cfg: Config, batch=None, query=None) -> float:
    """Algorithm 1, outer step: a step on theta for
        -E_q log p(D|phi) + beta KL(q(phi|D) || p(phi|theta)) + beta prior_scale (-log p(theta)).
    First-order, like Reptile: phi is not differentiated through the inner loop, so the NLL does not depend
    on theta and contributes no gradient. With weight noise the step runs no forward pass: the KL pulls
    theta toward the adapted phi, the prior toward N(0, I) x Gamma(a0, b0). With activation noise both terms
    live on the layer outputs, so a forward on `batch` (the last inner batch, as the authors' code) comes
    first, without gradients: they would reach phi only. cfg.outer_grad "fo" (first-order MAML, an ablation
    neither the paper nor the authors' code has) adds grad_phi NLL(query) at the adapted phi onto theta:
    the identity path of d phi / d theta. Returns the KL-and-prior part of the loss."""
    return _step(opt, *abmll_outer_loss(model, cfg, batch, query))


def abmll_outer_loss(model, cfg: Config, batch=None, query=None):
    """`abmll_outer_step`'s loss beta [KL + prior_scale (-log p(theta))] and, for cfg.outer_grad "fo", its
    extra {theta factor: grad_phi NLL(query)} (else None), before any step."""
    layers = bayes_layers(model)
    extra = None
    if cfg.outer_grad == "fo":
        phi, theta = (list(layers_pairs(layers, g)) for g in ("phi", "theta"))
        extra = dict(zip(theta, torch.autograd.grad(nll_loss(model, query), phi)))
    if any(m.noise == "activation" for m in layers):
        with torch.no_grad():
            nll_loss(model, batch)  # records each layer's input; a fresh sample, as a new forward draws
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
    """One step per batch: on phi with the ABMLL inner loss, or on the LoRA adapters with the NLL. ABMLL's and
    Reptile's inner loops and test-time adaptation all use it, so adaptation starts alike at training and at
    test time: from a fresh AdamW, unless `opt` is one carried across tasks (the authors' code)."""
    opt = inner_optimizer(model, cfg) if opt is None else opt
    bayes = "phi" in param_groups(model)
    return [abmll_inner_step(model, opt, b, cfg) if bayes else lora_step(model, opt, b) for b in batches]


@torch.no_grad()
def _copy_into(params: dict, values: dict):
    for k, p in params.items():
        p.copy_(values[k])


def reptile_task(model, batches, cfg: Config, opt=None) -> list[float]:
    """Reptile: theta_i <- theta; K steps on task i (fresh AdamW, or `opt` carried across tasks);
    theta <- theta + eps (theta_i - theta)."""
    params = param_groups(model)["lora"]
    theta = {k: p.detach().clone() for k, p in params.items()}
    try:
        losses = adapt(model, batches, cfg, opt)
    except BaseException:  # a NaN, or Ctrl-C: the last good theta comes back
        _copy_into(params, theta)
        raise
    _copy_into(params, {k: torch.lerp(theta[k], p, cfg.reptile_eps) for k, p in params.items()})
    return losses


def abmll_task(model, outer_opt, batches, cfg: Config, inner_opt=None, query=None) -> dict:
    """One task of Algorithm 1 (`query`: one more batch of the task, for cfg.outer_grad "fo")."""
    try:
        inner = adapt(model, batches, cfg, inner_opt)  # 1) K inner steps on phi
        outer = abmll_outer_step(model, outer_opt, cfg, batches[-1], query)  # 2) one outer step on theta
    finally:
        for m in bayes_layers(model):  # 3) phi <- theta
            m.reset_phi()
            m.last = None  # the last forward's input is no longer needed
    return {"inner": inner, "outer": outer}


# one task of a meta-batch: its update computed, not applied; train.py averages them over the meta-batch's
# tasks (and ranks) into one step


def abmll_task_grads(model, batches, cfg: Config, query=None) -> tuple[dict, list[float]]:
    """`abmll_task` with theta's outer-step gradient returned rather than stepped: K inner steps on phi (a
    fresh AdamW), then ({theta factor: d/dtheta beta [KL + prior_scale (-log p(theta))] (+ FOMAML's query
    term)}, the inner losses); phi <- theta. Theta's .grad is left alone."""
    theta = list(layers_pairs(bayes_layers(model), "theta"))
    try:
        inner = adapt(model, batches, cfg)
        loss, extra = abmll_outer_loss(model, cfg, batches[-1], query)
        check_finite(loss)
        grads = torch.autograd.grad(loss, theta, allow_unused=True)
    finally:
        for m in bayes_layers(model):
            m.reset_phi()
            m.last = None
    grads = {p: torch.zeros_like(p) if g is None else g for p, g in zip(theta, grads)}
    for p, g in (extra or {}).items():
        grads[p].add_(g)
    return grads, inner


def reptile_delta(model, batches, cfg: Config) -> tuple[dict, list[float]]:
    """Reptile's task update, not applied: theta_i <- theta, K steps on task i (a fresh AdamW); returns
    ({name: theta_i - theta}, the losses) with theta put back."""
    params = param_groups(model)["lora"]
    theta = {k: p.detach().clone() for k, p in params.items()}
    try:
        losses = adapt(model, batches, cfg)
        delta = {k: p.detach() - theta[k] for k, p in params.items()}
    finally:  # a NaN, or Ctrl-C, too
        _copy_into(params, theta)
    return delta, losses


@contextmanager
def restored(model):
    """The adapters (never the base model) are copied on entering the block and put back on leaving it."""
    saved = {k: p.detach().clone() for k, p in adapter_params(model).items()}
    try:
        yield model
    finally:
        _copy_into(adapter_params(model), saved)


@contextmanager
def adapted(model, support, cfg: Config):
    """Test section of Algorithm 1: copy the adapters, K steps on the support batches, score the query
    inside the block; the adapters are restored after it."""
    with restored(model):
        adapt(model, support, cfg)
        yield model


# -----------------------------------------------------------------------------
# export to Hugging Face PEFT

HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj"}


def meta_to_hf_rows(w, n_heads: int):
    """Meta interleaves each head's RoPE pairs in wq / wk rows; HF stores first halves, then second halves."""
    out, cols = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, cols).transpose(1, 2).reshape(out, cols)


def save_peft(model, out_dir, source: str = "theta"):
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for the matching transformers
    LlamaForCausalLM: LoRA layers export A and B; ABMLL layers the posterior mean mu = s B A of `source`
    ("theta", or "phi" after test-time adaptation). B's wq / wk rows are permuted to HF's RoPE layout."""
    state, targets, args = {}, set(), model.args
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, BayesLoRALinear)):
            parts = name.split(".")  # layers.N.attention.wq
            hf = HF_NAMES[".".join(parts[-2:])]
            B, A = (m.lora_B, m.lora_A) if isinstance(m, LoRALinear) else m.pairs(source)[:2]
            if parts[-1] in ("wq", "wk"):
                B = meta_to_hf_rows(B, args.n_heads if parts[-1] == "wq" else args.n_kv_heads or args.n_heads)
            prefix = f"base_model.model.model.{'.'.join(parts[:-2])}.{hf}"
            state[f"{prefix}.lora_A.weight"] = A.detach().float().contiguous()
            state[f"{prefix}.lora_B.weight"] = B.detach().float().contiguous()
            targets.add(hf.rpartition(".")[2])
            rank, alpha = m.rank, m.alpha
    if not state:
        raise ValueError("save_peft: the model has no adapters (inject them first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
