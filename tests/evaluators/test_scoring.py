from kvpress_rl.evaluators.scoring import classify, is_repetitive


def test_repetition_rule_and_classification():
    looping = list(range(10)) * 50  # 500 tokens, 10 distinct ids
    varied = list(range(500))
    assert is_repetitive(looping) and not is_repetitive(varied) and not is_repetitive(looping[:399])
    assert classify(True, looping, 500) == "correct"
    assert classify(False, looping, 500) == "repetitive"
    assert classify(False, varied, 500) == "overlength"
    assert classify(False, varied[:20], 500) == "incorrect"
