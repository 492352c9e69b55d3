"""`python -m runtime.evaluation ...`: see runtime/evaluation/cli.py and docs/EVALUATION.md."""

from runtime.evaluation.cli import run

run()
