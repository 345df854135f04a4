"""abmll.py, lora.py, kernels.py, hf.py: closed forms against torch.distributions, gradients against
gradcheck and a naive autograd reference, the four adapter tests, update-rule isolation, memory,
save/load and the PEFT export."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from torch.distributions import Gamma, Normal, kl_divergence

import abmll
import kernels
import llama
from abmll import BayesLoRALinear, LoRALinear, gaussian_kl, inject, neg_log_prior, param_groups


def tiny(seed=0):
    torch.manual_seed(seed)
    return llama.Transformer(llama.ModelArgs.from_name("tiny"))


def batch(seed=0, B=2, T=12, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, vocab, (B, T), generator=g),
            "answer_pos": torch.randint(T // 2, T, (B,), generator=g),
            "answer_ids": torch.randint(0, vocab, (B,), generator=g)}


def randomize(model, std=0.05, seed=1):
    """Non-zero B (and A) so every adapter path is exercised."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in abmll.adapter_params(model).values():
            p.normal_(0, std)
    for m in abmll.bayes_layers(model):
        m.reset_phi()
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def bayes_layer(d_in=5, d_out=4, rank=2, log_c=-1.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = BayesLoRALinear(nn.Linear(d_in, d_out, bias=False).to(dtype), rank=rank, alpha=2 * rank, log_c=log_c)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "weight":
                p.normal_(0, 0.3)
    return m


def dense(m, group):
    mu = m.scaling * getattr(m, f"{group}_mean_B") @ getattr(m, f"{group}_mean_A")
    lv = m.scaling * getattr(m, f"{group}_logvar_B") @ getattr(m, f"{group}_logvar_A") + m.log_c
    return mu, lv


def adapter_grads(m, loss):
    ps = [p for n, p in m.named_parameters() if n != "weight"]
    return torch.autograd.grad(loss, ps, allow_unused=True)


# -----------------------------------------------------------------------------
# closed forms


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mq, lq, mp, lp = torch.randn(4, 50, dtype=torch.float64).unbind()
    ours = gaussian_kl(mq, lq, mp, lp)
    ref = kl_divergence(Normal(mq, torch.exp(0.5 * lq)), Normal(mp, torch.exp(0.5 * lp)))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("a0,b0", [(1.0, 0.01), (2.5, 0.3)])
def test_neg_log_prior_matches_torch_distributions(a0, b0):
    torch.manual_seed(0)
    mu, lv = torch.randn(2, 50, dtype=torch.float64).unbind()
    lv = torch.cat([lv, torch.tensor([-20.0, 3.0], dtype=torch.float64)])  # the starting log-variance too
    mu = torch.cat([mu, torch.tensor([0.0, 2.0], dtype=torch.float64)])
    ours = neg_log_prior(mu, lv, a0, b0)
    shape, rate = torch.tensor(a0, dtype=torch.float64), torch.tensor(b0, dtype=torch.float64)
    ref = -(Normal(0.0, 1.0).log_prob(mu) + Gamma(shape, rate).log_prob(torch.exp(-lv)))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk", [None, 10])  # one chunk, and 2 rows a chunk
def test_layer_sums_and_gradients_match_dense(monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(kernels, "CHUNK", chunk)
    m = bayes_layer()
    (mq, lq), (mp, lp) = dense(m, "phi"), dense(m, "theta")
    kl_ref, prior_ref = gaussian_kl(mq, lq, mp, lp).sum(), neg_log_prior(mp, lp, 2.5, 0.5).sum()
    kl, prior = m.kl(), m.neg_log_prior(2.5, 0.5)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(prior, prior_ref, rtol=1e-12, atol=0)
    for ours, ref in zip(adapter_grads(m, kl + prior), adapter_grads(m, kl_ref + prior_ref)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    names = [n for n, _ in m.named_parameters() if n != "weight"]
    for wrt in ("phi", "theta"):  # each side's KL moves only its own group
        moved = {n for n, g in zip(names, adapter_grads(m, m.kl(wrt))) if g is not None}
        assert moved == {n for n in names if n.startswith(wrt)}


def test_fp32_sums_stay_accurate():
    """The prior is ~5e6 per entry at log_c = -20; fp32 chunks + fp64 accumulation keep ~1e-7 relative."""
    torch.manual_seed(0)
    layers = [BayesLoRALinear(nn.Linear(256, 384, bias=False), log_c=-20.0) for _ in range(3)]
    for m in layers:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("_B"):
                    p.normal_(0, 0.01)
    for m in layers:
        m64 = copy.deepcopy(m).double()
        kl32, kl64 = m.kl().item(), m64.kl().item()
        p32, p64 = m.neg_log_prior().item(), m64.neg_log_prior().item()
        assert p64 > 1e11
        assert abs(kl32 - kl64) <= 1e-5 * abs(kl64)  # KL is a sum of near-cancelling terms
        assert abs(p32 - p64) <= 1e-6 * abs(p64)


# -----------------------------------------------------------------------------
# the sampled layer


@pytest.mark.parametrize("chunk", [None, 10])  # one chunk, and 2 rows a chunk
def test_sampled_linear_gradcheck(monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(kernels, "CHUNK", chunk)
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(2, 3, 5, dtype=d, requires_grad=True)
    w0 = torch.randn(4, 5, dtype=d)
    Bm, Bv = ((0.3 * torch.randn(4, 2, dtype=d)).requires_grad_() for _ in range(2))
    Am, Av = ((0.3 * torch.randn(2, 5, dtype=d)).requires_grad_() for _ in range(2))
    f = lambda x, Bm, Am, Bv, Av: kernels.SampledLinear.apply(x, w0, Bm, Am, Bv, Av, 2.0, -1.0, 1234)  # fixed seed
    assert torch.autograd.gradcheck(f, (x, Bm, Am, Bv, Av))
    # and the forward is the intended sample: x (W0 + sigma * eps)^T with eps from the seeded generator
    if chunk is None:
        eps = torch.randn((4, 5), generator=torch.Generator().manual_seed(1234), dtype=d)
        ref = x @ (w0 + 2.0 * Bm @ Am + torch.exp(0.5 * (2.0 * Bv @ Av - 1.0)) * eps).T
        torch.testing.assert_close(f(x, Bm, Am, Bv, Av), ref)


def naive_sample(m, x):
    """The plain autograd layer: phi = W0 + mu + sigma * eps built in full and kept for backward."""
    seed = int(torch.randint(2**62, ()))
    mu, lv = dense(m, "phi")
    eps = torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(seed), dtype=lv.dtype)
    return x @ (m.weight + mu + torch.exp(0.5 * lv) * eps).T


def test_sample_mode_matches_naive_autograd():
    m = bayes_layer(d_in=6, d_out=5, rank=3)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.manual_seed(7)
    y = m(x)
    torch.manual_seed(7)  # the same seed, so the same eps
    y_ref = naive_sample(m, x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    for ours, ref in zip(adapter_grads(m, (y * g).sum()), adapter_grads(m, (y_ref * g).sum())):
        torch.testing.assert_close(ours, ref)
    torch.manual_seed(8)
    assert not torch.equal(m(x), y)  # a fresh sample each forward


def saved_bytes(fn, params=()):
    """Bytes of the distinct storages saved for backward, parameters excluded, and the largest one."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()), max(seen.values(), default=0)


def test_memory_lean_path_keeps_no_weight_sized_tensor():
    torch.manual_seed(0)
    d_in, d_out, N = 256, 192, 8
    base = nn.Linear(d_in, d_out, bias=False)
    bayes, lora = BayesLoRALinear(base), LoRALinear(base)
    x = torch.randn(N, d_in, requires_grad=True)
    weight_bytes = d_out * d_in * 4
    fused, fused_max = saved_bytes(lambda: bayes(x), bayes.parameters())
    naive, naive_max = saved_bytes(lambda: naive_sample(bayes, x), bayes.parameters())
    lean, _ = saved_bytes(lambda: lora(x), lora.parameters())
    assert naive_max >= weight_bytes  # the reference does keep phi / eps
    assert fused_max < weight_bytes and fused < naive - weight_bytes
    assert fused <= 1.05 * lean  # as lean as plain LoRA
    kl, kl_max = saved_bytes(lambda: bayes.kl() + bayes.neg_log_prior(), bayes.parameters())
    assert kl_max < weight_bytes / 8  # only adapter-sized gradients


def test_bf16_noise_survives():
    """A bf16 base model: the noise gets its own product instead of vanishing into W0 + sigma * eps, and
    the log-variance gradients agree with fp32's for the same eps."""
    torch.manual_seed(0)
    m32 = BayesLoRALinear(nn.Linear(128, 64, bias=False), log_c=-12.0)
    m16 = copy.deepcopy(m32)
    m16.weight.data = m16.weight.data.bfloat16()  # adapters stay fp32
    x = torch.randn(16, 128)
    with abmll.bayes_mode(m16, "mean"):
        mean = m16(x.bfloat16())
    grads = []
    for m, xx in ((m32, x), (m16, x.bfloat16())):
        torch.manual_seed(3)
        y = m(xx)
        (y.float() ** 2).sum().backward()
        grads.append(torch.cat([m.phi_logvar_A.grad.flatten(), m.phi_logvar_B.grad.flatten()]))
    assert (y != mean).float().mean() > 0.5  # sigma = e^-6 here: the noise shows in the bf16 output
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.parametrize("method", ["lora", "abmll"])
def test_cpu_bf16_autocast_step(method):
    """Under autocast the big matmuls run in bf16; the KL and the noise stay in fp32."""
    model = randomize(inject(tiny(), method))
    with torch.no_grad():  # q != p, so the KL is not 0
        for p in param_groups(model).get("phi", {}).values():
            p.add_(0.01 * torch.randn_like(p))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = abmll.nll_loss(model, batch())
        kl = abmll.model_kl(model) if method == "abmll" else torch.zeros(())
    (loss + kl).backward()
    grads = [p.grad for p in abmll.adapter_params(model).values() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)
    if method == "abmll":
        assert kl.item() > 0 and kl.item() == abmll.model_kl(model).item()


# -----------------------------------------------------------------------------
# the adapter tests every adapter deserves


@pytest.mark.parametrize("method", ["lora", "abmll"])
def test_zero_B_leaves_output_unchanged(method):
    model, b = tiny(), batch()
    ref = model(b["tokens"])
    inject(model, method)
    if method == "lora":
        assert torch.equal(model(b["tokens"]), ref)
        return
    with abmll.bayes_mode(model, "mean"):
        assert torch.equal(model(b["tokens"]), ref)
    sampled = model(b["tokens"])  # sigma = e^-10: a visible but tiny perturbation
    assert not torch.equal(sampled, ref)
    torch.testing.assert_close(sampled, ref, atol=1e-3, rtol=0)
    for m in abmll.bayes_layers(model):
        m.log_c = -math.inf  # sigma = 0
    torch.testing.assert_close(model(b["tokens"]), ref, atol=1e-5, rtol=0)


def test_merge_unmerge_round_trip():
    model, b = randomize(inject(tiny(), "lora")), batch()
    w = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    out = model(b["tokens"])
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    torch.testing.assert_close(model(b["tokens"]), out, atol=1e-5, rtol=1e-5)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    for k, v in w.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(b["tokens"]), out, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_strict(tmp_path):
    model = randomize(inject(tiny(), "abmll"))
    abmll.save_adapters(model, tmp_path / "a.safetensors")
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "a.safetensors"))
    assert keys == set(abmll.adapter_params(model)) and not any(k.endswith(".weight") for k in keys)
    other = inject(tiny(), "abmll")
    abmll.load_adapters(other, tmp_path / "a.safetensors")
    for k, p in abmll.adapter_params(model).items():
        assert torch.equal(p, abmll.adapter_params(other)[k])
    with pytest.raises(ValueError, match="a.safetensors: adapter keys do not match"):
        abmll.load_adapters(inject(tiny(), "lora"), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="shape"):
        abmll.load_adapters(inject(tiny(), "abmll", rank=4), tmp_path / "a.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors: cannot read"):
        abmll.load_adapters(other, tmp_path / "bad.safetensors")


def test_inject_freezes_base_keeps_keys_and_rejects_bad_input():
    model = tiny()
    keys = set(model.state_dict())
    inject(model, "abmll")
    assert keys <= set(model.state_dict())  # base weights keep their keys: strict loading still works
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    groups = param_groups(model)
    assert trainable == set(groups["theta"]) | set(groups["phi"]) and len(groups["phi"]) == 2 * 3 * 4
    with pytest.raises(ValueError, match="'wz'"):
        inject(tiny(), "lora", targets=("wq", "wz"))
    with pytest.raises(ValueError, match="rank"):
        inject(tiny(), "lora", rank=0)
    with pytest.raises(ValueError, match="'maml'"):
        inject(tiny(), "maml")
    with pytest.raises(ValueError, match="already"):
        inject(model, "lora")


def test_mode_is_explicit():
    model = inject(tiny(), "abmll")
    model.eval()
    assert all(m.mode == "sample" for m in abmll.bayes_layers(model))
    with abmll.bayes_mode(model, "mean"):
        assert all(m.mode == "mean" for m in abmll.bayes_layers(model))
    assert all(m.mode == "sample" for m in abmll.bayes_layers(model))


def test_predictive_probs_averages_samples():
    model, b = randomize(inject(tiny(), "abmll"), std=0.3), batch()
    choices = torch.tensor([[3, 9, 27, -1], [5, 6, 7, 8]])
    torch.manual_seed(0)
    probs = abmll.predictive_probs(model, b, choices, samples=3)
    torch.manual_seed(0)
    ref = torch.zeros(2, 4)
    for _ in range(3):
        logits = model(b["tokens"], logits_at=b["answer_pos"][:, None])[:, 0]
        ref[0, :3] += logits[0, [3, 9, 27]].softmax(-1)
        ref[1] += logits[1, [5, 6, 7, 8]].softmax(-1)
    torch.testing.assert_close(probs, ref / 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


# -----------------------------------------------------------------------------
# update rules: each moves only its own group


CFG = abmll.Config(inner_lr=1e-3, outer_lr=1e-3, lr=1e-3, beta=1e-4)  # large enough that every step shows


def opt(model, group, lr=1e-3):
    return torch.optim.AdamW(param_groups(model)[group].values(), lr=lr)


def test_lora_step_moves_only_lora():
    model = randomize(inject(tiny(), "lora"))
    before = snapshot(model)
    abmll.lora_step(model, opt(model, "lora"), batch())
    assert changed(before, model) == set(param_groups(model)["lora"])


def test_abmll_steps_move_only_their_group_and_reset_phi_exactly():
    model = randomize(inject(tiny(), "abmll"))
    before = snapshot(model)
    abmll.abmll_inner_step(model, opt(model, "phi"), batch(), CFG)
    assert changed(before, model) == set(param_groups(model)["phi"])
    before = snapshot(model)
    abmll.abmll_outer_step(model, opt(model, "theta"), CFG)
    assert changed(before, model) == set(param_groups(model)["theta"])
    outer, before = opt(model, "theta"), snapshot(model)
    abmll.abmll_task(model, outer, [batch(1), batch(2)], CFG)
    assert changed(before, model) <= set(param_groups(model)["theta"]) | set(param_groups(model)["phi"])
    for m in abmll.bayes_layers(model):  # phi <- theta, bit for bit
        for n in ("mean_A", "mean_B", "logvar_A", "logvar_B"):
            assert torch.equal(getattr(m, f"phi_{n}"), getattr(m, f"theta_{n}"))


def test_outer_step_follows_beta_times_kl_plus_prior():
    """With SGD(lr=1) the outer step's update is beta grad_theta [KL(q||p) + (-log p(theta))], dense in fp64."""
    model = randomize(inject(tiny().double(), "abmll"), std=0.02)
    with torch.no_grad():
        for p in param_groups(model)["phi"].values():
            p.add_(0.01 * torch.randn_like(p))
    theta = param_groups(model)["theta"]
    ref = sum(gaussian_kl(*dense(m, "phi"), *dense(m, "theta")).sum() + neg_log_prior(*dense(m, "theta")).sum()
              for m in abmll.bayes_layers(model))
    grads = torch.autograd.grad(CFG.beta * ref, list(theta.values()))
    before = {k: p.detach().clone() for k, p in theta.items()}
    abmll.abmll_outer_step(model, torch.optim.SGD(theta.values(), lr=1.0), CFG)
    for (k, p), g in zip(theta.items(), grads):
        torch.testing.assert_close(before[k] - p, g, rtol=1e-6, atol=1e-9)


def test_reptile_interpolates_toward_the_adapted_weights():
    model = randomize(inject(tiny(), "lora"))
    theta = {k: p.detach().clone() for k, p in param_groups(model)["lora"].items()}
    twin = copy.deepcopy(model)
    abmll.adapt(twin, [batch(1), batch(2)], CFG)  # theta_i: the same K steps, deterministic for LoRA
    before = snapshot(model)
    abmll.reptile_task(model, [batch(1), batch(2)], CFG)
    assert changed(before, model) == set(theta)
    for k, p in param_groups(model)["lora"].items():
        torch.testing.assert_close(p, theta[k] + 0.5 * (param_groups(twin)["lora"][k] - theta[k]))


def test_reptile_b_only_holds_every_a_and_its_delta_agrees():
    """cfg.reptile_factors "B": the B factors move as Reptile's, every A comes back to theta's; the
    meta-batch path's reptile_delta is zero for A and the task step for B."""
    cfg = dataclasses.replace(CFG, reptile_factors="B")
    model = randomize(inject(tiny(), "lora"))
    theta = {k: p.detach().clone() for k, p in param_groups(model)["lora"].items()}
    twin = copy.deepcopy(model)
    abmll.adapt(twin, [batch(1), batch(2)], cfg)
    delta, _ = abmll.reptile_delta(copy.deepcopy(model), [batch(1), batch(2)], cfg)
    abmll.reptile_task(model, [batch(1), batch(2)], cfg)
    for k, p in param_groups(model)["lora"].items():
        adapted = param_groups(twin)["lora"][k]
        if k.endswith("lora_A"):
            assert torch.equal(p, theta[k]) and not torch.equal(adapted, theta[k]) and not delta[k].any()
        else:
            torch.testing.assert_close(p, theta[k] + 0.5 * (adapted - theta[k]))
            torch.testing.assert_close(delta[k], adapted - theta[k])


@pytest.mark.parametrize("method", ["lora", "abmll"])
def test_test_time_adaptation_restores_adapters(method):
    model = randomize(inject(tiny(), method))
    before = snapshot(model)
    with abmll.adapted(model, [batch(1), batch(2)], CFG):
        moved = changed(before, model)
    group = "phi" if method == "abmll" else "lora"
    assert moved == set(param_groups(model)[group])  # never the base model, never theta
    assert not changed(before, model)


def test_non_finite_loss_stops_and_keeps_last_good_adapters(monkeypatch):
    model = randomize(inject(tiny(), "abmll"))
    real, calls = abmll.nll_loss, []

    def flaky(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(abmll, "nll_loss", flaky)
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        abmll.abmll_task(model, opt(model, "theta"), [batch(1), batch(2), batch(3)], CFG)
    assert not changed(before, model)  # theta untouched, phi back to theta
    lora = randomize(inject(tiny(), "lora"))
    before, calls[:] = snapshot(lora), []
    with pytest.raises(FloatingPointError):
        abmll.reptile_task(lora, [batch(1), batch(2)], CFG)
    assert not changed(before, lora)


# -----------------------------------------------------------------------------
# export to Hugging Face PEFT


@pytest.mark.parametrize("method", ["lora", "abmll"])
def test_save_peft_loads_in_peft_with_the_same_logits(tmp_path, method):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=300, max_position_embeddings=512,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0, 0.08)
    hf.save_pretrained(tmp_path / "base")
    ours, _ = llama.load(tmp_path / "base")  # q/k rows permuted into Meta's layout
    randomize(inject(ours, method), std=0.1)
    abmll.save_peft(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = torch.randint(0, 300, (2, 16))
    with torch.no_grad(), abmll.bayes_mode(ours, "mean"):  # ABMLL exports its posterior mean
        out = ours(tokens)
        diff = (out - theirs(tokens).logits).abs().max().item()
        with theirs.disable_adapter():
            base_diff = (out - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-4 and base_diff > 1e-2, (diff, base_diff)  # equal, and the adapter does matter
