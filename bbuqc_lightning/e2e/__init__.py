"""End-to-end evaluation: photos -> the model's own Stage-A summaries -> the same model's Stage-B verdicts."""
