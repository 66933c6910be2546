"""Benchmark: a 32k byte-level BPE on ~10 MB of GCIDE + WordNet text, through `tokexp.toklab.train.train_tokenizer`
vs HF `tokenizers` directly (same trainer settings), side by side in one process; prints both times and the ratio.

    .venv/bin/python scripts/bench_toklab.py [--mb 10] [--vocab 32768] [--repeats 1]
"""
import argparse, json, sys, tempfile, time
from pathlib import Path


def direct(texts, vocab_size, min_frequency):
    "The same BPE as TokRecipe('bpe', vocab_size), built and saved with `tokenizers` only."
    from tokenizers import Tokenizer, models, trainers, decoders, pre_tokenizers
    from tokexp.toklab.train import TOKLAB_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(TOKLAB_SPECIALS),
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=tr, length=len(texts))
    out = Path(tempfile.mkdtemp(prefix="bench-direct-")) / "tokenizer.json"
    tok.save(str(out))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0, help="training text in MB (GCIDE first, then WordNet)")
    ap.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    ap.add_argument("--repeats", type=int, default=1, help="alternating repeats of each (the minimum is reported)")
    a = ap.parse_args(argv)
    from tokexp.toklab.train import TokRecipe, train_tokenizer, lab_corpus, take_bytes, n_bytes
    budget = int(a.mb * 1e6)
    texts = lab_corpus("gcide", "train")
    texts = take_bytes(texts + lab_corpus("wordnet", "train"), budget)
    print(f"corpus: {len(texts):,} records, {n_bytes(texts)/1e6:.2f} MB; vocab {a.vocab:,}", flush=True)
    recipe = TokRecipe("bpe", a.vocab)
    t_wrap, t_direct = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter(); p_d = direct(texts, a.vocab, recipe.min_frequency); t_direct.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter(); p_w = train_tokenizer(texts, recipe, cache_dir=cache); t_wrap.append(time.perf_counter() - t0)
            same = json.loads((p_w / "tokenizer.json").read_text())["model"] == json.loads(p_d.read_text())["model"]
    w, d = min(t_wrap), min(t_direct)
    print(f"tokenizers directly: {d:.2f} s   train_tokenizer: {w:.2f} s   ratio {w/d:.3f}x   identical model: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
