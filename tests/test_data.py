"""data.py on small MetaICL / CrossFit files written here; no network, no model."""

import json
import os

import pytest
import torch

import abmll
import benchmark
import data
import fetch
import prompt


class CharTok:
    """The CONTEXT Tokenizer interface, one token per character (so "A" is one token)."""

    bos_id, eos_id, pad_id, chat_format = 1, 2, 0, "chatml"

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [ord(c) + 3 for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)

    def encode_chat(self, user, system=None):
        return [self.bos_id] + self.encode(f"<user>{user}</user><assistant>")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows(task, n, n_options=2, tag=""):
    opts = [f"opt{j}" for j in range(n_options)]
    return [{"task": task, "input": f"{task} {tag} question {i}", "output": opts[i % n_options], "options": opts}
            for i in range(n)]


def write_task(root, task, held_out, n=30):
    d = root / task
    if held_out:
        write_jsonl(d / f"{task}_16_100_train.jsonl", rows(task, 16, tag="support"))
        write_jsonl(d / f"{task}_16_100_dev.jsonl", rows(task, n, 3, tag="dev"))
        write_jsonl(d / f"{task}_16_100_test.jsonl", rows(task, n, 4, tag="test"))
    else:
        write_jsonl(d / f"{task}_16384_100_train.jsonl", rows(task, n))


def ex(question="What?", options=("yes", "no"), label=0, task="t"):
    return data.Example(task, question, list(options), label)


# -- reading and filtering ------------------------------------------------------------------------


def test_filter_keeps_2_to_4_options_with_output_among_them(tmp_path):
    p = tmp_path / "t.jsonl"
    write_jsonl(p, [
        {"task": "t", "input": "two", "output": "b", "options": ["a", "b"]},
        {"task": "t", "input": "four", "output": "d", "options": ["a", "b", "c", "d"]},
        {"task": "t", "input": "five", "output": "a", "options": ["a", "b", "c", "d", "e"]},
        {"task": "t", "input": "missing", "output": "z", "options": ["a", "b"]},
        {"task": "t", "input": "one", "output": "a", "options": ["a"]},
        {"task": "t", "input": "generative", "output": "a", "options": []},
        {"task": "t", "input": "twice", "output": "a", "options": ["a", "a", "b"]},
    ])
    report = data.Counter()
    kept = prompt.keep("t", data._read_rows(p), report)
    assert [(e.input, e.label) for e in kept] == [("two", 1), ("four", 3)]
    assert report == {"kept": 2, "more than 4 options": 1, "output not among options": 1,
                      "fewer than 2 options": 2, "output matches several options": 1}


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(rows("t", 1)[0]) + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"t\.jsonl:2: malformed json"):
        data._read_rows(p)
    p.write_text('{"input": "x", "options": ["a", "b"]}\n')
    with pytest.raises(data.DataError, match=r"t\.jsonl:1: missing key 'output'"):
        data._read_rows(p)


def test_crossfit_tsv_embedded_choices_and_label_set(tmp_path):
    qa = tmp_path / "qa.tsv"
    qa.write_text("Which is red? (A) the sky (B) a cherry (C) grass\ta cherry\n")
    assert data._read_rows(qa) == [("Which is red?", "a cherry", ["the sky", "a cherry", "grass"])]
    cls = tmp_path / "cls.tsv"
    cls.write_text("great movie\tpositive\nawful\tnegative\nfine (really)\tpositive\n")
    got = data._read_task("cls", {"train": cls}, data.Counter())["train"]
    assert [(e.options, e.label) for e in got] == [(["negative", "positive"], 1), (["negative", "positive"], 0),
                                                   (["negative", "positive"], 1)]
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n")
    with pytest.raises(data.DataError, match=r"bad\.tsv:1: expected 'input<TAB>output'"):
        data._read_rows(bad)


def test_empty_task_is_an_error_not_a_silent_skip(tmp_path):
    p = tmp_path / "t.jsonl"
    write_jsonl(p, [{"task": "t", "input": "x", "output": "a", "options": list("abcde")}] * 3)
    with pytest.raises(data.DataError, match=r"t\.jsonl: task t has no usable example \(dropped 3 more than 4"):
        data._read_task("t", {"train": p}, data.Counter())


