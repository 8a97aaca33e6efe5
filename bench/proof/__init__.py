"""Shared pieces of the proof scripts (``bench/learning_proof.py``, ``bench/drift_and_cure.py``)."""
