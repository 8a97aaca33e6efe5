"""Stage-B evaluation (``+experiment=eval``): greedy verdicts on a labelled set -> rates, tables, files."""
