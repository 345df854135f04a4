"""Examples, the splits they come in, and what the model reads: the prompt of Appendix A.3,
batches and episodes. The types and their format sit in a file of their own, as llama3 keeps its
Message and Dialog types with ChatFormat in tokenizer.py.

This is the part of the data format that the reader (data.py) and the offline benchmark's builder
(benchmark.py) share; data.py re-exports its names, so `data.collate` and `data.Example` are the
ones to call. An Example is a question, 2-4 options (one per letter A-D) and the index of the
correct one; `keep` turns (input, output, options) rows into Examples and counts what it drops.
The model answers with the letter: one token, scored by its logit at the position before it.
`synthetic_split` makes the split of train.py --random-init in code (random text and labels).

    exs = keep("t", [("Is it?", "yes", ["yes", "no"])], Counter())  # [Example("t", "Is it?", ...)]
    print(format_prompt(exs[0].input, exs[0].options))            # "... Choices:\\nA) yes\\nB) no"
    batch = collate(exs, tok, max_len=256)   # tokens (B, T), loss_mask, answer_pos, letter_ids, ...
    for task, support, query in epoch_episodes(split.train, epoch=0, seed=0, query_batch=True):
        ...                                  # support: 5 batches of 2 examples, query: one more
"""

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

LETTERS = "ABCD"
PROMPT = ("Return the label of the correct answer for the question below.\n\n"
          "Question: {question}\n\nChoices:\n{choices}")
# the authors' code's prompt (its user turn); the answer is the letter there too
OFFICIAL_PROMPT = ("Return only the label of the correct answer for the question below.\n\n"
                   "{task}: {question}\nChoices:\n{choices}\nAnswer:\n")
PROMPTS = {"paper": PROMPT, "official": OFFICIAL_PROMPT}


class DataError(ValueError):
    """A problem with the data a user can fix; the message is one line naming the file or flag."""


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
    train: dict[str, list[Example]]  # the training tasks' examples
    held_out: dict[str, HeldOut]  # the held-out tasks'
    report: dict[str, Counter] = field(default_factory=dict)  # task -> {"kept": n, reason: n}
    problems: dict[str, list[str]] = field(default_factory=dict)  # task -> ["file:line: what"]


def keep(task: str, rows, report: Counter) -> list[Example]:
    """Examples with 2-4 options and exactly one option equal to the output; counts the rest."""
    kept = []
    for text, out, opts in rows:
        hits = [i for i, o in enumerate(opts)
                if out is not None and str(o).strip() == str(out).strip()]
        why = ("fewer than 2 options" if len(opts) < 2 else "more than 4 options" if len(opts) > 4
               else "no single correct answer" if out is None
               else "output not among options" if not hits
               else "output matches several options" if len(hits) > 1 else None)
        if why:
            report[why] += 1
        else:
            kept.append(Example(task, text, list(opts), hits[0]))
    report["kept"] += len(kept)
    return kept


def dropped(report: Counter) -> str:
    """What a report lost, and why: "dropped 3 fewer than 2 options, 1 duplicate" (or "none")."""
    lost = ", ".join(f"{n} {why}" for why, n in report.items() if why != "kept" and n)
    return "dropped " + (lost or "none")


def shuffled(xs, seed, cap=None) -> list:
    """A copy of xs in the order of random.Random(seed).shuffle, at most cap long."""
    xs = list(xs)
    random.Random(seed).shuffle(xs)
    return xs[:cap]


# -----------------------------------------------------------------------------
# the prompt


def format_prompt(question: str, options: list[str], task: str = "", prompt: str = "paper") -> str:
    """Appendix A.3's prompt ("paper") or the authors' code's ("official", which names the task);
    the answer is the option's letter."""
    choices = "\n".join(f"{l}) {o}" for l, o in zip(LETTERS, options))
    return PROMPTS[prompt].format(question=question, choices=choices, task=task)


def letter_tokens(tok) -> list[int]:
    ids = []
    for letter in LETTERS:
        enc = tok.encode(letter)
        if len(enc) != 1:
            raise DataError(f"the tokenizer encodes the answer letter {letter!r} as {enc}, "
                            "not one token")
        ids += enc
    return ids


def fits(ex: Example, tok, max_len: int, base: int = 0) -> bool:
    """Whether the prompt with an empty question, plus the letter, fits in max_len tokens, in the
    longer of the two prompts: the examples kept never depend on --prompt, so runs with either pair
    up example by example."""
    rest = max((format_prompt("...", ex.options, ex.task, p) for p in PROMPTS), key=len)
    # bytes bound tokens: most examples need no tokenizer call
    return len(rest.encode()) + base < max_len or len(tok.encode_chat(rest)) < max_len


