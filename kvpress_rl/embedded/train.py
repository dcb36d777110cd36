"""The recipe that trains the embedded model's LoRA adapter on its two tasks (links and counted, mixed).

Seeded, resumable from checkpoints (`checkpoint/` in the output directory, written every
`checkpoint_every` steps, so an interrupted run loses at most that many steps), with a JSON Lines
log. Run it with `kvrl embedded train` (progress bar) or call `train_adapter`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvpress_rl.embedded.data import right_pad, training_example
from kvpress_rl.embedded.model import load_embedded
from kvpress_rl.embedded.task import COUNTED_ADAPTER, EmbeddedProblem, counted_problem, mixed_problem, training_seed


@dataclass
class TrainConfig:
    output: str = "embedded-adapter"
    examples: int = 1200
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    lora_rank: int = 16
    lora_alpha: int = 32
    min_hops: int = 4
    max_hops: int = 10
    min_links: int = 20
    max_links: int = 40
    counted_share: float = 0.5  # the fraction of examples from the counted family (COUNTED_ADAPTER lengths)
    seed: int = 0
    checkpoint_every: int = 20
    max_steps: int = 64  # the schedule spans examples // batch_size steps; training stops here


def curriculum_problem(index: int, config: TrainConfig) -> EmbeddedProblem:
    """The problem `index` of the training stream: its family drawn with `counted_share`, its difficulty from its
    seed."""
    if random.Random(f"family:{config.seed}:{index}").random() < config.counted_share:
        return counted_problem(training_seed(index, config.seed), COUNTED_ADAPTER)
    return mixed_problem(index, config.seed, (config.min_hops, config.max_hops), (config.min_links, config.max_links))


def _lr_at(step: int, total: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _save_checkpoint(model, optimizer, step: int, out: Path) -> None:
    staging = out / ".checkpoint-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "rng": torch.get_rng_state()},
               staging / "trainer_state.pt")
    final = out / "checkpoint"
    old = out / ".checkpoint-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def train_adapter(config: TrainConfig, resume: bool = False,
                  on_step: Callable[[int, int, float], None] | None = None) -> Path:
    """Train and write the adapter (fp16 safetensors + config) to `config.output`; returns that path."""
    from peft import LoraConfig, PeftModel, get_peft_model

    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    base, tokenizer = load_embedded(adapter=None)
    base.train()
    checkpoint = out / "checkpoint"
    start_step = 0
    if resume and (checkpoint / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
    else:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if resume and (checkpoint / "trainer_state.pt").is_file():
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        torch.set_rng_state(state["rng"])
    total = config.examples // config.batch_size
    last = min(total, config.max_steps)
    log_path = out / "train_log.jsonl"
    mode = "a" if resume else "w"
    with log_path.open(mode) as log:
        if not resume:
            log.write(json.dumps({"config": asdict(config)}) + "\n")
        for step in range(start_step, last):
            started = time.perf_counter()
            pairs = [training_example(tokenizer, curriculum_problem(step * config.batch_size + i, config))
                     for i in range(config.batch_size)]
            batch = right_pad(pairs, tokenizer.pad_token_id)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, config)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                      "seconds": time.perf_counter() - started}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if on_step:
                on_step(step + 1, last, record["loss"])
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == last:
                _save_checkpoint(model, optimizer, step + 1, out)
    model = model.to(torch.float16)
    model.save_pretrained(out / "adapter")
    return out / "adapter"