# -- prompt, batches, scores ----------------------------------------------------------------------


def test_prompt_is_appendix_a3():
    got = data.format_prompt("Jason approached Steven ... because _ was being sued.", ["Jason", "Steven"])
    assert got == ("Return the label of the correct answer for the question below.\n\n"
                   "Question: Jason approached Steven ... because _ was being sued.\n\n"
                   "Choices:\nA) Jason\nB) Steven")


def test_collate_letter_targets_masks_and_positions():
    tok = CharTok()
    exs = [ex("Is it?", ["yes", "no"], 1), ex("Pick one, a longer question", ["w", "x", "y", "z"], 2)]
    b = data.collate(exs, tok, max_len=512)
    B, T = b["tokens"].shape
    lengths = [len(tok.encode_chat(data.format_prompt(e.input, e.options))) + 1 for e in exs]
    assert T == max(lengths)
    for i, e in enumerate(exs):
        n = lengths[i]
        prompt = tok.encode_chat(data.format_prompt(e.input, e.options))
        assert b["tokens"][i, : n - 1].tolist() == prompt
        assert b["tokens"][i, n - 1].item() == tok.encode("ABCD"[e.label])[0] == b["answer_ids"][i].item()
        assert (b["tokens"][i, n:] == tok.pad_id).all()  # right padding
        assert b["loss_mask"][i].nonzero().flatten().tolist() == [n - 1]  # the letter only
        assert b["answer_pos"][i].item() == n - 2
    assert b["letter_ids"].tolist() == [[68, 69, -1, -1], [68, 69, 70, 71]]  # ord("A") + 3 = 68
    assert b["n_options"].tolist() == [2, 4] and b["labels"].tolist() == [1, 2]
    assert b["tokens"].dtype == torch.long and b["loss_mask"].dtype == torch.bool


def test_letter_must_be_one_token():
    class Pairs(CharTok):
        def encode(self, text, bos=False, eos=False):
            return [i for c in super().encode(text, bos, eos) for i in (c, c)]

    with pytest.raises(data.DataError, match="answer letter 'A' as .* not one token"):
        data.collate([ex()], Pairs())


def test_truncation_cuts_the_question_start_never_the_choices():
    tok = CharTok()
    e = ex("START " + "blah " * 200 + "the real question END", ["first choice", "second choice"], 1)
    b = data.collate([e], tok, max_len=200)
    ids = b["tokens"][0].tolist()
    assert len(ids) == 200 and ids[-1] == tok.encode("B")[0] and b["answer_pos"][0].item() == 198
    text = tok.decode(ids[:-1])
    assert "START" not in text and "question END\n\nChoices:\nA) first choice\nB) second choice</user>" in text
    assert "Question: ..." in text
    # the longest prefix that fits was kept: one more character would not fit
    assert len(data.encode(e, tok, 201, data.letter_tokens(tok))) == 201
    with pytest.raises(data.DataError, match="task t: the prompt without its question needs .* --max-len 50"):
        data.collate([e], tok, max_len=50)


def test_predictive_probs_softmax_over_this_examples_letters():
    tok = CharTok()
    b = data.collate([ex(options=["a", "b"]), ex(options=["a", "b", "c", "d"], label=3)], tok)
    logits = torch.randn(2, 200)
    p = abmll.predictive_probs(lambda tokens, logits_at: logits[:, None], b, b["letter_ids"])  # (B, 1, V) model
    assert torch.allclose(p[0, :2], logits[0, [68, 69]].softmax(-1)) and (p[0, 2:] == 0).all()
    assert torch.allclose(p[1], logits[1, [68, 69, 70, 71]].softmax(-1))


def test_load_split_drops_examples_whose_choices_cannot_fit(tmp_path, monkeypatch):
    monkeypatch.setitem(data.PAPER_SPLITS, "tiny", (["a"], ["b"]))
    write_task(tmp_path, "b", True)
    long = rows("a", 20) + [{"task": "a", "input": "q", "output": "x" * 300, "options": ["x" * 300, "y"]}]
    write_jsonl(tmp_path / "a" / "a_16384_100_train.jsonl", long)
    s = data.load_split("tiny", tmp_path, tok=CharTok(), max_len=160)
    assert len(s.train["a"]) == 20 and s.report["a"]["choices longer than max_len 160"] == 1
    assert len(data.load_split("tiny", tmp_path).train["a"]) == 21  # no tokenizer: no check


