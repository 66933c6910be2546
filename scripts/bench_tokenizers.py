#!/usr/bin/env python
"""Benchmark: tokens/s of tokexp tokenizer adapters' `encode_batch` vs the raw library (HF tokenizers, tiktoken,
sentencepiece) on ~1 MB of multilingual UDHR text. Ratios are measured side by side in one process.

usage: python scripts/bench_tokenizers.py [--mb 1.0] [--repeats 5] [NAME ...]
"""
import argparse, sys
from tokexp.tokenizers import benchmark, multilingual_sample

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["bert-minilm", "llama-3", "cl100k_base", "o200k_base", "mistral-v3"])
    ap.add_argument("--mb", type=float, default=1.0, help="batch size in MB of UTF-8")
    ap.add_argument("--repeats", type=int, default=5, help="timing runs each (median kept)")
    a = ap.parse_args(argv)
    texts = multilingual_sample(int(a.mb * 1e6))
    df = benchmark(a.names, texts, repeats=a.repeats)
    print(df[["name", "format", "MB", "tokens", "adapter_tok_per_s", "raw_tok_per_s", "overhead", "cpu_overhead"]].to_string(index=False,
          float_format=lambda x: f"{x:,.3f}" if x < 100 else f"{x:,.0f}"))
    return 0

if __name__ == "__main__":
    sys.exit(main())
