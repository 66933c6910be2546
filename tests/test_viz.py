"""tokexp.viz views rendered in headless Chromium: non-blank screenshots, one span per token, distinct bucket colours,
hover-card content in the DOM, escaped markup; limits; the watermark and stats numbers against direct computations."""
import re, shutil, subprocess
from html.parser import HTMLParser
import numpy as np, pytest, torch
from conftest import ROOT

from tokexp import viz
from tokexp.core import InputError
from tokexp.tokenizers import load_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
XSS = 'Plain <script>alert(1)</script> & <img src=x onerror="alert(2)"> text'

def chromium(tmp, *args):
    assert CHROMIUM, "chromium is required for the view tests (apt-get install chromium; .ci/run and `make env` install it)"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp}/profile", *args], capture_output=True, text=True, timeout=120)

class _Spans(HTMLParser):
    "Collects the tx-tok spans of a DOM dump: per view, background colour and hover-card text of each token."
    def __init__(self):
        super().__init__(); self.views, self.stack, self.card, self.scripts, self.imgs = [], [], None, 0, 0
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script": self.scripts += 1
        if tag == "img": self.imgs += 1
        cls = a.get("class", "") or ""
        if tag == "div" and "tx-view" in cls.split(): self.views.append({"name": a.get("data-view"), "toks": []})
        if tag == "span" and "tx-tok" in cls.split():
            bg = re.search(r"background:\s*(#[0-9a-f]{6})", a.get("style", ""))
            self.views[-1]["toks"].append({"bg": bg.group(1) if bg else None, "card": ""})
        if tag == "span" and "tx-card" in cls.split() and self.views and self.views[-1]["toks"]: self.card = self.views[-1]["toks"][-1]
        self.stack.append(tag)
    def handle_endtag(self, tag):
        if self.stack: self.stack.pop()
        if tag == "span" and self.card is not None: self.card = None
    def handle_data(self, d):
        if self.card is not None: self.card["card"] += d

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tokexp.lm import TINY, toy_corpus, train_lm, load_lm
    return load_lm(train_lm(TINY, corpus=toy_corpus(), cache_dir=tmp_path_factory.mktemp("lm"), progress=False), device="cpu")

