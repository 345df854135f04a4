"""The adapter layers, in the shape of loralib's layers.py: LoRALinear, and BayesLoRALinear's four
LoRA pairs (Section 4 of the ABMLL paper).

Each layer wraps a frozen nn.Linear, keeps its weight under the key `weight` (so a Meta
checkpoint loads with strict=True), and adds low-rank factors B (d_out, r) and A (r, d_in):

    layer = LoRALinear(nn.Linear(64, 64), rank=8, alpha=16)        # y = x W0^T + s x A^T B^T
    layer = BayesLoRALinear(nn.Linear(64, 64))                     # y = x phi^T, phi ~ q(phi | D)

abmll.inject puts them into a model; abmll.py's update rules train them. BayesLoRALinear says
what it computes; kernels.py computes it without keeping anything weight-sized for backward.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import llama

NOISE = ("weight", "activation")  # where the sample is drawn: the paper's text, the authors' code
KL = ("closed", "mc")  # KL(q(phi|D) || p(phi|theta)): closed form, the authors' one-sample estimate


def check_options(noise: str, kl: str):
    """BayesLoRALinear's `noise` and `kl`: one line for a bad value or pair."""
    for name, value, known in (("noise", noise, NOISE), ("kl", kl, KL)):
        if value not in known:
            raise ValueError(f"{name} must be one of {', '.join(known)}, not {value!r}")
    if kl == "mc" and noise == "weight":
        raise ValueError("kl='mc' is the authors' one-sample KL on the layer outputs: "
                         "it needs noise='activation'")


def _pair(rank, base: nn.Linear):
    """(B, A): A as nn.Linear initializes its weight (kaiming-uniform, as loralib), B = 0. Adapters
    stay fp32 (fp64 for an fp64 base): AdamW's small steps are not rounded away in a bf16 model."""
    dt, dev = torch.promote_types(base.weight.dtype, torch.float32), base.weight.device
    A = torch.empty(rank, base.in_features, dtype=dt, device=dev)
    A = nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return nn.Parameter(torch.zeros(base.out_features, rank, dtype=dt, device=dev)), nn.Parameter(A)


