"""Zero-shot SmolLM2 on the diag held-out sources with their real labels vs under the diag names."""
import sys, json, random, argparse
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import benchmark, data, heldout, llama, fetch, train
torch.set_num_threads(1)
model, tok = llama.load(fetch.resolve_model("smollm2-135m"), device="cpu", dtype=torch.float32)
args = train.parse_args(["--method", "pretrained"])
args.device = "cpu"
bench = benchmark.benchmark_dir()
out = {}
for task in sys.argv[1:]:
    path = sorted((bench / task).glob("*.jsonl"))[-1]  # the first run read {task}_16_100_test.jsonl, rows[:60]
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    random.Random(0).shuffle(rows)
    exs = []
    for i, r in enumerate(rows[:40]):
        exs.append(data.Example(task=task, input=r["input"], options=r["options"], label=r["options"].index(r["output"])))
    pr = heldout.score(model, exs, tok, args)
    acc = sum(max(range(len(p["probs"])), key=p["probs"].__getitem__) == p["label"] for p in pr) / len(pr)
    maj = max(sum(e.label == c for e in exs) for c in range(len(exs[0].options))) / len(exs)
    out[task] = (round(acc, 3), round(maj, 3), len(pr), exs[0].options)
    print(task, out[task], flush=True)
