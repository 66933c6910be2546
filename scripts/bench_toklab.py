"""Benchmark: a 32k byte-level BPE on ~10 MB of GCIDE + WordNet text, through `tokexp.toklab.train.train_tokenizer`
vs HF `tokenizers` directly (same trainer settings), side by side in one process; prints both times and the ratio.

    .venv/bin/python scripts/bench_toklab.py [--mb 10] [--vocab 32768] [--repeats 1]
"""
import argparse, json, statistics, sys, tempfile, time
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
    ap.add_argument("--repeats", type=int, default=2, help="repeats of each, in ABBA order (medians are reported)")
    a = ap.parse_args(argv)
    from tokexp.toklab.train import TokRecipe, train_tokenizer, lab_corpus, take_bytes, n_bytes
    budget = int(a.mb * 1e6)
    texts = lab_corpus("gcide", "train")
    texts = take_bytes(texts + lab_corpus("wordnet", "train"), budget)
    print(f"corpus: {len(texts):,} records, {n_bytes(texts)/1e6:.2f} MB; vocab {a.vocab:,}", flush=True)
    recipe = TokRecipe("bpe", a.vocab)
    t_wrap, t_direct, same = [], [], True
    def run_direct():
        t0 = time.perf_counter(); p = direct(texts, a.vocab, recipe.min_frequency); t_direct.append(time.perf_counter() - t0)
        return json.loads(p.read_text())["model"]
    def run_wrapped():
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter(); p = train_tokenizer(texts, recipe, cache_dir=cache); t_wrap.append(time.perf_counter() - t0)
            return json.loads((p / "tokenizer.json").read_text())["model"]
    for i in range(a.repeats):  # ABBA order: a load change on a shared machine hits both sides alike
        first, second = (run_direct, run_wrapped) if i % 2 == 0 else (run_wrapped, run_direct)
        m1, m2 = first(), second()
        same = same and m1 == m2
        print(f"  repeat {i + 1}: direct {t_direct[-1]:.2f} s, train_tokenizer {t_wrap[-1]:.2f} s", flush=True)
    w, d = statistics.median(t_wrap), statistics.median(t_direct)
    print(f"tokenizers directly: {d:.2f} s   train_tokenizer: {w:.2f} s   ratio {w/d:.3f}x (medians of {a.repeats})   identical model: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
