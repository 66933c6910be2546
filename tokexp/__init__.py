"""Reproducible experiments on tokens and token distributions: tokenization metrics, distribution-based detectors, Triton-accelerated pruning.

Modules:

- `tokexp.chartasks`: CharBench-style character-level tasks (Uzan & Pinter 2025, "CharBench: Evaluating the Role of Tokenization in Character-Level Tasks"): a generator of counting and positional questions over word lists, the paper's per-item tokenization properties, likelihood evaluation of a causal LM over the answer options, and the correlations of the properties with correctness.
- `tokexp.toklab.lm`: Inference-based tokenizer evaluation (Regional Tiny Stories' "inference based evaluation"): the same small LM architecture trained on the same text with different tokenizers, compared by **bits per byte** on held-out text (a tokenizer-independent metric), tokens per byte and training compute, with equal-steps, equal-compute and equal-bytes budgets.
- `tokexp.toklab.markov`: Markov sources for the tokenization theory of Rajaraman, Jiao & Ramchandran (2024), "Toward a Theory of Tokenization in LLMs": k-th order sources over a small alphabet with their exact stationary distribution, entropy rate and unigram entropy, deterministic sampling, per-character cross-entropy of (tokenized) models, and small GPT-2s trained on the sources with a character-level or a BPE tokenizer, cached.
- `tokexp.toklab.scaling`: "Scaling Laws with Vocabulary: Larger Models Deserve Larger Vocabularies" (Tao et al., NeurIPS 2024): the paper's three predictions of the compute-optimal vocabulary size (IsoFLOPs power laws, the derivative-based estimate, the parametric loss with a vocabulary term) with its published constants, and fits of loss vs vocabulary size on our own small-LM grid with bootstrap uncertainty."""

__version__ = "0.0.1"
