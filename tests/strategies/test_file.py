import math

import pytest
import torch

from kvpress_rl import HeadScores, KvrlError, SelectionContext, plan_from_scores
from kvpress_rl.models import random_model, small_config
from kvpress_rl.strategies.file import FileOptions, FileScores

PATTERNS = {"Llama-3.1-8B-R1": ("llama", 32, 8), "Qwen-2.5-7B-R1": ("qwen2", 28, 4),
            "Qwen-3-4B-Thinking": ("qwen3", 36, 8)}


@pytest.mark.parametrize("folder", PATTERNS)
def test_published_rlkv_pattern_compresses_the_lowest_heads_at_60_percent(head_patterns, folder):
    arch, layers, kv_heads = PATTERNS[folder]
    config = small_config(arch, num_hidden_layers=layers, num_key_value_heads=kv_heads,
                          num_attention_heads=kv_heads * 2,
                          hidden_size=32, head_dim=8, intermediate_size=32)
    model = random_model(config)
    path = head_patterns / folder / "rlkv.tsv"
    scores = FileScores(FileOptions(path=str(path))).select(model, None, SelectionContext())
    raw = torch.tensor([[float(x) for x in line.split("\t")] for line in path.read_text().split("\n") if line.strip()])
    clipped = raw.clamp(0, 1).flatten()
    for rule, count in (("round", round(0.6 * clipped.numel())), ("official", math.ceil(0.6 * (clipped.numel() - 1)))):
        plan = plan_from_scores(scores, 0.6, rule=rule)
        check_lowest_compressed(plan, clipped, count, exact_order=rule == "round")


def check_lowest_compressed(plan, clipped, count, exact_order):
    assert plan.num_compressed == count
    # every compressed head scores no higher than every full head (after the paper's clipping)
    assert clipped[~plan.full.flatten()].max() <= clipped[plan.full.flatten()].min()
    if not exact_order:  # ties at the cut break by the official rule's seeded noise, not by position
        return
    # and exactly the `count` lowest by a stable sort are the compressed ones
    lowest = torch.sort(clipped, stable=True).indices[:count]
    assert set(lowest.tolist()) == set(torch.nonzero(~plan.full.flatten()).flatten().tolist())


def test_file_of_another_shape_is_refused(head_patterns):
    model = random_model(small_config("llama"))
    with pytest.raises(KvrlError, match="32 layers x 8 KV heads, the model has 4 x 4"):
        llama = FileScores(FileOptions(path=str(head_patterns / "Llama-3.1-8B-R1" / "rlkv.tsv")))
        llama.select(model, None, SelectionContext())


def test_file_needs_a_path():
    with pytest.raises(KvrlError, match="needs --path"):
        FileScores().select(random_model(small_config("llama")), None, SelectionContext())


def test_safetensors_scores_keep_their_source_provenance(tmp_path):
    model = random_model(small_config("llama"))
    HeadScores(torch.rand(4, 4), strategy="rlkv", seed=3).save(tmp_path / "s.safetensors")
    scores = FileScores(FileOptions(path=str(tmp_path / "s.safetensors"))).select(model, None, SelectionContext())
    assert scores.strategy == "file" and scores.extra["source"]["strategy"] == "rlkv"