# -- splits and episodes --------------------------------------------------------------------------


@pytest.fixture
def paper_dir(tmp_path):
    held = {t for _, test in data.PAPER_SPLITS.values() for t in test}
    for t in {t for tr, te in data.PAPER_SPLITS.values() for t in tr + te}:
        write_task(tmp_path, t, t in held, n=14)
        if t in held:  # held out somewhere, trained on elsewhere
            write_task(tmp_path, t, False, n=14)
    return tmp_path


def test_paper_splits_load_disjoint_and_deterministic(paper_dir):
    counts = {"cls-45": (34, 15), "cls-23": (28, 15), "nli": (41, 8), "para": (46, 4), "mcqa": (18, 12)}
    for name, (n_train, n_test) in counts.items():
        s = data.load_split(name, paper_dir)
        assert (len(s.train), len(s.held_out)) == (n_train, n_test), name
        assert not set(s.train) & set(s.held_out)  # 'sick' is in both of the paper's NLI lists
    a, b = data.load_split("nli", paper_dir, seed=0), data.load_split("nli", paper_dir, seed=0)
    c = data.load_split("nli", paper_dir, seed=1)
    assert a.held_out["anli"] == b.held_out["anli"] and a.held_out["anli"].support != c.held_out["anli"].support
    h = a.held_out["anli"]
    assert len(h.support) == 10 and len(h.val) == 14 and len(h.test) == 14
    assert {e.input for e in h.support}.isdisjoint({e.input for e in h.val} | {e.input for e in h.test})
    assert all("dev" in e.input for e in h.val) and all("test" in e.input for e in h.test)
    capped = data.load_split("nli", paper_dir, max_query=5, max_examples=7)
    assert len(capped.held_out["anli"].val) == 5 and len(capped.train["imdb"]) == 7


def test_missing_tasks_fail_with_one_message_listing_all(paper_dir):
    for t in ("glue-rte", "anli"):
        os.remove(paper_dir / t / f"{t}_16_100_dev.jsonl")
    with pytest.raises(data.DataError) as e:
        data.load_split("nli", paper_dir)
    msg = str(e.value)
    assert "2 task(s) missing" in msg and "anli, glue-rte" in msg and "\n" not in msg


def test_unknown_split():
    with pytest.raises(data.DataError, match="unknown split 'nope'"):
        data.load_split("nope", "/nonexistent")


def test_epoch_episodes_k_batches_of_2_deterministic():
    train = {t: [ex(f"{t}{i}", task=t) for i in range(30)] for t in ("a", "b", "c")}

    def run(epoch, seed, **kw):
        return [(t, [[e.input for e in b] for b in s], q and [e.input for e in q])
                for t, s, q in data.epoch_episodes(train, epoch, seed, **kw)]

    eps = run(0, 0, query_batch=True)
    assert sorted(t for t, _, _ in eps) == ["a", "b", "c"]
    for t, support, query in eps:
        assert len(support) == 5 and all(len(b) == 2 for b in support) and len(query) == 2
        drawn = [x for b in support for x in b] + query
        assert len(set(drawn)) == 12 and all(x.startswith(t) for x in drawn)
    assert eps == run(0, 0, query_batch=True)
    assert eps != run(1, 0, query_batch=True) and eps != run(0, 1, query_batch=True)
    assert all(q is None for _, _, q in run(0, 0))
    small = {"s": [ex("only", task="s")] * 3}  # fewer than 10 examples: drawn with replacement
    assert len(next(data.epoch_episodes(small, 0, 0))[1]) == 5


# -- the offline benchmark ------------------------------------------------------------------------


def test_category_rules():
    assert benchmark.category("Determine whether the first sentence entails or contradicts the second") == "nli"
    assert benchmark.category("For a given proverb, choose a proverb which is closest in meaning") == "para"
    assert benchmark.category("Answer questions about social situations") == "mcqa"
    assert benchmark.category("Classify the sentiment of a movie review") == "cls"


