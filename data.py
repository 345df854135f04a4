"""Tasks and splits, the data report and the CLI: the reader of MetaICL-layout data.

One reader serves two sources, both in MetaICL's layout
`{data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl` with lines {"task", "input", "output",
"options"} (CrossFit's `input<TAB>output` .tsv files are read too; their options are the
" (A) ... (B) ..." embedded in the input, or else the task's label set):

- the paper's splits `cls-45`, `cls-23`, `nli`, `para`, `mcqa` (Appendix A.3), on CrossFit /
  UnifiedQA as preprocessed by MetaICL, which users bring with `--data-dir`;
- the offline benchmark that benchmark.py builds from PyPI archives (splits `cls`, `nli`, `para`,
  `mcqa` and the diagnostic `diag`), kept apart from this reader as nanoGPT keeps
  data/*/prepare.py. It is the default when no data directory is given, built once into
  $ABMLL_CACHE/benchmark, automatically on first use.

Training tasks are read from `{task}_16384_100_train` (MetaICL's meta-training files); a held-out
task's support examples from `{task}_16_{seed}_train`, its validation examples from `..._dev`,
its test examples from `..._test`. Only examples with 2-4 options whose output is one of them
are kept; what was dropped, and why, is reported per task (`report_summary`, printed by every
run and saved in its directory as data_report.json). A line whose fields have the wrong types
(options not a list of strings, input or output not a string) is dropped and named by file and
line; a file that is not UTF-8 or not JSON lines is an error naming the file and line. The types
(Example, HeldOut, Split), the prompt, batches and episodes are prompt.py's, re-exported here.

    python data.py prepare                      # build the offline benchmark (once)
    python data.py stats --split nli            # its nli split, per task
    python data.py stats --split diag           # the diagnostic split: zero-shot is at chance
    python data.py stats --split cls-45 --data-dir ~/MetaICL/data --json

    split = data.load_split("nli", tok=tok, max_len=256, seed=0)  # Split(train={task: [Example]},
    print(data.describe(split))                   #  held_out={task: HeldOut(support, val, test)})
    for task, support, query in data.epoch_episodes(split.train, epoch=0, seed=0, query_batch=True):
        batch = data.collate(support[0], tok, max_len=256)  # tokens, loss_mask, answer_pos, ...
        probs = abmll.predictive_probs(model, batch, batch["letter_ids"])  # (B, 4), 0 past options
"""

import argparse
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import benchmark
import fetch
from benchmark import DATA_SEED, TEST_K, TRAIN_FILE
# the types, the prompt, batches and episodes are prompt.py's; data.collate etc. stay the names
from prompt import (PROMPTS, SYNTHETIC, DataError, Example, HeldOut, Split,  # noqa: F401
                    collate, dropped, encode, epoch_episodes, fits, format_prompt, keep,
                    letter_tokens, shuffled, synthetic_split)

# -----------------------------------------------------------------------------
# the paper's splits (Appendix A.3, verbatim; "validation and testing" share one task list)

_CLS45_TEST = ("tweet_eval-stance_feminist ethos-national_origin tweet_eval-hate ag_news anli "
               "hate_speech18 poem_sentiment climate_fever medical_questions_pairs "
               "tweet_eval-stance_atheism ethos-race ethos-religion superglue-cb wiki_qa "
               "yelp_polarity")
