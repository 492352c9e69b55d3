"""`python -m model.merge`: the merge command's first name, kept working; it lives in
`runtime/merge.py` (the run layer). The one sanctioned upward import of `model/`, listed in the
import contract (tests/test_layering.py)."""

if __name__ == "__main__":
    from runtime.merge import main

    main()
