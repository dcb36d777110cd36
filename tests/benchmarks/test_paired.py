"""benchmarks/paired.py: the exact sign test over the problems two cells disagree on."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paired.py"


def cell(path: Path, solved: list[int]) -> Path:
    path.write_text("".join(json.dumps({"doc_id": i, "acc": float(ok)}) + "\n" for i, ok in enumerate(solved)))
    return path


def paired(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_counts_the_discordant_problems_and_their_exact_p(tmp_path):
    a = cell(tmp_path / "a.jsonl", [1] * 10 + [0] * 2)
    b = cell(tmp_path / "b.jsonl", [0] * 10 + [1] * 2)
    out = paired(a, b)
    assert out.returncode == 0, out.stderr
    assert "only the first 10, only the second 2; exact two-sided p = 0.039" in out.stdout  # 2 * (1 + 12 + 66) / 4096


def test_cells_on_different_problems_need_common(tmp_path):
    long = cell(tmp_path / "long.jsonl", [1, 1, 1, 1, 0, 0])
    short = cell(tmp_path / "short.jsonl", [0, 0, 1])
    refused = paired(long, short)
    assert refused.returncode != 0 and "--common" in refused.stderr
    out = paired(long, short, "--common")
    assert out.returncode == 0 and out.stdout.startswith("3 problems:") and "only the first 2, only the second 0" in out.stdout


def test_a_tiny_p_is_written_as_a_bound(tmp_path):
    a = cell(tmp_path / "a.jsonl", [1] * 30)
    b = cell(tmp_path / "b.jsonl", [0] * 30)
    assert "exact two-sided p < 0.001" in paired(a, b).stdout