class LoRALinear(nn.Module):
    """y = x W0^T + s x A^T B^T, s = alpha / r, with W0 frozen under its original key `weight`."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling, self.merged = rank, alpha, alpha / rank, False
        self.lora_B, self.lora_A = _pair(rank, base)

    def forward(self, x):
        y = F.linear(x, llama.autocast_weight(self, self.weight, x), self.bias)
        return y if self.merged else y + kernels.lowrank(x, self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self, sign: int = 1):
        """W0 <- W0 + s B A (one matmul per layer at inference); `unmerge()` takes it back out."""
        if self.merged != (sign > 0):
            self.weight += (sign * self.scaling * self.lora_B @ self.lora_A).to(self.weight.dtype)
            self.merged = sign > 0

    def unmerge(self):
        self.merge(-1)


class BayesLoRALinear(nn.Module):
    """Four LoRA pairs around a frozen W0 (Section 4): the mean and log-variance of theta and of phi.

        mu = s B_mean A_mean,   log sigma^2 = s B_logvar A_logvar + log_c
        q(phi | D) = N(W0 + mu_phi, sigma_phi^2),   p(phi | theta) = N(W0 + mu_theta, sigma_theta^2)

    The paper's "+ cI, c = e^-20" is read as the log-variance's offset (sigma ~ 4.5e-5 at the
    start; read literally sigma ~ 1 would drown W0). `mode` is explicit; .train() / .eval() never
    touch it: "sample": phi = W0 + mu_phi + sigma_phi * eps, one eps ~ N(0, I) of W0's shape per
    forward, shared by the batch (training, and the paper's one-sample inference);
    "mean": phi = W0 + mu_phi.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, log_c: float = -20.0,
                 noise: str = "weight", kl: str = "closed"):
        super().__init__()
        check_options(noise, kl)
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling, self.log_c = rank, alpha, alpha / rank, log_c
        self.mode, self.noise, self.kl_estimator = "sample", noise, kl
        self.last = None  # activation noise: (x, seed) of the last sampled forward, for the KL
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
        """(B_mean, A_mean, B_logvar, A_logvar) of "theta" or "phi", detached unless gradients are
        wanted."""
        names = ("mean_B", "mean_A", "logvar_B", "logvar_A")
        ts = tuple(getattr(self, f"{group}_{n}") for n in names)
        return ts if grad and torch.is_grad_enabled() else tuple(t.detach() for t in ts)

    def forward(self, x):
        if self.mode == "mean":
            return self.mean_forward(x)
        if self.mode != "sample":
            raise ValueError(f"BayesLoRALinear.mode must be 'sample' or 'mean', not {self.mode!r}")
        seed = int(torch.randint(2**62, ()))  # the global generator: manual_seed reproduces a run
        if self.noise == "activation":
            return self._forward_activation(x, seed)
        phi = self.pairs("phi")
        y = kernels.SampledLinear.apply(x, self.weight, *phi, self.scaling, self.log_c, seed)
        return y if self.bias is None else y + self.bias

    def _forward_activation(self, x, seed):
        """The authors' layer: y = W0 x + m + e^(l/2) eps, m = s B_mean A_mean x,
        l = s B_logvar A_logvar x + log_c, eps ~ N(0, 1) of y's shape. m + e^(l/2) eps keeps nothing
        output-sized for backward (`kernels.ActSample`)."""
        self.last = (x, seed)
        phi = self.pairs("phi")
        y = kernels.ActSample.apply(x, self.weight, *phi, self.scaling, self.log_c, seed)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # F.linear's: autocast's dtype

    def kl(self, wrt: str | None = None):
        """KL(q(phi|D) || p(phi|theta)) summed over the weight (W0 cancels in mu_q - mu_p). wrt =
        "phi" or "theta" detaches the other group. mu_q - mu_p = s [B_q B_p] [A_q; -A_p] is one
        low-rank product.

        Activation noise: summed over every output element of the last sampled forward (batch x
        tokens x d_out), in closed form between N(m_phi, e^l_phi) and N(m_theta, e^l_theta), or with
        kl="mc" as the authors' one-sample estimate log N(y~; m_phi, e^l_phi) - log N(y~; m_theta,
        e^l_theta) at that forward's sample y~ = m_phi + e^(l_phi / 2) eps. Valid after a forward:
        the terms depend on its input x."""
        bq, aq, blq, alq = self.pairs("phi", grad=wrt in (None, "phi"))
        bp, ap, blp, alp = self.pairs("theta", grad=wrt in (None, "theta"))
        factors = (torch.cat([bq, bp], 1), torch.cat([aq, -ap]),  # mu_q - mu_p
                   torch.cat([blq, blp], 1), torch.cat([alq, -alp]),  # lv_q - lv_p: log_c cancels
                   blp, -alp)  # -lv_p
        offsets = (0.0, 0.0, -self.log_c)
        if self.noise == "activation":  # the same three low-rank terms, on the outputs s B A x
            x, seed = self._last_input()
            terms = kernels.act_kl_terms
            if self.kl_estimator == "mc":
                terms = partial(kernels.act_mc_terms, seed=seed)
            return kernels.ActSum.apply(terms, self.scaling, offsets, x, *factors)
        return kernels.LowRankSum.apply(kernels.kl_terms, self.scaling, offsets, *factors)

    def neg_log_prior(self, a0: float = 1.0, b0: float = 0.01):
        """-log p(theta) = -log [N(mu_theta; 0, I) Gamma(1/sigma_theta^2; a0, b0)] summed over the
        weight; with activation noise over theta's output activations m_theta, l_theta of the last
        sampled forward."""
        b_mu, a_mu, b_lv, a_lv = self.pairs("theta")
        terms = partial(kernels.prior_terms, a0=a0, b0=b0)
        s, offsets = self.scaling, (0.0, -self.log_c)
        if self.noise == "activation":  # the same two terms, on the outputs s B A x
            x = self._last_input()[0]
            return kernels.ActSum.apply(terms, s, offsets, x, b_mu, a_mu, b_lv, -a_lv)
        return kernels.LowRankSum.apply(terms, s, offsets, b_mu, a_mu, b_lv, -a_lv)  # mu, -lv

    def logvar(self, group: str, x=None):
        """log sigma^2 of `group`: per weight entry (d_out, d_in), or with activation noise per
        output element for the input x (..., d_out)."""
        b_lv, a_lv = self.pairs(group)[2:]
        if self.noise == "activation":
            return kernels.lowrank(x, a_lv, b_lv, self.scaling) + self.log_c
        return self.scaling * b_lv @ a_lv + self.log_c

    def mean_forward(self, x):
        """W0 x + s B_mean A_mean x with phi's mean: the layer in "mean" mode."""
        y = F.linear(x, self.weight, self.bias)
        return y + kernels.lowrank(x, self.phi_mean_A, self.phi_mean_B, self.scaling)

    def _last_input(self):
        if self.last is None:
            raise RuntimeError("activation noise: kl() and neg_log_prior() need a sampled forward "
                               "first")
        return self.last