def test_offline_split_excludes_held_out_families():
    meta = {"nli_a": "nli", "nli_b": "nli", "fam-x": "cls", "fam-y": "mcqa", "other": "cls", "q": "mcqa"}
    meta = {t: {"category": c} for t, c in meta.items()}
    held = {"nli": ["nli_a", "nli_b"], "cls": ["fam-x"], "mcqa": ["q"], "para": []}
    orig = benchmark.OFFLINE_HELD_OUT
    benchmark.OFFLINE_HELD_OUT = held
    try:
        assert benchmark.offline_split("nli", meta) == (["fam-x", "fam-y", "other", "q"], ["nli_a", "nli_b"])
        assert benchmark.offline_split("cls", meta) == (["other"], ["fam-x"])  # fam-y shares fam-x's family
    finally:
        benchmark.OFFLINE_HELD_OUT = orig


def test_stats_json_on_an_offline_layout(tmp_path, monkeypatch, capsys):
    meta = {"e1": "nli", "e2": "nli", "c1": "cls", "c2": "cls", "m1": "mcqa"}
    for t, c in meta.items():
        write_task(tmp_path, t, False, n=12 + len(t))
    write_task(tmp_path, "e1", True)
    write_task(tmp_path, "e2", True)
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": {t: {"category": c} for t, c in meta.items()}}))
    monkeypatch.setitem(benchmark.OFFLINE_HELD_OUT, "nli", ["e1", "e2"])
    data.main(["stats", "--split", "nli", "--data-dir", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out == {"train": {"c1": 14, "c2": 14, "m1": 14}, "test": {"e1": 70, "e2": 70}}


def test_bad_archive_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("ABMLL_CACHE", str(tmp_path))
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / "bigbench-1.0.0.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(fetch.FetchError, match=r"bigbench-1.0.0.tar.gz is corrupted \(sha256 .*\): delete it to fetch"):
        benchmark.prepare()
    assert not list(tmp_path.glob("benchmark*"))  # no half-built benchmark, no temp dir left
    monkeypatch.setattr(fetch, "archive", lambda spec: tmp_path / "archives" / "bigbench-1.0.0.tar.gz")
    with pytest.raises(data.DataError, match="bigbench-1.0.0.tar.gz: unreadable archive"):
        benchmark.prepare()
    assert not list(tmp_path.glob("benchmark*"))  # no half-built benchmark, no temp dir left


def test_built_benchmark_splits():
    """The real offline benchmark, when `python data.py prepare` has built it (not built here)."""
    meta_path = benchmark.benchmark_dir() / "tasks.json"
    if not meta_path.exists() or json.loads(meta_path.read_text()).get("stamp") != benchmark._stamp():
        pytest.skip("offline benchmark not built (python data.py prepare)")
    meta = json.loads(meta_path.read_text())["tasks"]
    for split in benchmark.OFFLINE_HELD_OUT:
        train, test = benchmark.offline_split(split, meta)
        assert len(train) >= 20 and len(test) >= 4, split
        assert all(meta[t]["category"] == split for t in test), split
        assert not {benchmark.family(t) for t in train} & {benchmark.family(t) for t in test}, split


def test_held_out_parts_are_deduplicated(tmp_path, monkeypatch):
    monkeypatch.setitem(data.PAPER_SPLITS, "tiny", (["a"], ["b"]))
    write_task(tmp_path, "a", False)
    support, fresh = rows("b", 16, tag="s"), rows("b", 8, tag="new")
    write_jsonl(tmp_path / "b" / "b_16_100_train.jsonl", support)
    write_jsonl(tmp_path / "b" / "b_16_100_dev.jsonl", support + fresh[:4])
    write_jsonl(tmp_path / "b" / "b_16_100_test.jsonl", support + fresh)
    h = data.load_split("tiny", tmp_path).held_out["b"]
    s, v, t = ({e.input for e in x} for x in (h.support, h.val, h.test))
    assert not (s & v or s & t or v & t)
    assert len(v) == 6 + 4 and len(t) == 4  # 6 unused support examples, the 4 fresh dev; 4 fresh left for test


# -- bad input: dropped and named, or one line ----------------------------------------------------


def test_wrong_types_are_dropped_and_named_by_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    write_jsonl(p, [
        {"task": "t", "input": "good", "output": "a", "options": ["a", "b"]},
        {"task": "t", "input": "yn", "output": "y", "options": "yn"},  # list("yn") would be ['y', 'n']
        {"task": "t", "input": None, "output": "a", "options": ["a", "b"]},  # would be the question "None"
        {"task": "t", "input": "number", "output": 1, "options": ["1", "2"]},
        {"task": "t", "input": "numbers", "output": "1", "options": [1, 2]},
    ])
    with pytest.raises(data.DataError, match=r't\.jsonl:2: options is "yn", not a list of strings'):
        data._read_rows(p)  # no list to collect problems in: an error
    report, problems = data.Counter(), []
    kept = data._read_task("t", {"train": p}, report, problems=problems)["train"]
    assert [e.input for e in kept] == ["good"]
    assert report == {"kept": 1, "options not a list of strings": 2, "input not a string": 1,
                      "output not a string": 1}
    assert problems == [f"{p}:2: options is \"yn\", not a list of strings", f"{p}:3: input is null, not a string",
                        f"{p}:4: output is 1, not a string", f"{p}:5: options is [1, 2], not a list of strings"]


def test_non_utf8_and_non_object_lines_name_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(json.dumps(rows("t", 1)[0]).encode() + b'\n{"input": "caf\xe9", "output": "a"}\n')
    with pytest.raises(data.DataError, match=r"t\.jsonl:2: not UTF-8 text \(byte 15 of the line is 0xe9\)"):
        data._read_rows(p)
    p.write_text('["a list"]\n')
    with pytest.raises(data.DataError, match=r"t\.jsonl:1: expected a JSON object, got list"):
        data._read_rows(p)


def test_report_summary_counts_drops_and_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(data.PAPER_SPLITS, "tiny", (["a"], ["b", "c"]))
    stray = [{"task": "a", "input": f"s{i}", "output": "z", "options": ["x", "y"]} for i in range(8)]
    write_jsonl(tmp_path / "a" / "a_16384_100_train.jsonl", rows("a", 20) + stray + [
        {"task": "a", "input": "yn", "output": "y", "options": "yn"}])
    write_task(tmp_path, "b", True)
    write_task(tmp_path, "c", True)
    dev = tmp_path / "c" / "c_16_100_dev.jsonl"
    (tmp_path / "c" / "c_16_100_test.jsonl").write_text(dev.read_text())  # test = dev: nothing left to test
    s = data.load_split("tiny", tmp_path)
    assert s.held_out["c"].test == [] and len(s.held_out["b"].test) == 30
    lines, details = data.report_summary(s)
    assert lines[0] == ("data tiny: 1 training task, kept 20 of 29 lines (dropped 1 options not a list of strings, "
                        "8 output not among options), using 20 training examples")
    assert lines[1].startswith("data tiny: 2 held-out tasks, kept 122 of 152 lines (dropped 30 test duplicates")
    assert lines[2].startswith("warning: task a lost 9 of its 29 lines (31%)")
    assert lines[2].endswith("a_16384_100_train.jsonl:29: options is \"yn\", not a list of strings")
    assert lines[3].startswith("warning: held-out task c has no test examples left") and len(lines) == 4
    assert details["tasks"]["c"]["used"] == {"support": 10, "val": 30, "test": 0}
    assert details["tasks"]["a"]["problems"] == [f"{tmp_path}/a/a_16384_100_train.jsonl:29: options is \"yn\", "
                                                 f"not a list of strings"]
    out = tmp_path / "data_report.json"
    data.save_report(s, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(details))
    (tmp_path / "b" / "b_16_100_test.jsonl").write_text((tmp_path / "b" / "b_16_100_dev.jsonl").read_text())
    with pytest.raises(data.DataError, match="split tiny: no held-out task has test examples left"):
        data.load_split("tiny", tmp_path)  # nothing at all to score: an error, not a silent 0 examples


def test_unreadable_tasks_json_is_one_line(tmp_path):
    (tmp_path / "tasks.json").write_text('{"tasks": ')
    with pytest.raises(data.DataError, match=r"tasks\.json: unreadable or malformed, expected"):
        data.load_split("nli", tmp_path)
