"""MRBench: the multi-reference benchmark, its methods, metrics and reports (paper §5)."""
