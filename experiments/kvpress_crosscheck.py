"""Cross-check our token policies against kvpress (NVIDIA/kvpress) on the same prefill.

On a seeded random-weight Llama (4 layers, 8 query heads over 4 KV heads, 512 prompt tokens) it
compares, per layer and KV head, which positions our `streaming` and `snapkv` policies keep after
the prefill with those kvpress's `StreamingLLMPress` and `SnapKVPress` keep (window 64, kernel 5,
the same budget), and prints the Jaccard index of the two sets (1.0 = the same positions).

Needs kvpress, which pins an older transformers than ours: `experiments/kvpress_crosscheck.sh`
makes its own virtual environment for it. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import inspect

import torch


def kept_positions(kept_keys: torch.Tensor, full_keys: torch.Tensor) -> list[list[set[int]]]:
    """Positions (batch row 0) of the kept keys, per KV head, by matching them to the full cache's keys."""
    result = []
    for head in range(full_keys.shape[1]):
        distance = torch.cdist(kept_keys[0, head].float(), full_keys[0, head].float())
        result.append(set(distance.argmin(dim=-1).tolist()))
    return result


def layer_keys(cache, index: int) -> torch.Tensor:
    if hasattr(cache, "layers"):
        return cache.layers[index].keys
    return cache.key_cache[index]


def cache_kwarg(model) -> str:
    """transformers 5.3+ calls the cache argument `cache`, earlier ones `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--sink", type=int, default=4, help="StreamingLLMPress's n_sink")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    import kvpress
    from transformers import DynamicCache

    from kvpress_rl.executor import compressed
    from kvpress_rl.models import random_model, small_config
    from kvpress_rl.plan import token_plan
    from kvpress_rl.policies import Budget, SnapKV, Streaming

    # a wider initialisation than the default so that attention is peaked, not near-uniform (no ties)
    model = random_model(small_config("llama", initializer_range=0.2), seed=args.seed)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(args.seed))
    name = cache_kwarg(model)
    from importlib.metadata import version

    print(f"kvpress {version('kvpress')}, transformers {__import__('transformers').__version__}, "
          f"torch {torch.__version__}; cache argument: {name}")

    with torch.no_grad():
        full = DynamicCache()
        model(input_ids=ids, use_cache=True, **{name: full})
        full_keys = [layer_keys(full, i) for i in range(layers)]

    ratio = 1.0 - args.budget / args.tokens
    pairs = {
        "streaming": (Streaming(sink=args.sink, window=args.budget - args.sink),
                      kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=args.sink)),
        "snapkv": (SnapKV(budget_spec=Budget(fixed=args.budget), window=args.window, kernel=args.kernel),
                   kvpress.SnapKVPress(compression_ratio=ratio, window_size=args.window, kernel_size=args.kernel)),
    }
    worst = {}
    for policy_name, (policy, press) in pairs.items():
        with torch.no_grad():
            with compressed(model, token_plan((layers, kv_heads), ratio, policy)) as session:
                ours_cache = session.new_cache()
                model(input_ids=ids, use_cache=True, **{name: ours_cache})
            theirs_cache = DynamicCache()
            with press(model):
                model(input_ids=ids, use_cache=True, **{name: theirs_cache})
        print(f"\n{policy_name}: budget {args.budget} of {args.tokens} (kvpress compression_ratio {ratio:g}); "
              "Jaccard per KV head")
        scores = []
        for layer in range(layers):
            ours = kept_positions(ours_cache.layers[layer].compressed_keys, full_keys[layer])
            theirs = kept_positions(layer_keys(theirs_cache, layer), full_keys[layer])
            row = [len(a & b) / len(a | b) for a, b in zip(ours, theirs)]
            scores.extend(row)
            sizes = {len(s) for s in ours + theirs}
            print(f"  layer {layer}: " + " ".join(f"{j:.3f}" for j in row) + f"   (kept sizes {sorted(sizes)})")
        worst[policy_name] = min(scores)
    print("\nminimum Jaccard: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
