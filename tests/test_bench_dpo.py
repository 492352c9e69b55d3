"""bench/dpo_memory.py runs both ways on short answers and they agree on the loss."""

from __future__ import annotations

import pytest

from bench import dpo_memory

pytestmark = pytest.mark.slow  # two fresh processes, each with the 151,936-token vocabulary


def test_both_variants_run_and_agree(capsys):
    results = dpo_memory.main(["--answers", "16", "--steps", "1"])
    assert [row["variant"] for row in results] == ["chunked", "full"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-5)
    assert results[0]["loss"] != pytest.approx(0.6931, abs=1e-4)  # the policy is not the reference
    assert all(row["peak_gib"] > 0 for row in results)
    assert "| 16 | chunked |" in capsys.readouterr().out
