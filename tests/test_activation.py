"""lora.py's / kernels.py's activation-space Bayesian LoRA (the authors' code): the layer's sampling
against its stated mean and variance, the KL against torch.distributions, the MC KL's convergence,
the prior against Normal and Gamma log_prob, gradients against gradcheck, and the first-order
(FOMAML) outer gradient against autograd."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.distributions import Gamma, Normal, kl_divergence

import abmll
import llama
from abmll import BayesLoRALinear, inject, param_groups


def act_layer(d_in=5, d_out=4, rank=2, log_c=-1.0, kl="closed", dtype=torch.float64, seed=0, std=0.3):
    torch.manual_seed(seed)
    m = BayesLoRALinear(nn.Linear(d_in, d_out, bias=True).to(dtype), rank=rank, alpha=2 * rank, log_c=log_c,
                        noise="activation", kl=kl)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n not in ("weight", "bias"):
                p.normal_(0, std)
    return m


def outputs(m, x, group):
    """m and l of `group` on x, computed densely: s B A x and s B A x + log_c."""
    mu = m.scaling * x @ (getattr(m, f"{group}_mean_B") @ getattr(m, f"{group}_mean_A")).T
    lv = m.scaling * x @ (getattr(m, f"{group}_logvar_B") @ getattr(m, f"{group}_logvar_A")).T + m.log_c
    return mu, lv


def test_sampled_output_has_the_stated_mean_and_variance():
    m, x = act_layer(), torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        ys = torch.stack([m(x) for _ in range(20000)])  # (S, 3, 4)
        mu, lv = outputs(m, x, "phi")
        base = nn.functional.linear(x, m.weight, m.bias)
    var = lv.exp()
    se = (var / len(ys)).sqrt()
    assert ((ys.mean(0) - base - mu).abs() < 5 * se).all()
    torch.testing.assert_close(ys.var(0), var, rtol=0.06, atol=0)  # sd of a variance estimate ~ 1% here
    with torch.no_grad(), abmll.bayes_mode(m, "mean"):  # evaluation as the authors': no noise
        torch.testing.assert_close(m(x), base + mu)


def test_zero_b_in_mean_mode_is_the_base_model():
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs.from_name("tiny"))
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        ref = model(tokens)
        inject(model, "abmll", targets=("wq", "wv", "wo", "w1", "w2", "w3"), noise="activation")
        with abmll.bayes_mode(model, "mean"):
            torch.testing.assert_close(model(tokens), ref, rtol=0, atol=0)
        assert len(abmll.bayes_layers(model)) == 6 * model.args.n_layers


def test_closed_form_kl_is_torch_distributions_and_mc_converges_to_it():
    m, x = act_layer(log_c=-0.5, std=0.2), torch.randn(2, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        closed = m.kl().item()
        (mq, lq), (mp, lp) = outputs(m, x, "phi"), outputs(m, x, "theta")
        ref = kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp, (0.5 * lp).exp())).sum().item()
        m.kl_estimator = "mc"
        mc = []
        for _ in range(4000):  # each forward draws a new eps; its KL uses that forward's sample
            m(x)
            mc.append(m.kl().item())
    assert closed == pytest.approx(ref, rel=1e-10)
    mc = torch.tensor(mc, dtype=torch.float64)
    assert abs(mc.mean().item() - closed) < 5 * mc.std().item() / len(mc) ** 0.5
    assert mc.std().item() > 0.1 * abs(closed)  # the estimate is noisy: the mean converges, not one sample


def test_mc_kl_is_the_log_density_ratio_at_the_forwards_sample():
    """One sample: log N(y~; m_phi, e^l_phi) - log N(y~; m_theta, e^l_theta), y~ the noise of that forward."""
    m, x = act_layer(kl="mc"), torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        (mq, lq), (mp, lp) = outputs(m, x, "phi"), outputs(m, x, "theta")
        sample = y - nn.functional.linear(x, m.weight, m.bias)  # y~ = m_phi + e^(l/2) eps
        ref = (Normal(mq, (0.5 * lq).exp()).log_prob(sample) - Normal(mp, (0.5 * lp).exp()).log_prob(sample)).sum()
        torch.testing.assert_close(m.kl(), ref, rtol=1e-9, atol=1e-9)


def test_neg_log_prior_is_normal_and_gamma_log_prob_on_theta_outputs():
    m, x = act_layer(log_c=-3.0), torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        mp, lp = outputs(m, x, "theta")
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731  fp32 constants would cost 1e-8
        for a0, b0 in ((1.0, 0.01), (2.5, 0.3)):
            ref = -(Normal(f64(0.0), f64(1.0)).log_prob(mp) + Gamma(f64(a0), f64(b0)).log_prob((-lp).exp())).sum()
            torch.testing.assert_close(m.neg_log_prior(a0, b0), ref, rtol=1e-12, atol=0)


def test_terms_need_a_sampled_forward():
    m = act_layer()
    with pytest.raises(RuntimeError, match="sampled forward"):
        m.kl()


@pytest.mark.parametrize("kl", ["closed", "mc"])
def test_gradcheck_float64(kl):
    """Output, KL and prior against finite differences in x and in all eight factors (the layer's own
    parameters are gradcheck's inputs, so the module is called as it is)."""
    m = act_layer(kl=kl)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    factors = [p for n, p in m.named_parameters() if n not in ("weight", "bias")]

    def f(x, *_):
        torch.manual_seed(0)  # the same eps on every call
        y = m(x)
        return y, m.kl(), m.neg_log_prior()

    assert torch.autograd.gradcheck(f, (x, *factors), eps=1e-6, atol=1e-5)


def test_activation_noise_trains_in_a_model_and_steps_move_only_their_group():
    torch.manual_seed(0)
    model = inject(llama.Transformer(llama.ModelArgs.from_name("tiny")), "abmll", noise="activation", kl="mc")
    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 512, (2, 12), generator=g), "answer_pos": torch.tensor([7, 11]),
                "answer_ids": torch.randint(0, 512, (2,), generator=g)} for _ in range(3)]
    cfg = abmll.Config(inner_lr=1e-3, outer_lr=1e-3, beta=1e-4, prior_scale=0.5)
    theta = {k: p.detach().clone() for k, p in param_groups(model)["theta"].items()}
    outer = torch.optim.AdamW(param_groups(model)["theta"].values(), lr=1e-3)
    out = abmll.abmll_task(model, outer, batches, cfg)
    assert len(out["inner"]) == 3 and torch.isfinite(torch.tensor(out["outer"]))
    assert all(not torch.equal(theta[k], p) for k, p in param_groups(model)["theta"].items() if "_B" in k)
    for m in abmll.bayes_layers(model):
        assert m.last is None and torch.equal(m.phi_mean_B, m.theta_mean_B)


