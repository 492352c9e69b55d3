"""Benchmark evaluation of a trained VLM: MME, POPE, MMBench (-CN, CCBench), ScienceQA-IMG,
TextVQA and our own training records.

    loaders.py, mmbench.py   the files users download -> `questions.Question`s (prompts included)
    runner.py                batched, resumable answering through `InferenceSession.answer_batch`
    extraction.py            the option letter / yes-no in a free-text answer (English, Chinese)
    scoring.py, vqa_accuracy.py   each benchmark's official scores and breakdowns
    registry.py              each benchmark named once: its loader, scorer, multiple choice or not
    held_out.py              `test.py --data_path`: the records path with test.py's report
    report.py                report.json, report.md, the side-by-side table of several runs
    cli.py                   `python -m runtime.evaluation` (docs/EVALUATION.md)
"""
