"""vLLM's scheduler, with one rule added for head plans: no step computes prompt and generated tokens together.

A compressed head attends to its whole prompt while the prompt is prefilled, and to 16 sinks + 64 recent tokens for
every token after it (the executor's rule, and the learner's). vLLM recomputes a preempted request by one prefill of
its prompt and everything it had generated; the worker's attention metadata says whether a request is still in its
prompt (`is_prefilling`) but not where the prompt ends, so a step that spans both could not apply the two rules.
Ending every prefill chunk at the prompt's end makes a recompute two steps: the prompt (plain causal, as on an idle
server) and then the generated tokens, each of which the compressed heads attend to by the decoding rule
(`backend.kept_metadata`). The answer then does not depend on whether the request was preempted.

`prompt_boundary_scheduler` is what `engine.EngineSettings` names as vLLM's `scheduler_cls` (`PLAN_SCHEDULER`): it
builds the subclass of the scheduler vLLM would have used (`AsyncScheduler` where async scheduling is on, as on CUDA
builds).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler


class PromptBoundary:
    """Caps every prefill chunk at the end of its request's prompt (vLLM's last per-request cap on a chunk)."""

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int, num_new_tokens: int) -> int:
        tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        if num_computed_tokens < request.num_prompt_tokens:
            tokens = min(tokens, request.num_prompt_tokens - num_computed_tokens)
        return tokens


class PromptBoundaryScheduler(PromptBoundary, Scheduler):
    pass


class AsyncPromptBoundaryScheduler(PromptBoundary, AsyncScheduler):
    pass


if not hasattr(Scheduler, "_reserve_prefill_lookahead"):  # pragma: no cover - depends on the installed vLLM
    raise ImportError("vLLM's scheduler has no _reserve_prefill_lookahead, the per-request cap on a step's tokens "
                      "that kvpress-rl's scheduler extends: install vLLM 0.32")


def prompt_boundary_scheduler(*args: Any, vllm_config: Any, **kwargs: Any) -> Scheduler:
    """The engine core's scheduler (vLLM calls its `scheduler_cls` with these arguments)."""
    asynchronous = vllm_config.scheduler_config.async_scheduling
    cls = AsyncPromptBoundaryScheduler if asynchronous else PromptBoundaryScheduler
    return cls(*args, vllm_config=vllm_config, **kwargs)
