#!/usr/bin/env python
"""TokenStats overhead: `token_stats` (every single-model field) vs a plain forward pass of the same model on the same
batches, timed side by side in one run (alternating repetitions, medians). Goal on CPU: ratio <= 1.15.

    python scripts/bench_tokenstats.py [--model ref-small] [--texts 64] [--batch-size 16] [--reps 5] [--impl compiled] [--extra] [--json OUT]

`--model` takes a reference-LM name, a model folder or `hf:<id>`. An untrained reference LM is benchmarked with
random weights of its config and the shared tokenizer (speed does not depend on the weights).
"""
import argparse, json, sys, time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ref-small")
    ap.add_argument("--texts", type=int, default=64, help="held-out texts (fortunes, gcide, wordnet in turn)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--extra", action="store_true", help="also time hidden=True and a two-model run")
    ap.add_argument("--impl", default="auto", help="vocab-statistics implementation: auto, torch, compiled (torch.compile), triton")
    ap.add_argument("--json", default="", help="write the result dict here")
    a = ap.parse_args(argv)
    import torch
    from tokexp.core import AssetMissingError
    from tokexp import lm
    if a.threads: torch.set_num_threads(a.threads)
    try:
        model, tok = lm.load_lm(a.model, device=a.device)
        weights = "trained"
    except AssetMissingError:
        if a.model not in lm.LMS: raise
        from transformers import AutoModelForCausalLM
        spec = lm.LMS[a.model]
        tok = lm.shared_tokenizer(spec, lm.lm_corpus(spec))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(lm.hf_config(spec)).to(a.device).eval()
        model.tokexp_name, weights = a.model, "random (untrained)"
    held = [lm.lm_split(d)[1] for d in lm.LM_DOMAINS]
    texts = [held[i % 3][i // 3] for i in range(a.texts)]
    res = lm.benchmark_token_stats(model, tok, texts, batch_size=a.batch_size, reps=a.reps, extra=a.extra, impl=a.impl)
    res.update(weights=weights, torch_threads=torch.get_num_threads())
    s = res["seconds"]
    print(f"model {res['model']} ({weights}) on {res['device']}, {torch.get_num_threads()} threads: "
          f"{res['texts']} texts, {res['tokens']} tokens, batch {res['batch_size']}, median of {res['reps']}, impl {res['impl']}")
    print(f"  plain forward      {s['forward']*1e3:9.1f} ms  ({res['forward_tokens_per_second']:,.0f} tok/s)")
    print(f"  token_stats (all)  {s['token_stats']*1e3:9.1f} ms  ratio {res['overhead_ratio']:.3f}  (goal <= 1.15)")
    if a.extra:
        print(f"  + hidden           {s['token_stats_hidden']*1e3:9.1f} ms  ratio {res['overhead_ratio_hidden']:.3f}")
        print(f"  two models         {s['token_stats_two_models']*1e3:9.1f} ms  ratio {res['overhead_ratio_two_models']:.3f} (vs 2 forwards)")
    if a.json:
        with open(a.json, "w") as f: json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