@pytest.mark.parametrize("noise", ["weight", "activation"])
def test_fo_outer_gradient_with_beta_zero_is_the_query_nll_gradient_at_adapted_phi(noise):
    torch.manual_seed(0)
    model = inject(llama.Transformer(llama.ModelArgs.from_name("tiny")).double(), "abmll", noise=noise)
    with torch.no_grad():
        for p in abmll.adapter_params(model).values():
            p.normal_(0, 0.02)
    for m in abmll.bayes_layers(model):
        m.reset_phi()
    g = torch.Generator().manual_seed(1)
    mk = lambda: {"tokens": torch.randint(0, 512, (2, 12), generator=g), "answer_pos": torch.tensor([7, 11]),  # noqa: E731
                  "answer_ids": torch.randint(0, 512, (2,), generator=g)}
    batches, query = [mk(), mk()], mk()
    cfg = abmll.Config(inner_lr=1e-3, outer_lr=1e-3, beta=0.0, outer_grad="fo")
    twin = copy.deepcopy(model)  # the independent reference: adapt a copy, then autograd on the query NLL
    torch.manual_seed(5)
    abmll.adapt(twin, batches, cfg)
    phi = [p for m in abmll.bayes_layers(twin) for p in m.pairs("phi")]
    ref = torch.autograd.grad(abmll.nll_loss(twin, query), phi)
    theta = [p for m in abmll.bayes_layers(model) for p in m.pairs("theta")]
    outer = torch.optim.SGD(theta, lr=0.0)  # grads stay in .grad after the step
    torch.manual_seed(5)
    abmll.abmll_task(model, outer, batches, cfg, query=query)
    for p, r in zip(theta, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)
    assert any(r.abs().max() > 0 for r in ref)
    cfg.outer_grad = "kl"  # without fo and beta = 0, theta gets nothing
    torch.manual_seed(5)
    abmll.abmll_task(model, outer, batches, cfg, query=query)
    assert all(p.grad is None or not p.grad.any() for p in theta)


@pytest.mark.parametrize("kw, needle", [({"noise": "space"}, "noise must be one of"),
                                        ({"kl": "exact"}, "kl must be one of"),
                                        ({"kl": "mc"}, "needs noise='activation'")])
def test_bad_options_are_one_clear_error(kw, needle):
    model = llama.Transformer(llama.ModelArgs.from_name("tiny"))
    with pytest.raises(ValueError, match=needle):
        inject(model, "abmll", **kw)
    assert not abmll.bayes_layers(model)  # nothing half-injected
