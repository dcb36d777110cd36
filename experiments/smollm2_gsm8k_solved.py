"""Which GSM8K problems does SmolLM2-135M-Instruct solve with the full cache?

Greedy, chat template, the R1 prompt (`... put your final answer within \\boxed{}`), math-verify
against the gold number. Writes the solved rows, unchanged, to `OUT/gsm8k/<split>.jsonl`, so that
`--data-dir OUT` gives a GSM8K made only of problems the model can solve: the training pool of
`kvrl select --strategy rlkv --data OUT/gsm8k/train.jsonl` and the held-out set of
`kvrl eval --tasks gsm8k_r1 --data-dir OUT`. Resumable: progress is kept per split.

    python experiments/smollm2_gsm8k_solved.py --split test --count 960 --out results/smollm2-gsm8k
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.progress import Progress

from kvpress_rl.embedded.model import smollm2_gguf
from kvpress_rl.models import load_model
from kvpress_rl.strategies.rlkv import RLKVOptions
from kvpress_rl.strategies.rlkv.problems import jsonl_problems
from kvpress_rl.strategies.rlkv.rollouts import chat_ids, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["train", "test"], required=True)
    parser.add_argument("--count", type=int, default=960, help="problems to scan from the start of the split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("results/smollm2-gsm8k"))
    args = parser.parse_args()

    source = Path(args.data_dir) / "gsm8k" / f"{args.split}.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()[: args.count]]
    problems = jsonl_problems(source, args.count)
    target = args.out / "gsm8k" / f"{args.split}.jsonl"
    progress_file = args.out / f"scan-{args.split}.json"
    fresh = {"done": 0, "solved": 0, "seconds": 0.0}
    state = json.loads(progress_file.read_text()) if progress_file.is_file() else fresh
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(str(smollm2_gguf()))
    options = RLKVOptions(max_new_tokens=args.max_new_tokens)
    with Progress() as bar:
        task = bar.add_task(f"gsm8k {args.split}", total=len(problems), completed=state["done"])
        for start in range(state["done"], len(problems), args.batch_size):
            began = time.perf_counter()
            chunk = problems[start:start + args.batch_size]
            out, mask, offset = generate(model, tokenizer, [chat_ids(tokenizer, p.prompt) for p in chunk], options,
                                         sample=False)
            solved = []
            completions = zip(chunk, out[:, offset:], mask[:, offset:])
            for index, (problem, row, row_mask) in enumerate(completions, start=start):
                text = tokenizer.decode(row[row_mask.bool()], skip_special_tokens=True)
                if problem.verify(text, problem.answer):
                    solved.append({**rows[index], "index": index, "solution_tokens": int(row_mask.sum())})
            with target.open("a") as handle:  # rows first, then the progress mark: a crash repeats a batch at most
                handle.writelines(json.dumps(r) + "\n" for r in solved)
            state = {"done": start + len(chunk), "solved": state["solved"] + len(solved),
                     "seconds": state["seconds"] + time.perf_counter() - began}
            progress_file.write_text(json.dumps(state))
            bar.update(task, completed=state["done"], description=f"gsm8k {args.split}: {state['solved']} solved")
    print(json.dumps({"split": args.split, **state}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
