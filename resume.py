"""What train.py writes into a run directory to continue it after a kill: checkpoints, atomically.

rundir.py describes the run directory and reads what a finished run leaves there; this module
writes the files that `--resume` reads. Every file is written to `name.tmp` and renamed over
`name`, so a reader (or a resumed run) sees the old file or the new one, never half of one.

    {rundir}/ckpt-{epoch}.safetensors   adapters, the best epoch's adapters, optimizer state, RNG
    {rundir}/state.json                 epoch, best_acc, best_epoch, history; the commit point

    save_checkpoint(rundir, model, opt, state)           # after every epoch
    state = load_checkpoint(rundir, model, opt, epochs)  # --resume: every problem is one RunError

A checkpoint holds what nanoGPT's does (adapters for its model, optimizer state, the epoch, the
best validation score) and the RNG state, so that a resumed run draws what an uninterrupted one
would. A problem a user can fix (a flag, a run directory, a full disk) is a RunError, one line.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import abmll


class RunError(RuntimeError):
    """A problem with the run's flags or directory that the user can fix (one line)."""


def write_atomic(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves no half file behind; `path` is untouched
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj, indent=1):
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=indent)))


def save_checkpoint(run: Path, model, opt, state: dict):
    """Versioned tensor files first, then state.json (the commit point) naming them; old files go
    last."""
    e = state["epoch"]
    tensors = {f"adapter.{k}": p.detach().cpu().contiguous()
               for k, p in abmll.adapter_params(model).items()}
    tensors |= {f"best.{k}": v for k, v in state["best_adapters"].items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = None
    if opt is not None:
        sd = opt.state_dict()
        groups = sd["param_groups"]
        for i, s in sd["state"].items():
            tensors |= {f"opt.{i}.{k}": v.cpu().contiguous() for k, v in s.items()}
    meta = {k: v for k, v in state.items() if k != "best_adapters"}
    meta |= {"file": f"ckpt-{e}.safetensors", "opt_groups": groups}
    try:
        write_atomic(run / meta["file"], lambda p: save_file(tensors, str(p)))
        write_json(run / "state.json", meta, indent=None)
    except (OSError, SafetensorError) as err:  # a full disk: state.json names the previous one
        (run / meta["file"]).unlink(missing_ok=True)  # so a new file it does not name goes
        raise RunError(f"{run / meta['file']}: cannot write the checkpoint of epoch {e} "
                       f"({_line(err)}); the previous checkpoint and state.json are left as they "
                       f"were") from None
    for old in run.glob("ckpt-*.safetensors"):
        if old.name != meta["file"]:
            old.unlink()


def _line(err) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _bad(where, what):
    return RunError(f"{where}: {what}; cannot resume (start the run again with another --out)")


def _read_state(path: Path, epochs: int | None) -> dict:
    """state.json, checked: an epoch in [0, epochs] with as many history lines, a best epoch among
    them, and its own ckpt-{epoch}.safetensors, a plain name inside the run directory."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _bad(path, f"unreadable ({_line(e)})") from None
    missing = [k for k in ("epoch", "best_acc", "best_epoch", "history", "file", "opt_groups")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise _bad(path, f"missing keys {', '.join(missing)}")
    e, top = state["epoch"], state["epoch"] if epochs is None else epochs
    if type(e) is not int or not 0 <= e <= top:
        raise _bad(path, f"epoch {json.dumps(e)} is not an epoch of this run (0 to {top})")
    if not isinstance(state["history"], list) or len(state["history"]) != e:
        raise _bad(path, f"epoch {e} but {json.dumps(state['history'])[:40]} as its history "
                         f"(a line per epoch)")
    if type(state["best_epoch"]) is not int or not -1 <= state["best_epoch"] <= e \
            or type(state["best_acc"]) not in (int, float):
        raise _bad(path, f"best_epoch {json.dumps(state['best_epoch'])} / best_acc "
                         f"{json.dumps(state['best_acc'])} are not those of a run at epoch {e}")
    if state["file"] != f"ckpt-{e}.safetensors":
        raise _bad(path, f"file {json.dumps(state['file'])} is not ckpt-{e}.safetensors, "
                         f"epoch {e}'s checkpoint")
    return state


def _read_tensors(ckpt: Path, params: dict) -> dict:
    """The checkpoint's tensors: every key present, adapter shapes that fit `params`."""
    try:
        tensors = load_file(str(ckpt))
    except (OSError, SafetensorError) as err:  # SafetensorError is not an OSError
        raise _bad(ckpt, f"unreadable checkpoint ({_line(err)})") from None
    missing = [k for k in [f"{w}.{k}" for w in ("adapter", "best") for k in params] + ["rng.torch"]
               if k not in tensors]
    if missing:
        raise _bad(ckpt, f"{len(missing)} tensors missing, such as {missing[0]} "
                         f"(another method or model?)")
    for k, p in params.items():
        for w in ("adapter", "best"):
            if tuple(tensors[f"{w}.{k}"].shape) != tuple(p.shape):
                raise _bad(ckpt, f"{w}.{k} has shape {tuple(tensors[f'{w}.{k}'].shape)}, this "
                                 f"run's adapter {tuple(p.shape)}")
    return tensors


def load_checkpoint(run: Path, model, opt, epochs: int | None = None) -> dict:
    """state.json and the checkpoint it names, checked against each other and against this run:
    an epoch in [0, epochs] with as many history lines, its own ckpt-{epoch}.safetensors inside
    the run directory, every key present, adapter shapes that fit. Anything wrong is one RunError
    naming the file."""
    state = _read_state(run / "state.json", epochs)
    ckpt, params = run / state["file"], abmll.adapter_params(model)
    tensors = _read_tensors(ckpt, params)
    try:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[f"adapter.{k}"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        if opt is not None:
            per = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, i, name = k.split(".", 2)
                    per.setdefault(int(i), {})[name] = v
            opt.load_state_dict({"state": per, "param_groups": state["opt_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise _bad(ckpt, f"does not fit this run's optimizer or RNG ({_line(err)})") from None
    state["best_adapters"] = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    return state
