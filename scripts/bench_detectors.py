#!/usr/bin/env python3
"""Speed benchmark for tokexp.detect: scoring N texts with all (>= 12) zero-shot detectors from one TokenStats pass per
model vs one forward pass per detector per text at batch size 1 (the anchors' way), on the same texts, in one run.

    .venv/bin/python scripts/bench_detectors.py --n 40 --model ref-small --other ref-small-s2
    .venv/bin/python scripts/bench_detectors.py --tiny          # a toy model trained in seconds (no reference LM needed)

Prints forward passes and wall times of both routes and their ratio (goal: >= 5x); --save writes JSON next to it.
"""
import argparse, json, sys, tempfile, time
from dataclasses import replace
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="texts to score")
    ap.add_argument("--model", default="ref-small", help="scoring model (registry name, folder or hf:<id>)")
    ap.add_argument("--other", default="ref-small-s2", help="second model for two-model detectors ('' for none)")
    ap.add_argument("--domain", default="fortunes", help="held-out domain the texts come from (lm_split)")
    ap.add_argument("--max-chars", type=int, default=600, help="cut texts to this many characters")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per batch in the one-pass route")
    ap.add_argument("--tiny", action="store_true", help="use two toy models trained on toy_corpus (fast, for CI)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--save", default="", help="write the result JSON here")
    a = ap.parse_args(argv)
    import torch
    from tokexp.lm import load_lm, lm_split, train_lm, toy_corpus, TINY
    from tokexp.detect import bench_detectors
    if a.threads > 0: torch.set_num_threads(a.threads)
    if a.tiny:
        cache = Path(tempfile.mkdtemp(prefix="bench-detect-"))
        corpus = toy_corpus()
        lm = load_lm(train_lm(replace(TINY, steps=40), corpus=corpus, cache_dir=cache, progress=False), device="cpu")
        other = load_lm(train_lm(replace(TINY, steps=40, seed=9), corpus=corpus, cache_dir=cache, progress=False), device="cpu")
        texts = [t for d in corpus.values() for t in d[1]][:a.n]
    else:
        lm = load_lm(a.model, train_if_missing=True)
        other = load_lm(a.other, train_if_missing=True) if a.other else None
        texts = [t[:a.max_chars] for t in lm_split(a.domain)[1] if len(t) >= 80][:a.n]
    r = bench_detectors(lm, other, texts, batch_size=a.batch_size, progress=True)
    o, p = r["one_pass"], r["per_detector"]
    print(f"{r['n_texts']} texts, {r['n_detectors']} detectors ({', '.join(r['detectors'])}); torch threads {torch.get_num_threads()}")
    print(f"one pass per model : {sum(o['forward_passes'].values()):6d} forward passes {o['forward_passes']}, {o['seconds']:8.2f} s")
    print(f"one pass/detector  : {sum(p['forward_passes'].values()):6d} forward passes {p['forward_passes']}, {p['seconds']:8.2f} s")
    print(f"speedup {r['speedup']:.1f}x wall time, {r['pass_ratio']:.0f}x fewer passes; max relative score difference {r['max_rel_diff']:.1e}")
    if a.save: Path(a.save).write_text(json.dumps(r, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
