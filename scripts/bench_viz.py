#!/usr/bin/env python
"""Render benchmark of `tokexp.viz` on a 10k-token text: time to place the tokens, to write the HTML, the page size, and
for the model view the statistics pass separately from the rendering. Prints the numbers (not a timed test).

    python scripts/bench_viz.py [--tokens 10000] [--model ref-small] [--reps 3] [--json OUT]

The text is English fortunes (cached asset) joined until the GPT-2 tokenizer gives `--tokens` tokens. `--model` takes a
reference-LM name (trained on first use, cached) or a model folder; `--model none` skips the model views.
"""
import argparse, json, statistics, time


def timed(fn, reps):
    "(median seconds, last result) of `reps` calls."
    ts, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter(); out = fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--model", default="ref-small")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    from tokexp import viz
    from tokexp.assets import read_domain
    from tokexp.tokenizers import load_tokenizer
    gpt2 = load_tokenizer("gpt2")
    recs, text = read_domain("fortunes"), ""
    for r in recs:
        text += r + "\n"
        if len(text) > 6 * a.tokens and len(gpt2.encode(text)) >= a.tokens: break
    ids = gpt2.encode(text)[:a.tokens]
    text = gpt2.decode(ids)
    res = {"tokens": len(gpt2.encode(text)), "chars": len(text)}
    gpt2.all_token_bytes(); viz.token_pieces("warm up", gpt2)
    res["pieces_s"], ps = timed(lambda: viz.token_pieces(text, gpt2), a.reps)
    res["token_view_build_s"], tv = timed(lambda: viz.show_tokens(text, gpt2), a.reps)
    res["token_view_html_s"], h = timed(tv.html, a.reps)
    res["token_view_html_mb"] = len(h.encode()) / 1e6
    res["token_view_3_tokenizers_s"], tv3 = timed(lambda: viz.show_tokens(text, gpt2, "cl100k_base", "llama-2").html(), 1)
    long = text * 3
    res["over_limit_truncate_s"], tl = timed(lambda: viz.show_tokens(long, gpt2).html(), 1)
    res["over_limit_tokens"] = len(gpt2.encode(long))
    res["over_limit_message"] = next(n for name, _, _, n in viz.show_tokens(long, gpt2).rows) == viz.MAX_TOKENS
    from tokexp.watermark import KGW
    res["watermark_view_s"], wv = timed(lambda: viz.show_watermark(KGW(), gpt2, ids).html(), 1)
    if a.model != "none":
        import torch
        from tokexp.lm import load_lm, train_lm, LMS
        path = train_lm(a.model, progress=False) if a.model in LMS else a.model
        model, tok = load_lm(path, device="cpu")
        t0 = time.perf_counter()
        ms = viz.model_stats(model, tok, text)
        res["model_stats_s"] = time.perf_counter() - t0
        res["model_tokens"] = int(ms.stats.mask.sum())
        res["stats_view_html_s"], sh = timed(lambda: viz.StatsView(ms, "gltr").html(), a.reps)
        res["stats_view_html_mb"] = len(sh.encode()) / 1e6
    for k, v in res.items(): print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if a.json:
        with open(a.json, "w") as f: json.dump(res, f, indent=2)
    return res


if __name__ == "__main__": main()
