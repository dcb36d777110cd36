"""What lm-eval recorded for a sample, read in both of its layouts."""

from kvpress_rl.evaluators.samples import sample_context


def test_sample_context_reads_both_argument_layouts():
    assert sample_context({"arguments": [["prompt", {"until": []}]]}) == "prompt"
    assert sample_context({"arguments": {"gen_args_0": {"arg_0": "prompt", "arg_1": {}}}}) == "prompt"