PAPER_SPLITS = {  # split: (training tasks, held-out tasks)
    "cls-45": ("superglue-rte tweet_eval-sentiment glue-rte superglue-wsc glue-mrpc "
               "tweet_eval-stance_hillary tweet_eval-offensive hatexplain glue-cola sick paws "
               "ethos-sexual_orientation glue-qqp tweet_eval-emotion sms_spam health_fact "
               "glue-mnli imdb ethos-disability glue-wnli scitail glue-sst2 "
               "tweet_eval-stance_abortion tweet_eval-stance_climate glue-qnli "
               "ethos-directed_vs_generalized ade_corpus_v2-classification hate_speech_offensive "
               "superglue-wic google_wellformed_query tweet_eval-irony ethos-gender "
               "rotten_tomatoes kilt_fever", _CLS45_TEST),
    "cls-23": ("blimp-ellipsis_n_bar_2 blimp-sentential_negation_npi_scope crows_pairs hellaswag "
               "openbookqa piqa quartz-no_knowledge sciq ethos-disability ethos-sexual_orientation "
               "glue-cola glue-mnli glue-mrpc glue-qqp glue-rte glue-wnli hatexplain health_fact "
               "imdb paws sick sms_spam superglue-rte superglue-wsc tweet_eval-emotion "
               "tweet_eval-offensive tweet_eval-sentiment tweet_eval-stance_hillary", _CLS45_TEST),
    "nli": ("ade_corpus_v2-classification ag_news climate_fever ethos-directed_vs_generalized "
            "ethos-disability ethos-gender ethos-national_origin ethos-race ethos-religion "
            "ethos-sexual_orientation glue-cola glue-mrpc glue-qqp glue-sst2 "
            "google_wellformed_query hate_speech18 hate_speech_offensive hatexplain health_fact "
            "imdb kilt_fever medical_questions_pairs paws poem_sentiment rotten_tomatoes sick "
            "sms_spam superglue-wic superglue-wsc tab_fact tweet_eval-emotion tweet_eval-hate "
            "tweet_eval-irony tweet_eval-offensive tweet_eval-sentiment tweet_eval-stance_abortion "
            "tweet_eval-stance_atheism tweet_eval-stance_climate tweet_eval-stance_feminist "
            "tweet_eval-stance_hillary wiki_qa yelp_polarity",
            "sick glue-mnli glue-wnli scitail glue-rte anli superglue-cb glue-qnli"),
    "para": ("ade_corpus_v2-classification ag_news anli climate_fever "
             "ethos-directed_vs_generalized ethos-disability ethos-gender ethos-national_origin "
             "ethos-race ethos-religion ethos-sexual_orientation glue-cola glue-mnli glue-qnli "
             "glue-rte glue-sst2 glue-wnli google_wellformed_query hate_speech18 "
             "hate_speech_offensive hatexplain health_fact imdb kilt_fever poem_sentiment "
             "rotten_tomatoes scitail sick sms_spam superglue-cb superglue-rte superglue-wic "
             "superglue-wsc tab_fact tweet_eval-emotion tweet_eval-hate tweet_eval-irony "
             "tweet_eval-offensive tweet_eval-sentiment tweet_eval-stance_abortion "
             "tweet_eval-stance_atheism tweet_eval-stance_climate tweet_eval-stance_feminist "
             "tweet_eval-stance_hillary wiki_qa yelp_polarity",
             "glue-mrpc glue-qqp medical_questions_pairs paws"),
    "mcqa": ("hate_speech_offensive google_wellformed_query glue-sst2 scitail ag_news art paws "
             "glue-qnli ade_corpus_v2-classification hatexplain glue-qqp kilt_fever glue-mnli "
             "tab_fact tweet_eval-offensive imdb anli yelp_polarity",
             "codah cosmos_qa dream hellaswag openbookqa quarel quartz-no_knowledge "
             "quartz-with_knowledge sciq swag wino_grande wiqa"),
}
PAPER_SPLITS = {k: (tr.split(), te.split()) for k, (tr, te) in PAPER_SPLITS.items()}

# -----------------------------------------------------------------------------
# reading and filtering


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


def _tsv_row(line: str, where: str) -> tuple[str, str, list[str] | None]:
    """A CrossFit line `input<TAB>output`; a QA input embeds its options: "question (A) x (B) y"."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) < 2:
        raise DataError(f"{where}: expected 'input<TAB>output'")
    text, out, opts = parts[0], parts[1], None
    pieces = _CHOICE.split(text)
    if len(pieces) >= 5 and pieces[1::2] == [chr(65 + i) for i in range(len(pieces) // 2)]:
        text, opts = pieces[0], [p.strip() for p in pieces[2::2]]
    return text.strip(), out.strip(), opts


def _jsonl_row(line: str, where: str) -> tuple[tuple, tuple[str, str] | None]:
    """(row, None) for a MetaICL line; (row, (reason, what)) when a field has the wrong type."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed json ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in ("input", "output") if k not in d]
    if missing:
        raise DataError(f"{where}: missing key '{missing[0]}'")
    text, out, opts = d["input"], d["output"], d.get("options")
    opts = [] if opts is None else opts  # no options: a generative line, dropped by keep()
    return (text, out, opts), _type_problem(text, out, opts)


