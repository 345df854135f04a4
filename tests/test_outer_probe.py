"""outer_probe.py on a random tiny model: Reptile's reference rule and the JSON it writes."""

import json

import pytest
import torch

import outer_probe

TINY = ["--model", "tiny", "--random-init", "--device", "cpu"]


def test_reptile_at_eps_1_lands_on_phi_and_the_rows_are_written(tmp_path):
    out = tmp_path / "probe.json"
    rows = outer_probe.main(["--tasks", "2", "--json", str(out), "--", *TINY, "--reptile-eps", "1"])
    assert len(rows) == 2 and json.loads(out.read_text())["rows"] == rows
    for r in rows:  # theta's mean factors moved all the way to phi's: the product is mu_phi
        assert r["reptile_cos"] == pytest.approx(1, abs=1e-6) and r["reptile_ratio"] == pytest.approx(1, abs=1e-6)
        assert r["dphi"] > 0 and -1 <= r["cos"] <= 1 and r["theta_logvar"][0] <= r["theta_logvar"][2]


def test_outer_step_sizes_follow_the_optimizer():
    """SGD's step is lr beta grad: a tiny lr leaves theta almost where it was; AdamW's first step is
    ~lr per factor entry whatever beta is."""
    sgd = outer_probe.main(["--tasks", "1", "--", *TINY, "--outer-opt", "sgd", "--outer-lr", "1e-6"])[0]
    adamw = outer_probe.main(["--tasks", "1", "--", *TINY, "--outer-lr", "5e-3", "--beta", "1e-12"])[0]
    assert sgd["ratio"] < 1e-3 < adamw["ratio"]
    with pytest.raises(SystemExit):
        outer_probe.main(["--tasks", "0"])


def test_score_a_lora_theta_through_both_test_paths(tmp_path):
    """A LoRA theta scores alike as LoRA and as ABMLL's theta mean (sigma ~ 4.5e-5, beta 1e-8);
    shuffling its B entries changes the predictions."""
    import abmll
    import llama

    torch.manual_seed(0)
    model = abmll.inject(llama.random_model(llama.ModelArgs.from_name("tiny"), "cpu", torch.float32, 0), "lora")
    with torch.no_grad():
        for k, p in abmll.param_groups(model)["lora"].items():
            p.normal_(0, 0.05)
    path = tmp_path / "adapters.safetensors"
    abmll.save_adapters(model, path)
    out = {(a, perm): outer_probe.main(["--score", str(path), "--as", a, "--permute", perm, "--", *TINY])
           for a, perm in (("reptile", ""), ("abmll", ""), ("reptile", "B"))}
    assert out[("reptile", "")]["n"] == out[("abmll", "")]["n"] > 0
    assert out[("abmll", "")]["nll"] == pytest.approx(out[("reptile", "")]["nll"], abs=2e-3)
    assert abs(out[("reptile", "B")]["nll"] - out[("reptile", "")]["nll"]) > 1e-3
