"""Memory-lean autograd kernels: what lora.py's layer computes, with the saved-tensor plan.

Read lora.py and abmll.py first: BayesLoRALinear says what is computed (a weight or activation
sample, the KL and the prior), abmll.gaussian_kl / neg_log_prior give the equations per entry
(the tests hold these sums to them). This file computes the same numbers without ever holding a
weight-sized (d_out x d_in) or, for activation noise, an output-sized tensor for backward. Each
torch.autograd.Function states in its docstring what it keeps and the derivatives backward uses:

    SampledLinear   y = x phi^T, phi = W0 + mu + sigma * eps        noise on the weights (paper)
    ActSample       y = x W0^T + m + e^(l/2) eps                    noise on the outputs (authors)
    LowRankSum      sum_ij f(s B_1 A_1 + c_1, ...)_ij, row chunks   KL and prior on the weights
    ActSum          the same sum over a forward's outputs s B A x   KL and prior on the outputs

`kl_terms` / `prior_terms` (`act_kl_terms` / `act_mc_terms` on the outputs) are the f above: a
chunk's sum and its elementwise derivatives. Nothing here imports lora.py or abmll.py.
"""

import math

import torch
import torch.nn.functional as F

# weight-sized transients are made this many entries at a time (16 MiB in fp32), so the full
# d_out x d_in matrices of sigma, eps or the KL terms never exist at once, whatever the model's size
CHUNK = 1 << 22


def lowrank(x, A, B, s):
    """s x A^T B^T; scaling B rather than the output saves a pass over the activations."""
    return F.linear(F.linear(x, A.to(x.dtype)), (B * s).to(x.dtype))


# -----------------------------------------------------------------------------
# one reparameterized weight sample per forward, with nothing weight-sized kept for backward


def standard_normal(shape, gen, dtype, device):
    """eps ~ N(0, I) from `gen`: every draw of the noise, weights' and outputs', comes from here
    (ablate.py replaces it by a fill to time the draws). torch's CPU normal_ runs on one thread."""
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


def _noise_rows(b_lv, a_lv, s, log_c, seed):
    """Yield (rows, sigma * eps) chunk by chunk, sigma = exp(½ (s B A + log_c)), eps ~ N(0, I).

    Same seed, same chunks, same order: backward regenerates exactly the forward's eps, unstored.
    """
    gen = torch.Generator(a_lv.device).manual_seed(seed)
    # a 0-d tensor on the device: no host-to-device copy per chunk
    half_c = torch.full((), 0.5 * log_c, dtype=a_lv.dtype, device=a_lv.device)
    step = max(1, CHUNK // a_lv.shape[1])
    for i in range(0, b_lv.shape[0], step):
        rows = slice(i, i + step)
        sigma = torch.addmm(half_c, b_lv[rows], a_lv, alpha=0.5 * s).exp_()  # (rows, d_in)
        eps = standard_normal(sigma.shape, gen, sigma.dtype, sigma.device)
        yield rows, sigma.mul_(eps)


class SampledLinear(torch.autograd.Function):
    """y = x phi^T, phi = W0 + mu + sigma * eps, mu = s B_mu A_mu, sigma = exp(½ (s B_lv A_lv + log_c)).

    Saves x, W0 (a parameter), the four factors and the seed; backward regenerates sigma * eps
    chunk by chunk and makes G = g^T x per chunk, dropping it after:
        dL/dx = g phi,   dL/dmu = G,   dL/dlogvar = ½ G * sigma * eps,
        dL/dB = s (dL/dM) A^T,   dL/dA = s B^T (dL/dM)   for M = mu and M = logvar.
    """

    @staticmethod
    def forward(ctx, x, w0, b_mu, a_mu, b_lv, a_lv, s, log_c, seed):
        ctx.save_for_backward(x, w0, b_mu, a_mu, b_lv, a_lv)
        dev = x.device.type  # the big matmuls in autocast's dtype if on; the noise always in fp32
        ctx.s, ctx.log_c, ctx.seed = s, log_c, seed
        ctx.dt = dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        # fp32 keeps sigma * eps (~1e-3 of W0) to ~1e-4 relative inside phi: one matmul, like
        # LoRA's base. In bf16 (weights or autocast) W0 + sigma * eps would round back to W0:
        # the noise gets its own product.
        full = w0.dtype == b_lv.dtype == dt
        with torch.autocast(dev, enabled=False):
            x2, outs = x.reshape(-1, x.shape[-1]).to(dt), []  # (N, d_in)
            for rows, noise in _noise_rows(b_lv, a_lv, s, log_c, seed):
                if full:
                    outs.append(x2 @ noise.add_(w0[rows]).addmm_(b_mu[rows], a_mu, alpha=s).T)
                else:
                    base = x2 @ w0[rows].to(dt).T
                    outs.append(base + x2 @ noise.to(dt).T + lowrank(x2, a_mu, b_mu[rows], s))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)  # (N, d_out)
        return y.view(*x.shape[:-1], -1)  # (..., d_out)

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):  # dtypes are explicit, as in forward
            return SampledLinear._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x, w0, b_mu, a_mu, b_lv, a_lv = ctx.saved_tensors
        s, dt = ctx.s, ctx.dt
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, d_in)
        g2 = g.reshape(-1, g.shape[-1]).to(dt)  # (N, d_out)
        grads = [torch.empty_like(b_mu), torch.zeros_like(a_mu),
                 torch.empty_like(b_lv), torch.zeros_like(a_lv)]
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
        gx = None if gx is None else gx.to(x.dtype).view_as(x)
        return gx, None, *grads, None, None, None