def _read_rows(path: Path, problems: list | None = None) -> list[tuple[str, str, list[str] | None]]:
    """(input, output, options) per line of a MetaICL .jsonl or CrossFit .tsv (options None: the
    line names none).

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
                rows.append(_tsv_row(line, f"{path}:{n}"))
                continue
            row, bad = _jsonl_row(line, f"{path}:{n}")
            if bad is None:
                rows.append(row)
            elif problems is None:
                raise DataError(f"{path}:{n}: {bad[1]}")
            else:
                problems.append((bad[0], f"{path}:{n}: {bad[1]}"))
    return rows


def _task_path(data_dir: Path, task: str, k: int, seed: int, part: str) -> Path | None:
    paths = [data_dir / task / f"{task}_{k}_{seed}_{part}{ext}" for ext in (".jsonl", ".tsv")]
    return next((p for p in paths if p.exists()), None)


def _read_task(task, files, report, tok=None, max_len=None, problems=None) -> dict[str, list]:
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
    out = {part: keep(task, [(t, o, labels if opts is None else opts) for t, o, opts in rs], report)
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
            raise DataError(f"{files[part]}: task {task} has no usable example ({dropped(report)})")
    return out


# -----------------------------------------------------------------------------
# splits


def load_split(split: str, data_dir=None, tok=None, max_len: int = 256, seed: int = 0,
               test_seed: int = DATA_SEED, k_shot: int = 5, batch_size: int = 2,
               max_examples: int | None = None, max_query: int | None = None,
               max_val: int | None = None) -> Split:
    """The training and held-out tasks of `split`, filtered, deterministic by `seed`.

    Training tasks: all kept examples (at most `max_examples`, a seeded sample). Held-out tasks:
    `k_shot * batch_size` support examples from the k-shot train file, validation examples from the
    dev file and test examples from the test file (each at most `max_query`; validation at most
    `max_val` if given), pairwise disjoint.
    With no `data_dir`, the offline benchmark (built on first use); its split names are those of
    benchmark.OFFLINE_HELD_OUT, the paper's those of PAPER_SPLITS. With `tok`, examples whose
    choices cannot fit in `max_len` tokens are dropped (and reported) here, not in collate().
    """
    if split not in PAPER_SPLITS and split not in benchmark.OFFLINE_HELD_OUT:
        raise DataError(f"unknown split '{split}' (--split): the paper's are "
                        f"{', '.join(PAPER_SPLITS)}; the offline benchmark's are "
                        f"{', '.join(benchmark.OFFLINE_HELD_OUT)}")
    data_dir = benchmark.ensure_benchmark() if data_dir is None else Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: not a directory")
    train_tasks, test_tasks = _tasks_of(split, data_dir)
    files = _task_files(split, data_dir, train_tasks, test_tasks, test_seed)
    report, problems = {t: Counter() for t in files}, {t: [] for t in files}
    read = {t: _read_task(t, files[t], report[t], tok, max_len, problems[t]) for t in train_tasks}
    train = {t: shuffled(parts["train"], f"{seed}-{t}", max_examples) for t, parts in read.items()}
    held_out = {}
    for t in test_tasks:
        parts = _read_task(t, files[t], report[t], tok, max_len, problems[t])
        held_out[t] = _held_out(t, files[t], parts, report[t], seed, k_shot * batch_size, max_query,
                                max_val)
    for part in ("val", "test"):
        if held_out and not any(getattr(h, part) for h in held_out.values()):
            why = "; ".join(f"{t}: {dropped(report[t])}" for t in held_out)
            raise DataError(f"split {split}: no held-out task has {part} examples left in "
                            f"{data_dir} ({why})")
    return Split(split, train, held_out, report, problems)


def _tasks_of(split: str, data_dir: Path) -> tuple[list[str], list[str]]:
    """(training tasks, held-out tasks): in an offline benchmark its tasks.json decides what the
    splits hold (benchmark.offline_split); the paper's splits are PAPER_SPLITS."""
    meta = data_dir / "tasks.json"
    if meta.exists() and split in benchmark.OFFLINE_HELD_OUT:
        train, test = benchmark.offline_split(split, benchmark.read_tasks_json(meta))
    elif split in PAPER_SPLITS:
        train, test = PAPER_SPLITS[split]
    else:
        raise DataError(f"{meta} not found: '{split}' is a split of the offline benchmark "
                        "(python data.py prepare)")
    # the paper lists 'sick' among both NLI's training and held-out tasks: held-out wins
    return [t for t in train if t not in test], test


