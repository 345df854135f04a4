"""ablate.py: the median's interval against its binomial coverage, the ablations against the layer's
stated forward, and the smoke run (tiny random model, seconds)."""

import json

import torch
import torch.nn as nn

import ablate
import abmll
import kernels
from lora import BayesLoRALinear


def test_median_interval_is_the_order_statistics_that_cover_95_percent():
    assert ablate.median_interval(list(range(9))) == (4, 1, 7)  # k = 2: coverage 1 - 20/512
    assert ablate.median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few: min and max
    # coverage, by simulation: the true median of N(0, 1) is 0
    g = torch.Generator().manual_seed(0)
    trials = 4000
    hits = sum(lo <= 0 <= hi for _, lo, hi in (ablate.median_interval(torch.randn(20, generator=g)
                                                                       .tolist()) for _ in range(trials)))
    assert 0.945 <= hits / trials <= 0.975  # n = 20: k = 6, binomial coverage 0.9586


def test_ablations_replace_the_noise_and_the_kl_and_restore_them():
    torch.manual_seed(0)
    m = BayesLoRALinear(nn.Linear(6, 5, bias=False).double(), rank=2, log_c=-1.0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "weight":
                p.normal_(0, 0.3)
    x = torch.randn(3, 6, dtype=torch.float64)
    mu = m.scaling * m.phi_mean_B @ m.phi_mean_A
    sigma = torch.exp(0.5 * (m.scaling * m.phi_logvar_B @ m.phi_logvar_A + m.log_c))
    with ablate.ablated("no noise"):
        torch.testing.assert_close(m(x), x @ (m.weight + mu + sigma).T)  # eps = 1
        assert abmll.model_kl(m).item() != 0
    with ablate.ablated("neither"):
        assert abmll.model_kl(m).item() == 0
    assert not torch.allclose(m(x), x @ (m.weight + mu + sigma).T)  # the draws are back
    assert kernels.standard_normal((2,), torch.Generator().manual_seed(1), torch.float32,
                                   "cpu").ne(1).all()


def test_smoke_run_writes_every_part(tmp_path):
    out = tmp_path / "a.json"
    threads = torch.get_num_threads()
    try:
        ablate.main(["--model", "tiny", "--random-init", "--repeats", "2", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    P = json.loads(out.read_text())
    for mode in ("weight", "activation"):
        m = P["modes"][mode]
        assert set(m["step_s"]) == set(ablate.VARIANTS)
        assert set(m["parts_s"]) == {"noise", "KL", "sampled layer", "all"}
        lo_med_hi = m["ratio_vs_lora"]
        assert lo_med_hi[1] <= lo_med_hi[0] <= lo_med_hi[2]
    assert P["gemm_floor_s"] > 0 and P["rng"]["serial"] > 0
