"""prof.py: the per-operator profile of bench.py's steps at 1 and N threads (tiny random model)."""

import json
import sys

import pytest
import torch

import prof


def run(tmp_path, *argv):
    out = tmp_path / "p.json"
    threads = torch.get_num_threads()
    try:
        prof.main(["--model", "tiny", "--random-init", "--steps", "1", "--threads", "2",
                   "--json", str(out), *argv])
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_profile_of_each_job_at_both_thread_counts(tmp_path, capsys):
    P = run(tmp_path, "--jobs", "lora_step", "abmll_step")
    assert P["threads"] == [2, 1] and set(P["jobs"]) == {"lora_step", "abmll_step"}
    for job in P["jobs"].values():
        for n in ("2", "1"):
            ops, kinds = job[n]["ops"], job[n]["kinds"]
            assert sum(kinds.values()) == pytest.approx(job[n]["profiled_s"])
            assert sum(v["self_s"] for v in ops.values()) == pytest.approx(job[n]["profiled_s"])
            assert kinds["gemm"] > 0 and "aten::mm" in ops
    # the weight sample's eps is ABMLL's alone: 2 layers x 3 targets, drawn in forward and backward
    assert "aten::normal_" in P["jobs"]["abmll_step"]["1"]["ops"]
    assert "aten::normal_" not in P["jobs"]["lora_step"]["1"]["ops"]
    assert prof.kind("aten::normal_") == "random" and prof.kind("aten::mm") == "gemm"
    assert prof.kind("aten::something_new") == "other"
    out = capsys.readouterr().out
    assert "## abmll_step" in out and "| random |" in out


@pytest.mark.parametrize("argv,flag", [(["--jobs", "nope"], "--jobs"), (["--steps", "0"], "--steps")])
def test_bad_flags_end_in_one_line(tmp_path, argv, flag):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and flag in msg and "\n" not in msg