def _task_files(split, data_dir: Path, train_tasks, test_tasks, test_seed) -> dict[str, dict]:
    """{task: {part: path}}: a training task's train file, a held-out task's train, dev and test."""
    files = {t: {"train": _task_path(data_dir, t, *TRAIN_FILE, "train")} for t in train_tasks}
    parts = ("train", "dev", "test")
    files |= {t: {p: _task_path(data_dir, t, TEST_K, test_seed, p) for p in parts}
              for t in test_tasks}
    missing = sorted(t for t, paths in files.items() if None in paths.values())
    if missing:
        expected = (f"{{task}}/{{task}}_{TRAIN_FILE[0]}_{TRAIN_FILE[1]}_train.jsonl for training, "
                    f"{{task}}_{TEST_K}_{test_seed}_{{train,dev,test}}.jsonl held out")
        if (data_dir / "tasks.json").exists():
            expected += "; the paper's splits need MetaICL's data: --data-dir"
        raise DataError(f"split {split}: {len(missing)} task(s) missing or incomplete in "
                        f"{data_dir}: {', '.join(missing)} (expected {expected})")
    return files


def _key(e: Example) -> tuple:
    return e.input, tuple(e.options)


def _held_out(task, files, parts, report, seed, need, max_query, max_val) -> HeldOut:
    """`need` support examples, then validation and test examples that repeat none before them."""
    support = shuffled(parts["train"], f"{seed}-{task}")[:need]
    if len(support) < need:
        raise DataError(f"{files['train']}: {len(support)} usable support examples, need {need}")
    seen = {_key(e) for e in support}
    val = [e for e in shuffled(parts["dev"], f"{seed}-{task}-val") if _key(e) not in seen]
    seen |= {_key(e) for e in val}
    test = [e for e in shuffled(parts["test"], f"{seed}-{task}-test") if _key(e) not in seen]
    for why, n in (("dev duplicates of support", len(parts["dev"]) - len(val)),
                   ("test duplicates of support or dev", len(parts["test"]) - len(test))):
        report[why] += n  # dropped like the other reasons, so kept + dropped = lines read
        report["kept"] -= n
    return HeldOut(support, val[:max_val or max_query], test[:max_query])


# -----------------------------------------------------------------------------
# the data report


def describe(split: Split) -> str:
    """One line per task: what was kept, what was dropped and why."""
    return "\n".join(f"{t}: kept {r['kept']}, {dropped(r)}" for t, r in split.report.items())


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
        tasks[t], warned = _task_report(split, t, r)
        warnings += warned
    lines = [_summary_line(split.name, role, {t: d for t, d in tasks.items() if d["role"] == role})
             for role in ("train", "held-out")] + warnings
    return lines, {"split": split.name, "warn_share": WARN_SHARE, "summary": lines[:2],
                   "warnings": warnings, "tasks": tasks}


