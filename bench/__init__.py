"""`make bench`: the benchmark harness of issue 6 (see bench/__main__.py)."""
