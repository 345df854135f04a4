"""Where ABMLL's outer step sends theta, beside where Reptile's rule would: the first tasks of a
run, task by task, in weight space.

    python outer_probe.py --tasks 6 --json out.json -- --split diag --inner-lr 3e-3 \
        --outer-lr 5e-3 --beta 1e-12
    python outer_probe.py --tasks 6 -- --split diag --inner-lr 3e-3 --outer-opt sgd \
        --outer-lr 8 --beta 1e-10 --b0 1e-8

After `--`, train.py's flags (the method is ABMLL). The first --tasks tasks of epoch 0, in
train.py's order, run as in training (K inner steps on phi, one outer step, phi <- theta), and for
each the probe reports, over every adapted layer's mean mu = s B A (weight space):
    dphi    = mu_phi - mu_theta          what the inner loop found
    dtheta  = mu_theta' - mu_theta       what the outer step did (theta' after it)
    cos(dtheta, dphi) and |dtheta| / |dphi|
    Reptile's: the same two for theta's mean factors moved eps of the way to phi's (B and A each,
    as abmll.reptile_task moves a LoRA pair), from the same theta and phi
and theta's log-variance (min, mean, max over the entries) after the step. A Reptile-like outer
step has cos near 1; AdamW's ~lr sign(g) step does not.

    python outer_probe.py --score RUN/adapters.safetensors --as abmll --permute A -- --split diag

scores a LoRA run's saved adapters (Regular LoRA's, Reptile's) on the held-out tasks' validation
examples after the run's test-time adaptation, as LoRA (`--as reptile`) or as ABMLL's theta mean
(`--as abmll`: log-variance at its start, the ABMLL inner loss and sampling), optionally with the
entries of every A (or B, or both) shuffled within each matrix: whether a meta-learned theta works
through ABMLL's test path, and which of its factors carry what it learned.
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import abmll
import eval as evaluation
import heldout
import train
from resume import write_json


def flat(ts) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts])


def means(layers, group: str) -> torch.Tensor:
    return flat(m.scaling * torch.mm(*m.pairs(group, grad=False)[:2]) for m in layers)


def cosine(a, b) -> float:
    return (a @ b / (a.norm() * b.norm())).item() if a.norm() > 0 and b.norm() > 0 else 0.0


def probe(train_argv, tasks: int) -> list[dict]:
    args = train.parse_args(["--method", "abmll", *train_argv])
    cfg = train.config(args)
    torch.manual_seed(args.seed)
    model, tok, opt = train.build(args, cfg)
    split = train.load_split(args, tok)
    if args.prior_weight == "beta/M":
        cfg.prior_scale = 1 / len(split.train)
    layers, rows = abmll.bayes_layers(model), []
    inner_opt = opt if args.inner_opt == "persistent" else None
    for i, (task, support, query) in enumerate(train.epoch_tasks(split, 0, args, cfg)):
        if i == tasks:
            break
        batches, query = train.task_batches(support, query, tok, args)
        theta0 = means(layers, "theta")
        th_factors = [tuple(t.clone() for t in m.pairs("theta", grad=False)[:2]) for m in layers]
        inner = abmll.inner_optimizer(model, cfg) if inner_opt is None else inner_opt
        losses = [abmll.abmll_inner_step(model, inner, b, cfg) for b in batches]
        dphi = means(layers, "phi") - theta0
        eps, phi_factors = cfg.reptile_eps, [m.pairs("phi", grad=False)[:2] for m in layers]
        reptile = flat(m.scaling * torch.lerp(b, pb, eps) @ torch.lerp(a, pa, eps)
                       for m, (b, a), (pb, pa) in zip(layers, th_factors, phi_factors)) - theta0
        try:
            abmll.abmll_outer_step(model, opt, cfg, batches[-1], query)
        finally:
            abmll.end_task(model)
        dtheta = means(layers, "theta") - theta0
        lv = flat(m.logvar("theta").detach() for m in layers) if cfg.noise == "weight" else None
        rows.append({"task": task, "inner_loss_first": losses[0], "inner_loss_last": losses[-1],
                     "dphi": dphi.norm().item(), "dtheta": dtheta.norm().item(),
                     "cos": cosine(dtheta, dphi), "ratio": (dtheta.norm() / dphi.norm()).item(),
                     "reptile_cos": cosine(reptile, dphi),
                     "reptile_ratio": (reptile.norm() / dphi.norm()).item(),
                     "theta_logvar": None if lv is None else
                     [lv.min().item(), lv.mean().item(), lv.max().item()]})
    return rows


def score(path: str, method: str, permute: str, train_argv, part: str = "val") -> dict:
    """`path`'s LoRA factors (lora_B, lora_A), each matrix's entries shuffled where `permute` names
    its factor, scored by `method`'s test path (module docstring)."""
    args = train.parse_args(["--method", method, *train_argv])
    cfg = train.config(args)
    torch.manual_seed(args.seed)
    model, tok, _ = train.build(args, cfg)
    split = train.load_split(args, tok)
    params, g = abmll.adapter_params(model), torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for k, v in load_file(path).items():
            layer, factor = k.rsplit(".lora_", 1)
            if factor in permute:
                v = v.flatten()[torch.randperm(v.numel(), generator=g)].reshape(v.shape)
            params[f"{layer}.theta_mean_{factor}" if method == "abmll" else k].copy_(v)
    abmll.end_task(model)  # phi <- theta (nothing for LoRA)
    rows = heldout.evaluate(model, split.held_out, part, tok, args, cfg, stream=(part, 0))
    m = evaluation.metrics(rows[("none", 0)])
    return {"adapters": path, "as": method, "permute": permute, "part": part, **m}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    mine, rest = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=6, help="tasks to probe (default 6)")
    p.add_argument("--json", default=None, help="write the rows here as well")
    p.add_argument("--score", default=None, help="a LoRA run's adapters.safetensors to score")
    p.add_argument("--as", dest="as_", choices=["reptile", "abmll"], default="abmll")
    p.add_argument("--permute", choices=["", "A", "B", "AB"], default="", help="factors shuffled")
    a = p.parse_args(mine)
    if a.tasks < 1:
        p.error(f"--tasks must be at least 1, got {a.tasks}")
    if a.score:
        out = score(a.score, a.as_, a.permute, rest)
        print(f"{a.score} as {a.as_}, permuted {a.permute or '-'}: val acc {out['acc']:.3f}, "
              f"NLL {out['nll']:.3f} over {out['n']} examples")
        if a.json:
            write_json(Path(a.json), {"train_argv": rest, **out})
        return out
    rows = probe(rest, a.tasks)
    print("| task | inner loss first / last | dphi | cos(dtheta, dphi) | dtheta / dphi | "
          "Reptile's cos | Reptile's ratio | theta log-variance min / mean / max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lv = "-" if r["theta_logvar"] is None else " / ".join(f"{v:.2f}" for v in r["theta_logvar"])
        print(f"| {r['task']} | {r['inner_loss_first']:.3f} / {r['inner_loss_last']:.3f} | "
              f"{r['dphi']:.3f} | {r['cos']:+.3f} | {r['ratio']:.3f} | {r['reptile_cos']:+.3f} | "
              f"{r['reptile_ratio']:.3f} | {lv} |")
    if a.json:
        write_json(Path(a.json), {"train_argv": rest, "tasks": a.tasks, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