@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_lm):
    "One page with every view, saved with View.save, dumped and screenshotted by Chromium."
    from tokexp.watermark import KGW
    from tokexp.prune.policies import make_policy
    from tokexp.prune.encoder import PrunedEncoder, ToMeMerge, DivPrune
    tmp = tmp_path_factory.mktemp("viz")
    model, tok = tiny_lm
    text = "the old man sees the moon at night. a small bird finds the letter again."
    views = {
        "tokens": viz.show_tokens("Token boundaries: مرحبا بالعالم, שלום, cafe\u0301 ñ, 世界 😀 " + XSS, "gpt2", "llama-2", "bert-minilm"),
        "gltr": viz.show_stats(model, tok, text, "gltr"),
        "surprisal": viz.show_stats(model, tok, text, "surprisal"),
        "watermark": viz.show_watermark(KGW(), tok, tok(text, add_special_tokens=False)["input_ids"]),
        "kv": viz.show_kv(model, tok, text[:36], make_policy("h2o", budget=0.5, sinks=1, recent=2)),
        "encoder": viz.show_encoder_pruning(PrunedEncoder.from_pretrained(), "a quick brown fox jumps over the lazy dog",
                                            {"ToMe": ToMeMerge(keep=0.5), "DivPrune": DivPrune(keep=0.5)}),
        "compare": viz.compare_tokenizers("Internationalization 東京 naïveté", "gpt2", "cl100k_base"),
    }
    path = viz.Views(list(views.values()), title="all views").save(tmp/"views.html")
    dom = chromium(tmp, "--dump-dom", f"file://{path}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    p = _Spans(); p.feed(dom.stdout)
    return tmp, path, views, dom.stdout, p

def test_screenshot_not_blank(page):
    tmp, path, *_ = page
    shot = tmp/"views.png"
    r = chromium(tmp, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{path}")
    assert shot.exists(), r.stderr[-2000:]
    import matplotlib.image as mpimg
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[0] > 100 and float(np.std(img)) > 0.02, "screenshot is blank"

def test_one_span_per_token(page):
    tmp, path, views, dom, p = page
    assert [v["name"] for v in p.views[1:]] == ["tokens", "stats", "stats", "watermark", "kv", "encoder", "compare"]
    tv = views["tokens"]
    expected = [len(load_tokenizer(n).encode(tv.text)) for n in ("gpt2", "llama-2", "bert-minilm")]
    assert len(p.views[1]["toks"]) == sum(expected)
    s = views["gltr"].ms.stats
    assert len(p.views[2]["toks"]) == int(s.mask.sum())
    enc = views["encoder"]
    assert len(p.views[6]["toks"]) == len(enc.rows) * len(enc.pieces)

def test_bucket_colours_differ(page, tiny_lm):
    tmp, path, views, dom, p = page
    ms = views["gltr"].ms
    buckets = ms.values("gltr").astype(int)
    cols = [t["bg"] for t in p.views[2]["toks"]]
    by = {}
    for b, c in zip(buckets, cols): by.setdefault(b, set()).add(c)
    assert len(by) >= 2, f"the tiny model's ranks fall in one bucket only: {sorted(by)}"
    assert all(len(c) == 1 for c in by.values()) and len(set.union(*by.values())) == len(by)  # one colour per bucket, all different
    assert {c for s in by.values() for c in s} <= set(viz.GLTR_COLOURS)
    # the surprisal ramp gives more surprising tokens stronger red (lower green channel)
    sv = views["surprisal"].ms.values("surprisal")
    g = [int(t["bg"][3:5], 16) for t in p.views[3]["toks"]]
    assert np.corrcoef(sv, g)[0, 1] < -0.9

def test_hover_cards_in_dom(page):
    tmp, path, views, dom, p = page
    t0 = p.views[1]["toks"][0]
    assert "id:" in t0["card"] and "bytes:" in t0["card"] and "token:" in t0["card"]
    ms = views["gltr"].ms
    c = p.views[2]["toks"][0]["card"]
    assert "top-k:" in c and "rank:" in c and repr(ms.top_tokens[0][0]) in c
    assert "running z:" in p.views[4]["toks"][-1]["card"]
    assert "layer 0:" in p.views[5]["toks"][0]["card"]
    assert '.tx-tok:hover>.tx-card{display:block}' in path.read_text()

def test_markup_in_text_is_escaped(page):
    import html as H
    tmp, path, views, dom, p = page
    assert p.scripts == 0 and p.imgs == 0, "markup in the text became elements"
    assert "<script" not in views["tokens"].html() and "<img" not in views["tokens"].html()
    body = viz.show_tokens(XSS, "gpt2").body()
    shown = re.sub(r"<[^>]+>", "", re.sub(r'<span class="tx-card">[^<]*</span>', "", body.split("</div>", 1)[1]))
    assert H.unescape(shown).replace("·", " ") == XSS  # the text reads back as its characters

def test_limits(tiny_lm):
    model, tok = tiny_lm
    from tokexp.prune.policies import make_policy
    with pytest.raises(InputError, match="context is 32"): viz.show_kv(model, tok, "the cat " * 40, make_policy("h2o"))
    long = "word " * 3000
    n = len(load_tokenizer("gpt2").encode(long))
    v = viz.show_tokens(long, "gpt2", max_tokens=1000)
    assert f"Showing the first 1,000 of {n:,} tokens" in v.html() and v.html().count('class="tx-tok') == 1000
    with pytest.raises(InputError, match="max_tokens=1000"): viz.show_tokens(long, "gpt2", max_tokens=1000, truncate=False)

def test_uncertainty_scores_direct(tiny_lm):
    import scipy.stats
    model, tok = tiny_lm
    text = "a dog likes the last train today."
    ms = viz.model_stats(model, tok, text)
    x = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad(): pr = torch.softmax(model(x).logits[0, :-1].double(), -1).numpy()
    pt = pr[np.arange(len(pr)), x[0, 1:].numpy()]
    sc = ms.scores()
    assert sc["geometric_mean_p"] == pytest.approx(np.exp(np.log(pt).mean()), rel=1e-4)
    assert sc["arithmetic_mean_p"] == pytest.approx(pt.mean(), rel=1e-4)
    assert sc["mean_kurtosis"] == pytest.approx(np.mean([scipy.stats.kurtosis(r) for r in pr]), rel=1e-4)
    top = np.argsort(-pr, 1)[:, :5]
    assert (ms.top_ids == top).mean() > 0.95  # ties aside, the hover card's alternatives are the model's top 5

def test_watermark_running_test_direct(tiny_lm):
    from tokexp.watermark import KGW, detect, context_hash, token_uniform
    model, tok = tiny_lm
    ids = tok("the cat sees the moon. the cat sees the moon. a dog follows the letter.", add_special_tokens=False)["input_ids"]
    wm = KGW(gamma=0.25)
    a = viz.watermark_tokens(wm, ids)
    seen, G, n = set(), 0, 0
    for t in range(1, len(ids)):  # the first token has no context: not scored
        u = token_uniform(context_hash(wm.key, np.array([ids[t - 1]])), ids[t])
        if (ids[t - 1], ids[t]) in seen: assert not a["scored"][t]; continue
        seen.add((ids[t - 1], ids[t])); n += 1; G += int(u < wm.gamma)
        assert a["scored"][t] and a["stat"][t] == float(u < wm.gamma)
        assert a["z"][t] == pytest.approx((G - 0.25 * n) / np.sqrt(n * 0.25 * 0.75))
    assert not a["scored"][0]
    assert a["p_value"][-1] == pytest.approx(detect(wm, [ids])["p_value"][0])


def test_classify_kept_ignores_adakv_padding():
    "AdaKV's ragged heads are padded with -1: a padded slot must not mark the last position as kept."
    import numpy as np
    from tokexp.viz import classify_kept
    c = classify_kept(np.array([[0, 2, 5], [1, 3, -1]]), 6)
    assert c[0].tolist() == [1, 0, 1, 0, 0, 1] and c[1].tolist() == [0, 1, 0, 1, 0, 0]