# -----------------------------------------------------------------------------
# the authors' reading: noise on the layer's output, one log-variance per output element and token


def _act_dtype(x, factor):
    """fp32, or fp64 for fp64 inputs or factors."""
    return torch.promote_types(torch.promote_types(x.dtype, factor.dtype), torch.float32)


def _act_eps(shape, seed, dtype, device):
    """eps ~ N(0, 1) of the output's shape from its own generator: the same seed, the same eps."""
    return standard_normal(shape, torch.Generator(device).manual_seed(seed), dtype, device)


def _act_noise(u_lv, b_lv, s, log_c, seed):
    """e^(l/2) eps (N, d_out), l = s B_logvar u + log_c for u = A_logvar x (N, r), in one buffer."""
    sigma = torch.mm(u_lv, (0.5 * s * b_lv.to(u_lv.dtype)).T).add_(0.5 * log_c).exp_()
    return sigma.mul_(_act_eps(sigma.shape, seed, sigma.dtype, sigma.device))


class ActSample(torch.autograd.Function):
    """y = x W0^T + m + e^(l/2) eps, m = s B_mean A_mean x, l = s B_logvar A_logvar x + log_c,
    eps ~ N(0, 1) of y's shape: the authors' sampled layer.

    Keeps x, W0, the factors and u = [A_mean; A_logvar] x (N, 2r); backward regenerates
    e^(l/2) eps from the seed rather than keep anything output-sized:
        dL/dm = g,   dL/dl = ½ g e^(l/2) eps,   dL/dB_M = s (dL/dM)^T u_M,   dL/du_M = s (dL/dM) B_M,
        dL/dA = (dL/du)^T x,   dL/dx = g W0 + (dL/du) [A_mean; A_logvar]   for M = m and M = l.
    Each pass adds its terms into one output-sized buffer, the product with W0 last (a GEMM's C):
    on a CPU a fresh buffer of that size costs as much as the arithmetic done in it.
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
            d_a = (du.T @ x2.to(dt)).split(r) if need[3] or need[5] else (None, None)  # (r, d_in)
            dx = None
            if need[0]:  # g W0 in forward's dtype, then the low-rank part added into its buffer
                dx = (g2.to(ctx.dt) @ w0.to(ctx.dt)).to(dt)  # (N, d_in)
                dx = dx.addmm_(du, torch.cat([a_mu, a_lv]).to(dt)).to(x.dtype).view_as(x)
        d_a_mu, d_a_lv = (None if d is None else d.to(a.dtype) for d, a in zip(d_a, (a_mu, a_lv)))
        return dx, None, d_b_mu, d_a_mu, d_b_lv, d_a_lv, None, None, None


# -----------------------------------------------------------------------------
# sums of elementwise terms over low-rank matrices: the KL and the prior, never materialized


def kl_terms(d, dlv, neg_lv_p, need):
    """gaussian_kl summed over a chunk of d = mu_q - mu_p, dlv = lv_q - lv_p, -lv_p, and its
    derivatives:
        KL = ½ [-dlv + e^dlv + d^2 e^-lv_p - 1],
        dKL/dd = d e^-lv_p,   dKL/d(dlv) = ½ (e^dlv - 1),   dKL/d(-lv_p) = ½ d^2 e^-lv_p.
    The chunks are `LowRankSum`'s transients, so this works in place."""
    d_w = neg_lv_p.exp_().mul_(d)  # d / sigma_p^2
    value = 0.5 * (torch.dot(d_w.flatten(), d.flatten()) - dlv.sum() - d.numel())
    ratio = dlv.exp_()  # sigma_q^2 / sigma_p^2
    value = value + 0.5 * ratio.sum()
    return value, (d_w, ratio.sub_(1).mul_(0.5), 0.5 * d_w * d if need[2] else None)


def prior_terms(mu, neg_lv, need, a0, b0):
    """neg_log_prior summed over a chunk; d/dmu = mu, d/d(-lv) = b0 e^-lv - (a0 - 1)."""
    const = 0.5 * math.log(2 * math.pi) - a0 * math.log(b0) + math.lgamma(a0)
    value = 0.5 * torch.dot(mu.flatten(), mu.flatten()) - (a0 - 1) * neg_lv.sum() + const * mu.numel()
    b0_tau = neg_lv.exp_().mul_(b0)  # b0 / sigma^2
    return value + b0_tau.sum(), (mu, b0_tau.sub_(a0 - 1))


