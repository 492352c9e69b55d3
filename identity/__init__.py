"""Content identity: what makes a model, a vision tower, a data file or a checkpoint "the same"
one. The lowest layer: every package may import it, and it imports nothing of the project (and
no torch at import). See `identity/fingerprint.py`."""