def _task_report(split: Split, t: str, r: Counter) -> tuple[dict, list[str]]:
    """A task's entry in data_report.json, and its warning lines."""
    read, held = sum(r.values()), split.held_out.get(t)
    drops = {why: n for why, n in r.items() if why != "kept" and n}
    used = ({"support": len(held.support), "val": len(held.val), "test": len(held.test)} if held
            else {"train": len(split.train.get(t, []))})
    problems = split.problems.get(t, [])
    entry = {"role": "held-out" if held else "train", "lines": read, "kept": r["kept"],
             "dropped": drops, "used": used, "problems": problems[:MAX_PROBLEMS]}
    lost, empty = read - r["kept"], [part for part in ("val", "test") if held and not used[part]]
    warnings = [f"warning: held-out task {t} has no {part} examples left ({dropped(r)}); "
                f"its {part} score is missing from the pooled one" for part in empty]
    if read and lost / read > WARN_SHARE and not empty:  # the emptiness is the more telling warning
        warnings.append(f"warning: task {t} lost {lost} of its {read} lines ({lost / read:.0%}): "
                        f"{dropped(r)}" + (f"; e.g. {problems[0]}" if problems else ""))
    return entry, warnings


def _summary_line(name: str, role: str, tasks: dict) -> str:
    """The line "data nli: 41 training tasks, kept ... of ... lines (...), using ..." of a role."""
    drops = Counter()
    for d in tasks.values():
        drops.update(d["dropped"])
    read, kept = sum(d["lines"] for d in tasks.values()), sum(d["kept"] for d in tasks.values())
    if role == "train":
        use = f"{sum(d['used']['train'] for d in tasks.values())} training examples"
    else:
        use = " / ".join(f"{sum(d['used'][p] for d in tasks.values())} {p}"
                         for p in ("support", "val", "test"))
    noun = "training" if role == "train" else "held-out"
    return (f"data {name}: {len(tasks)} {noun} task{'s' * (len(tasks) != 1)}, "
            f"kept {kept} of {read} lines ({dropped(drops)}), using {use}")


def save_report(split: Split, path: Path) -> dict:
    """Print report_summary's lines to stderr, write its details to `path` (data_report.json)."""
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
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="the paper's splits, the offline benchmark, per-task statistics")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build the offline benchmark into $ABMLL_CACHE/benchmark")
    pp.add_argument("--max-examples", type=int, default=1000,
                    help="at most this many examples per task")
    pp.add_argument("--seed", type=int, default=0,
                    help="seed of the per-task sample and of the partitions")
    pp.add_argument("--max-chars", type=int, default=2000,
                    help="drop examples whose prompt is longer")
    ps = sub.add_parser("stats",
                        help="per-task example counts of a split's training and held-out tasks")
    ps.add_argument("--split", required=True,
                    help=f"one of {', '.join([*PAPER_SPLITS, *benchmark.OFFLINE_HELD_OUT])}")
    ps.add_argument("--data-dir", default=None,
                    help="MetaICL-layout data (default: the offline benchmark)")
    ps.add_argument("--json", action="store_true",
                    help='print {"train": {task: n}, "test": {task: n}}')
    return p


def _stats(s: Split, as_json: bool):
    """Per-task example counts on stdout: JSON, or a table after the report (on stderr)."""
    train = {t: len(x) for t, x in s.train.items()}
    test = {t: len(h.support) + len(h.val) + len(h.test) for t, h in s.held_out.items()}
    if as_json:
        print(json.dumps({"train": train, "test": test}))
        return
    print(describe(s) + "\n" + "\n".join(report_summary(s)[0]), file=sys.stderr)
    print(f"split {s.name}: {len(train)} training tasks, {sum(train.values())} examples\n"
          + "".join(f"  train {t:45s} {n:5d}\n" for t, n in train.items())
          + f"{len(test)} held-out tasks: support / val / test\n"
          + "".join(f"  test  {t:45s} {len(h.support)} / {len(h.val)} / {len(h.test)}\n"
                    for t, h in s.held_out.items()), end="")


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "prepare":
            print(benchmark.prepare(args.max_examples, args.seed, args.max_chars))
        else:
            _stats(load_split(args.split, args.data_dir), args.json)
    except (DataError, fetch.FetchError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
