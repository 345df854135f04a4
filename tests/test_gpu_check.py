"""train.py --random-init and gpu_check.py on a CPU: the GPU check's steps on the tiny shape, in seconds,
with no checkpoint, no data set and an empty cache."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
import train

ROOT = Path(__file__).resolve().parents[1]


def env(tmp_path):
    # an empty cache: a model or benchmark that --random-init fetched or read would fail or leave files there
    return {**os.environ, "OMP_NUM_THREADS": "1", "ABMLL_CACHE": str(tmp_path / "cache")}


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_train_random_init_needs_no_checkpoint_or_data(tmp_path):
    # run from tmp_path, where "tiny" names no file: a silent llama.load("tiny") would be an error
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--random-init", "--model", "tiny", "--method", "lora",
                        "--epochs", "1", "--tasks-per-epoch", "2", "--max-query", "2", "--max-held-out", "1",
                        "--max-len", "200", "--device", "cpu", "--out", "out"],
                       cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "out" / "synthetic" / "lora" / "seed0"
    final, speed = (json.loads((d / f).read_text()) for f in ("final.json", "speed.json"))
    config = json.loads((d / "config.json").read_text())
    assert config["random_init"] and config["split"] == "synthetic" and final["split"] == "synthetic"
    assert final["n_test"] == 2 and final["test_chance"] == 0.25  # four options: the synthetic tasks
    # 2 tasks x K = 5 steps, each 2 prompts cut to exactly --max-len byte tokens
    assert speed["train_steps"] == 10 and speed["train_tokens"] == 10 * 2 * 200
    assert positive(speed["train_tokens_per_s"]) and speed["random_init"] is True
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv,needle", [(["--model", "smollm2"], "--model 'smollm2'"),
                                         (["--model", "tiny", "--split", "nli"], "--split nli"),
                                         (["--model", "tiny", "--data-dir", "x"], "--data-dir")])
def test_random_init_bad_flags_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit):
        train.parse_args(["--random-init", *argv])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in last and "--random-init" in last


def test_synthetic_split_is_seeded_and_fills_max_len():
    args = train.parse_args(["--random-init", "--model", "tiny", "--max-len", "200", "--max-query", "3"])
    a, b = data.synthetic_split(args), data.synthetic_split(args)
    assert a == b and len(a.train) == 16 and len(a.held_out) == 4
    held = next(iter(a.held_out.values()))
    assert (len(held.support), len(held.val), len(held.test)) == (10, 3, 3)
    args.seed = 1
    assert data.synthetic_split(args).train != a.train
    import tokenizer

    batch = data.collate(held.test, tokenizer.Tokenizer.byte_level(), 200)
    assert batch["tokens"].shape == (3, 200) and (batch["answer_pos"] == 198).all()


def test_gpu_check_script_on_cpu_writes_every_part(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "gpu_check.py"), "--device", "cpu", "--model", "tiny", "--seq",
                        "200", "--epochs", "1", "--tasks-per-epoch", "2", "--no-reference", "--out", str(out)],
                       cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = {"summary.json", "bench.json", "plan.json", "plan-ckpt.json", "train-lora.json", "train-abmll.json",
             "gpu_check.log"}
    assert {p.name for p in out.iterdir()} == files  # at most 8 come back from the device machine
    S = json.loads((out / "summary.json").read_text())
    assert set(S["parts"]) == {"plan", "plan-ckpt", "bench", "train-lora", "train-abmll"}
    assert all(p["rc"] == 0 for p in S["parts"].values())
    rows = {row["run"].split(",")[0]: row for row in S["rows"]}
    for run in ("bench LoRA step", "bench ABMLL step", "train.py lora", "train.py abmll"):
        assert positive(rows[run]["tokens_per_s"]) and positive(rows[run]["planned_bytes"])
        assert positive(rows[run]["planned_ckpt_bytes"])
    for m in ("lora", "abmll"):
        T = json.loads((out / f"train-{m}.json").read_text())
        assert T["speed"]["train_steps"] == 10 and T["tokens_per_step"] == 2 * 200 and positive(T["flops_per_step"])
        assert len(T["history"]) == 1 and "test_acc" in T["final"]
    assert json.loads((out / "bench.json").read_text())["model"] == "tiny"
    assert "| train.py abmll, 10 steps |" in r.stdout and not (tmp_path / "cache").exists()