# -----------------------------------------------------------------------------
# batches


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
        raise DataError(f"task {ex.task}: the prompt without its question needs {len(ids(hi)) + 1} "
                        f"tokens, more than --max-len {max_len}")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(ids(mid)) < max_len else (mid + 1, hi)
    return ids(lo) + [letters[ex.label]]


def collate(examples: list[Example], tok, max_len: int = 256, prompt: str = "paper") -> dict:
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
    return {"tokens": tokens, "loss_mask": loss_mask,
            "answer_pos": torch.tensor([len(s) - 2 for s in seqs]),
            "answer_ids": letter_ids.gather(1, labels[:, None])[:, 0],  # (B,)
            "letter_ids": letter_ids,
            "n_options": torch.tensor([len(ex.options) for ex in examples]), "labels": labels}


# -----------------------------------------------------------------------------
# episodes


def epoch_episodes(train: dict[str, list[Example]], epoch: int, seed: int, k_shot: int = 5,
                   batch_size: int = 2, query_batch: bool = False):
    """Yield (task, support, query) for every training task, in an order shuffled by (seed, epoch).

    support: k_shot batches of batch_size examples (the inner steps); query: one more batch for the
    outer / meta step when query_batch, else None. Examples are drawn without replacement within an
    episode (with replacement only if a task has too few), deterministic by (seed, epoch, task).
    """
    order = shuffled(sorted(train), f"{seed}-{epoch}")
    need = (k_shot + query_batch) * batch_size
    for task in order:
        rng, exs = random.Random(f"{seed}-{epoch}-{task}"), train[task]
        if len(exs) >= need:
            picks = rng.sample(exs, need)
        else:  # too few examples: with replacement
            picks = [rng.choice(exs) for _ in range(need)]
        batches = [picks[i: i + batch_size] for i in range(0, need, batch_size)]
        yield task, batches[:k_shot], (batches[k_shot] if query_batch else None)


# -----------------------------------------------------------------------------
# a split made in code: train.py --random-init's, for speed and memory (gpu_check.py)

SYNTHETIC = "synthetic"  # its name: no dataset file behind it


def synthetic_split(args) -> Split:
    """--random-init's tasks, drawn from a generator seeded by --seed (no dataset file): 16 training
    tasks (or --tasks-per-epoch, if more) of 64 examples (at most --max-examples) and 4 held-out
    tasks (2 K support, --max-val / --max-query validation and test examples, 32 if unset). An
    example is a window of random lowercase text twice --max-len characters long, four distinct
    random words as options and a uniformly random label. With the byte-level tokenizer every
    prompt is cut to exactly --max-len tokens (the question loses its start), so every training
    step is 2 x --max-len tokens, the shape bench.py times. There is nothing to learn: this is for
    speed and memory, and any accuracy is chance. `args`: train.py's flags."""
    rng, letters = random.Random(f"{SYNTHETIC}-{args.seed}"), "abcdefghijklmnopqrstuvwxyz"
    text = "".join(rng.choices(letters + " " * 5, k=max(8 * args.max_len, 4096)))  # ~1 space in 6
    words = sorted({"".join(rng.choices(letters, k=rng.randint(3, 8))) for _ in range(256)})
    n = 2 * args.max_len

    def examples(task, count):
        return [Example(task, text[i:i + n], rng.sample(words, 4), rng.randrange(4))
                for i in (rng.randrange(len(text) - n) for _ in range(count))]

    query, size = args.max_query or 32, min(64, args.max_examples or 64)
    train = {f"{SYNTHETIC}-{i:02d}": examples(f"{SYNTHETIC}-{i:02d}", size)
             for i in range(max(16, args.tasks_per_epoch or 16))}
    held_out = {t: HeldOut(examples(t, 2 * args.inner_steps), examples(t, args.max_val or query),
                           examples(t, query))
                for t in (f"{SYNTHETIC}-held-out-{i}" for i in range(4))}
    report = {t: Counter(kept=len(e)) for t, e in train.items()}
    report |= {t: Counter(kept=len(h.support) + len(h.val) + len(h.test))
               for t, h in held_out.items()}
    return Split(SYNTHETIC, train, held_out, report, {t: [] for t in report})