class LowRankSum(torch.autograd.Function):
    """sum_ij f(M_1, ..., M_k)_ij, M_n = s B_n A_n + c_n, row chunk by row chunk, gradients made in
    forward.

    `terms` gives a chunk's sum and the elementwise dF/dM_n; dL/dB_n = s (dF/dM_n) A_n^T and
    dL/dA_n = s B_n^T (dF/dM_n) accumulate as we go, so only they (adapter-sized) are kept for
    backward. Elementwise work and each chunk's sum in fp32 (fp64 factors: fp64), chunk sums
    accumulated in fp64: the prior is ~5e6 per entry at the start, ~1e14 over a model.
    """

    @staticmethod
    def forward(ctx, terms, s, offsets, *factors):
        # weight-space terms stay fp32 under autocast
        with torch.autocast(factors[0].device.type, enabled=False):
            return LowRankSum._forward(ctx, terms, s, offsets, *factors)

    @staticmethod
    def _forward(ctx, terms, s, offsets, *factors):
        Bs, As = factors[0::2], factors[1::2]
        dt, dev = torch.promote_types(As[0].dtype, torch.float32), As[0].device
        need = [ctx.needs_input_grad[3 + 2 * n] or ctx.needs_input_grad[4 + 2 * n]
                for n in range(len(Bs))]
        grads = [torch.zeros(f.shape, dtype=dt, device=dev) if need[i // 2] else None
                 for i, f in enumerate(factors)]
        As, offsets = [A.to(dt) for A in As], [torch.full((), c, dtype=dt, device=dev) for c in offsets]
        total = torch.zeros((), dtype=torch.float64, device=dev)
        step = max(1, CHUNK // As[0].shape[1])
        for i in range(0, Bs[0].shape[0], step):
            rows = slice(i, i + step)
            Ms = [torch.addmm(c, B[rows].to(dt), A, alpha=s)
                  for B, A, c in zip(Bs, As, offsets)]  # (rows, d_in) each
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
        grads = (None if t is None else t * g.to(t.dtype) for t in ctx.saved_tensors)
        return None, None, None, *grads


def act_kl_terms(d, dlv, neg_lv_p, need):
    """`kl_terms` on the outputs, dKL/d(-l_p) = ½ d^2 e^-l_p made in d's buffer, not a new one."""
    value, (d_w, d_dlv, _) = kl_terms(d, dlv, neg_lv_p, (need[0], need[1], False))  # d unchanged
    return value, (d_w, d_dlv, d.mul_(d_w).mul_(0.5) if need[2] else None)


def act_mc_terms(d, dlv, neg_lv_p, need, seed):
    """The authors' one-sample KL, log N(y~; m_q, e^l_q) - log N(y~; m_p, e^l_p) summed over the
    output elements at the forward's sample y~ = m_q + e^(l_q / 2) eps (log 2 pi cancels), and its
    derivatives:
        KL = ½ [z^2 e^-l_p - dlv - eps^2],   z = y~ - m_p = d + e^(l_q / 2) eps,   l_q = dlv - (-l_p),
        dKL/dd = w,   dKL/d(dlv) = ½ (w e^(l_q / 2) eps - 1),   dKL/d(-l_p) = ½ (z w - w e^(l_q / 2) eps),
    w = z e^-l_p, d = m_q - m_p, dlv = l_q - l_p. The inputs are `ActSum`'s transients: this works
    in place."""
    eps = _act_eps(d.shape, seed, d.dtype, d.device)  # the forward's: same seed, shape and dtype
    value = -0.5 * (torch.dot(eps.flatten(), eps.flatten()) + dlv.sum())
    noise = dlv.sub_(neg_lv_p).mul_(0.5).exp_().mul_(eps)  # e^(l_q / 2) eps, in dlv's buffer
    z = d.add_(noise)
    w = neg_lv_p.exp_().mul_(z)  # z / sigma_p^2
    value = value + 0.5 * torch.dot(w.flatten(), z.flatten())
    w_noise = noise.mul_(w)
    d_neg_lv_p = z.mul_(w).sub_(w_noise).mul_(0.5) if need[2] else None
    return value, (w, w_noise.sub_(1).mul_(0.5), d_neg_lv_p)


class ActSum(torch.autograd.Function):
    """sum_ij f(M_1, ..., M_k)_ij over the output elements of one forward,
    M_n = s B_n A_n x + c_n (N, d_out): `LowRankSum` on a layer's outputs, with the same `terms`.

    Forward turns their elementwise dF/dM_n into dL/dB_n = s (dF/dM_n)^T u_n and
    dL/du_n = s (dF/dM_n) B_n, u_n = A_n x (N, r_n); backward only multiplies:
    dL/dA_n = (dL/du_n)^T x, dL/dx = sum_n (dL/du_n) A_n. So x (which the layer's own product keeps
    already) and rank-sized tensors are all it keeps: no output-sized term is stored or recomputed.
    Sums in fp32 (fp64 factors: fp64), returned in fp64.
    """

    @staticmethod
    def forward(ctx, terms, s, offsets, x, *factors):
        with torch.autocast(x.device.type, enabled=False):  # the KL and prior stay fp32 in autocast
            return ActSum._forward(ctx, terms, s, offsets, x, *factors)

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
                            for n, (dM, u, B) in enumerate(zip(dMs, us, Bs))], 1)  # (N, sum r_n)
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
