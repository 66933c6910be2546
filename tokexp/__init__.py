"""Reproducible experiments on tokens and token distributions: tokenization metrics, distribution-based detectors, Triton-accelerated pruning.

Modules:

- `tokexp.chartasks`: CharBench-style character-level tasks (Uzan & Pinter 2025, "CharBench: Evaluating the Role of Tokenization in Character-Level Tasks"): a generator of counting and positional questions over word lists, the paper's per-item tokenization properties, likelihood evaluation of a causal LM over the answer options, and the correlations of the properties with correctness."""

__version__ = "0.0.1"
