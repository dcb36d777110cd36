"""A head plan as vLLM sees it: pure Python, no vLLM and no transformers.

`EnginePlan` travels to every vLLM process inside the model config (`hf_overrides`), so it is plain JSON data.
The rule of a compressed head, in every phase (the executor's, `kvpress_rl/executor/cache.py`): in a step that
starts with `c` cached tokens, query `c + i` attends to the kept history `{0..sink-1} U {max(sink, c-window)..c-1}`
and to the step's own tokens `c..c+i` (a prompt chunk; generated tokens recomputed after a preemption attend one by
one, each as when it was decoded: `scheduler.py`). A decoding step (`c >= 80`) is 16 + 64 + 1 = 81 keys, as the
executor's "attend over budget + 1, then trim"; a prompt prefilled in one step is plain causal attention, as the
executor's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kvpress_rl.errors import KvrlError
from kvpress_rl.plan import CompressionPlan
from kvpress_rl.policies import BUDGET_BASE, SINK_TOKENS, WINDOW_TOKENS, Streaming

OVERRIDES_KEY = "kvrl_plan"  # the model-config attribute the plan travels under (`hf_overrides`)
GATED_KEY = "kvrl_gated"  # the attribute a gated engine's streaming branch travels under (`GatedBranch`)
ARCHITECTURES = {  # the stock vLLM class each of ours extends
    "LlamaForCausalLM": "KvrlLlamaForCausalLM",
    "MistralForCausalLM": "KvrlMistralForCausalLM",
    "Qwen2ForCausalLM": "KvrlQwen2ForCausalLM",
    "Qwen3ForCausalLM": "KvrlQwen3ForCausalLM",
}


@dataclass(frozen=True)
class EnginePlan:
    """Which KV heads keep the full cache (`full[layer][kv_head]`), and what the others keep."""

    full: tuple[tuple[bool, ...], ...]
    sink: int = SINK_TOKENS
    window: int = WINDOW_TOKENS
    source: str = ""

    @classmethod
    def from_plan(cls, plan: CompressionPlan) -> EnginePlan:
        """The engine form of a head plan; token and hybrid plans are refused (they need attention scores)."""
        policy = plan.policy
        if plan.full_policy is not None or not isinstance(policy, Streaming) or policy.budget_spec is not None:
            full_heads = "" if plan.full_policy is None else f" and its full heads {plan.full_policy.describe()}"
            raise KvrlError("the vLLM engine runs head plans whose compressed heads keep sink + recent tokens "
                            f"(`streaming`); this plan's compressed heads keep {policy.describe()}{full_heads}")
        full = tuple(tuple(bool(x) for x in row) for row in plan.full.tolist())
        return cls(full=full, sink=policy.sink, window=policy.window, source=plan.source)

    @classmethod
    def full_cache(cls, num_layers: int, num_kv_heads: int) -> EnginePlan:
        return cls(full=tuple((True,) * num_kv_heads for _ in range(num_layers)))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.full), len(self.full[0]) if self.full else 0)

    @property
    def num_compressed(self) -> int:
        return sum(not x for row in self.full for x in row)

    @property
    def num_heads(self) -> int:
        return sum(len(row) for row in self.full)

    @property
    def budget(self) -> int:
        return self.sink + self.window

    def to_json(self) -> dict:
        return {"v": 1, "full": [[int(x) for x in row] for row in self.full], "sink": self.sink,
                "window": self.window, "source": self.source}

    @classmethod
    def from_json(cls, data: dict) -> EnginePlan:
        if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(data.get("full"), list):
            raise KvrlError(f"`{OVERRIDES_KEY}` is not a kvpress-rl engine plan (version 1): {str(data)[:80]}")
        return cls(full=tuple(tuple(bool(x) for x in row) for row in data["full"]), sink=int(data["sink"]),
                   window=int(data["window"]), source=str(data.get("source", "")))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def check_shape(self, num_layers: int, num_kv_heads: int) -> None:
        if self.shape != (num_layers, num_kv_heads) or any(len(row) != num_kv_heads for row in self.full):
            raise KvrlError(f"plan has shape {self.shape[0]} layers x {self.shape[1]} KV heads, "
                            f"the model has {num_layers} x {num_kv_heads}")


def kept_history(computed: int, sink: int = SINK_TOKENS, window: int = WINDOW_TOKENS) -> list[int]:
    """Positions of the cached tokens a compressed head attends to in a step that starts with `computed` cached
    tokens."""
    head = list(range(min(sink, computed)))
    return head + list(range(max(sink, computed - window), computed))


def freeable_blocks(processed: int, block_size: int, sink: int = SINK_TOKENS, window: int = WINDOW_TOKENS) -> range:
    """Block indices of a compressed head that no later step reads once `processed` tokens are cached: every block
    after the sink blocks that lies wholly before the window of the next step."""
    return range(-(-sink // block_size), max(0, processed - window) // block_size)


def resume_blocks(computed: int, block_size: int, sink: int = SINK_TOKENS, window: int = WINDOW_TOKENS) -> list[int]:
    """Block indices a compressed head needs cached to go on from `computed` tokens (a multiple of the block size):
    the blocks of those tokens that `freeable_blocks` keeps, the sinks' and the window's."""
    freed = freeable_blocks(computed, block_size, sink, window)
    return [i for i in range(computed // block_size) if i not in freed]


def head_blocks_held(tokens: int, block_size: int, full: bool, sink: int = SINK_TOKENS,
                     window: int = WINDOW_TOKENS) -> int:
    """Blocks one KV head holds in the steady state after `tokens` tokens (what the manager keeps allocated)."""
    allocated = -(-tokens // block_size)
    if full:
        return allocated
    return allocated - len(freeable_blocks(tokens, block_size, sink, window))


def ideal_capacity_ratio(sparsity: float, length: int, budget: int = BUDGET_BASE) -> float:
    """Sequences that fit a fixed KV budget under a plan, over those of the full cache: `1 / ((1-s) + s * 80 / L)`."""
    return 1.0 / ((1.0 - sparsity) + sparsity * min(budget, length) / length)


MAX_GROUPS = 16  # KV-cache groups the layout may ask of vLLM (each one is a block table the scheduler walks every step)
# A tagging must save this share of the blocks: each more group is one more metadata build per step, and a layer whose
# full heads fall in two groups runs two kernel calls instead of one (`heads.head_runs`).
MIN_SAVING = 0.05


def padded_head_blocks(full: int, compressed: int, group: int, length: int, block_size: int) -> int:
    """Head-blocks one request of `length` tokens holds when vLLM groups `group` sub-layers per block table: full
    groups of `group` full heads each, compressed heads filling `ceil(compressed / group)` groups (padding included)."""
    full_groups, compressed_groups = -(-full // group) if full else 0, -(-compressed // group) if compressed else 0
    steady = head_blocks_held(length, block_size, full=False) + 1  # the window's blocks and the next token's
    return full_groups * group * -(-length // block_size) + compressed_groups * group * steady


def vllm_group_size(full: int, compressed: int) -> int:
    """The KV-cache group size vLLM itself gives `full` and `compressed` one-head layers (one bucket of each spec).

    A copy of vLLM 0.32's rule (`_get_kv_cache_groups_uniform_page_size`: the largest bucket when every bucket is
    within 1.5x of the smallest, else the smallest, the others padded), kept here in plain Python because `kvrl serve`
    sizes its cache with it before vLLM runs; `vllm_compat.SUPPORTED` names the release it is copied from."""
    smallest, largest = min(full, compressed), max(full, compressed)
    return largest if largest < 1.5 * smallest else smallest


def group_layout(full: int, compressed: int, length: int, block_size: int) -> int | None:
    """How many full heads share one KV-cache group (their tag), so that vLLM pads only compressed groups; None: leave
    vLLM's own grouping (the full and the compressed heads one bucket each), when it holds no more.

    vLLM makes every group as large as its smallest bucket of same-spec layers (or its largest, when all are within
    1.5x) and pads the others; with 45 full and 67 compressed heads it would pad the full group to 67 layers (+49%
    on every full block). Tagging the full heads into buckets of `g` (a divisor of their count) with the compressed
    heads in one bucket of at least 1.5 g keeps the full groups exact.
    """
    if not full or not compressed:
        return None
    default = vllm_group_size(full, compressed)
    best, cost = None, padded_head_blocks(full, compressed, default, length, block_size)
    for group in range(full, 0, -1):
        if full % group or not (compressed == group or compressed >= 1.5 * group):
            continue
        if full // group + -(-compressed // group) > MAX_GROUPS:
            break
        tagged = padded_head_blocks(full, compressed, group, length, block_size)
        if tagged < cost:
            best, cost = group, tagged
    if best is not None and cost > (1 - MIN_SAVING) * padded_head_blocks(full, compressed, default, length, block_size):
        return None  # not worth its per-step cost
    return best


def sequence_head_blocks(plan: EnginePlan | None, num_layers: int, num_kv_heads: int, length: int,
                         block_size: int) -> int:
    """Head-blocks (one KV head's block of `block_size` tokens) one sequence of `length` tokens holds in vLLM under a
    plan (None: every head full), with the KV-cache grouping the engine asks for (`group_layout`; vLLM pads groups)."""
    heads = num_layers * num_kv_heads
    if plan is None or not plan.num_compressed:
        return heads * -(-length // block_size)
    full, compressed = heads - plan.num_compressed, plan.num_compressed
    if not full:
        return compressed * (head_blocks_held(length, block_size, full=False, sink=plan.sink, window=plan.window) + 1)
    group = group_layout(full, compressed, length, block_size) or vllm_group_size(full, compressed)
    return padded_head_blocks(full, compressed, group, length, block_size)
