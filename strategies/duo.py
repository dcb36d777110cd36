"""`duo`: DuoAttention-style gates (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM
Inference with Retrieval and Streaming Heads", arXiv 2410.10819), as the RLKV paper re-trains them.

One gate per (layer, KV head) in the executor's gated mixed attention (`alpha * full + (1 - alpha)
* streaming`), trained by distillation: the mean squared error between the last hidden states of
the full model and of the gated model on the answer tokens of synthetic passkey-retrieval contexts,
plus an L1 penalty on the gates; AdamW on the gates only, the model frozen. Heads whose streaming
version changes nothing are pushed to 0 by the penalty; heads needed to retrieve the passkey stay
near 1. Assumes long-range retrieval is what full-cache heads are for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.haystack import token_pool
from kvpress_rl.models import frozen, model_id
from kvpress_rl.policies import SINK_TOKENS, WINDOW_TOKENS
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import HeadSelector, SelectionContext


@dataclass
class DuoOptions:
    steps: int = field(default=60, metadata={"help": "optimisation steps (the paper: 2000 on 8B models)"})
    lr: float = field(default=0.02, metadata={"help": "AdamW learning rate on the gates"})
    l1: float = field(default=0.05, metadata={"help": "weight of the L1 penalty on the gates"})
    context_length: int = field(default=256, metadata={"help": "haystack tokens per passkey context"})
    passkey_length: int = field(default=8, metadata={"help": "tokens in the passkey"})
    batch_size: int = field(default=2, metadata={"help": "contexts per step"})
    sink: int = field(default=SINK_TOKENS, metadata={"help": "sink tokens of the streaming branch"})
    window: int = field(default=WINDOW_TOKENS, metadata={"help": "recent tokens of the streaming branch"})


class DuoGates(HeadSelector):
    __doc__ = __doc__
    name = "duo"
    kind = "head"
    description = "DuoAttention gates trained by distillation on passkey retrieval"
    trains = True
    Options = DuoOptions

    def passkey_batch(self, pool: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids `(batch, seq)` and the positions of the answer (the passkey's second copy)."""
        o = self.options
        rows = []
        for _ in range(o.batch_size):
            haystack = pool[torch.randint(len(pool), (o.context_length,), generator=generator)]
            passkey = pool[torch.randint(len(pool), (o.passkey_length,), generator=generator)]
            at = int(torch.randint(o.context_length + 1, (1,), generator=generator))
            rows.append(torch.cat([haystack[:at], passkey, haystack[at:], passkey]))
        answer = torch.arange(o.context_length + o.passkey_length, o.context_length + 2 * o.passkey_length)
        return torch.stack(rows), answer

    def select(self, model, tokenizer, context: SelectionContext) -> HeadScores:
        o = self.options
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(context.seed)
        pool = token_pool(model, tokenizer)
        gates = new_gates(model, 1.0)
        optimizer = torch.optim.AdamW([gates], lr=o.lr, weight_decay=0.0)
        losses = []
        with frozen(model):
            for step in range(o.steps):
                ids, answer = self.passkey_batch(pool, generator)
                ids = ids.to(model.device)
                with torch.no_grad():
                    target = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, answer]
                with gated(model, gates, sink=o.sink, window=o.window):
                    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, answer]
                distill = torch.nn.functional.mse_loss(hidden.float(), target.float())
                loss = distill + o.l1 * gates.clamp(0, 1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    gates.clamp_(0.0, 1.0)
                losses.append(distill.item())
                if context.on_step:
                    context.on_step(step + 1, o.steps, {"loss": distill.item()})
        return self.scores(gates.detach().clamp(0, 1), model_id(model), context, time.perf_counter() - start,
                           final_distill_loss=losses[-1] if losses else None)
