#!/usr/bin/env python
"""Speed of the tokenizer metric suite (tokexp.tokmetrics).

1. One tokenizer, the whole UDHR (all languages, article-parallel texts): the raw library batch encode next to the full
   metric suite (one adapter encode_batch + every default metric per language and pooled), measured side by side in
   one run, best of --repeats. Goal: suite <= 1.3x raw encode.
2. --all: wall time of the full suite for every zoo tokenizer x every UDHR language (load + encode + metrics).

Usage: .venv/bin/python scripts/bench_tokmetrics.py [--tokenizer cl100k_base] [--repeats 3] [--all] [--out bench.json]
"""
import argparse, json, sys, time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="cl100k_base", nargs="+", help="zoo name(s) for the suite-vs-raw comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="also time every zoo tokenizer x every UDHR language")
    ap.add_argument("--out", default="", help="write results as JSON here")
    a = ap.parse_args(argv)
    from tokexp import tokmetrics as M
    from tokexp.tokenizers import ZOO
    t0 = time.perf_counter()
    corpus = M.udhr_corpus()
    load_s = time.perf_counter() - t0
    print(f"UDHR: {len(corpus)} texts, {len(corpus.group_names)} languages, {corpus.n_bytes.sum()/1e6:.2f} MB "
          f"(read + corpus prep {load_s:.2f} s)")
    out = {"corpus": {"texts": len(corpus), "languages": len(corpus.group_names), "MB": float(corpus.n_bytes.sum() / 1e6),
                      "read_and_prep_s": load_s}, "suite_vs_raw": []}
    names = [a.tokenizer] if isinstance(a.tokenizer, str) else a.tokenizer
    for nm in names:
        r = M.benchmark_suite(nm, corpus, repeats=a.repeats)
        out["suite_vs_raw"].append(r)
        print(f"{r['tokenizer']:>14}: raw encode {r['raw_encode_s']:.2f} s, full suite {r['suite_s']:.2f} s -> "
              f"ratio {r['ratio']:.2f}x (median {r['ratio_median']:.2f}x, CPU time {r['cpu_ratio']:.2f}x; goal <= 1.3x); tokenizer-independent corpus prep {r['corpus_prep_s']:.2f} s "
              f"(ratio incl. prep {r['ratio_with_prep']:.2f}x)")
    if a.all:
        t0 = time.perf_counter()
        res = M.evaluate_tokenizers(list(ZOO), corpus, progress=True)
        wall = time.perf_counter() - t0
        tim = res["timing"]
        out["all_zoo"] = {"tokenizers": len(tim), "languages": len(corpus.group_names), "wall_s": wall,
                          "encode_s": float(tim.encode_s.sum()), "metrics_s": float(tim.metrics_s.sum()),
                          "per_tokenizer": tim.to_dict(orient="records"), "warnings": res["warnings"][:50]}
        print(f"all {len(tim)} zoo tokenizers x {len(corpus.group_names)} UDHR languages: wall {wall:.1f} s "
              f"(encode {tim.encode_s.sum():.1f} s, metrics {tim.metrics_s.sum():.1f} s, rest = loading)")
    if a.out:
        with open(a.out, "w") as f: json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
