"""Calibrated evaluation (tokexp.evaluate): CI coverage on synthetic Gaussians, flags and errors (issue 6)."""
import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from tokexp.core import InputError
from tokexp.evaluate import (evaluate_scores, bootstrap_auroc, clopper_pearson, calibration_split, threshold_at_fpr,
                             roc_points, leaderboard, plot_roc)


def gauss(n_pos, n_neg, delta, seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
    return rng.normal(size=n_pos + n_neg) + delta * y, y


def test_auroc_ci_coverage():
    "The 95% bootstrap CI contains the true AUROC Φ(Δ/√2) in most of 60 independent draws."
    truth = norm.cdf(1.0 / np.sqrt(2))
    hits = 0
    for seed in range(60):
        s, y = gauss(150, 150, 1.0, seed)
        r = evaluate_scores(s, y, n_boot=500, seed=seed, fpr_targets=(0.05,))
        hits += r["auroc_ci"][0] <= truth <= r["auroc_ci"][1]
    assert hits >= 51, hits  # nominal 57/60; percentile bootstrap is a bit narrow at this n


def test_tpr_ci_coverage_at_chosen_threshold():
    "Held-out TPR/FPR Clopper-Pearson CIs contain the true rates at the calibrated threshold."
    hit_t = hit_f = 0
    for seed in range(40):
        s, y = gauss(400, 400, 1.5, 100 + seed)
        r = evaluate_scores(s, y, n_boot=100, seed=seed, fpr_targets=(0.05,))["tpr_at_fpr"]["0.05"]
        t = r["threshold"]
        true_tpr, true_fpr = 1 - norm.cdf(t - 1.5), 1 - norm.cdf(t)
        hit_t += r["tpr_ci"][0] <= true_tpr <= r["tpr_ci"][1]
        hit_f += r["fpr_ci"][0] <= true_fpr <= r["fpr_ci"][1]
    assert hit_t >= 35 and hit_f >= 35, (hit_t, hit_f)


def test_calibrated_fpr_near_target():
    s, y = gauss(2000, 2000, 2.0, 7)
    r = evaluate_scores(s, y, n_boot=100)
    for k, target in (("0.01", 0.01), ("0.05", 0.05)):
        v = r["tpr_at_fpr"][k]
        assert v["supported"]
        assert v["fpr"] <= target * 2 + 0.005
        assert v["fpr_ci"][0] <= target <= v["fpr_ci"][1] or v["fpr"] <= target


def test_bootstrap_matches_loop_reference():
    s, y = gauss(40, 60, 0.7, 3)
    s = np.round(s, 1)  # ties
    lo, hi, reps = bootstrap_auroc(s, y, n_boot=2000, seed=0)
    rng = np.random.default_rng(1)
    pos, neg = s[y == 1], s[y == 0]
    loop = []
    for _ in range(2000):
        p, n = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        loop.append(roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(n))], np.r_[p, n]))
    assert abs(np.mean(reps) - np.mean(loop)) < 0.01
    assert abs(np.std(reps) - np.std(loop)) < 0.01
    assert abs(lo - np.quantile(loop, 0.025)) < 0.02 and abs(hi - np.quantile(loop, 0.975)) < 0.02


def test_errors():
    with pytest.raises(InputError, match="single-class"): evaluate_scores([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(InputError, match="single-class"): evaluate_scores([0.1, 0.2], [1, 1])
    with pytest.raises(InputError, match="empty"): evaluate_scores([], [])
    with pytest.raises(InputError, match="NaN"): evaluate_scores([0.1, np.nan, 0.3], [0, 1, 1])
    with pytest.raises(InputError, match="different lengths"): evaluate_scores([0.1, 0.2], [0, 1, 1])
    with pytest.raises(InputError, match="calib_frac"): evaluate_scores([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], calib_frac=1.0)
    with pytest.raises(InputError, match="FPR targets"): evaluate_scores([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], fpr_targets=(0,))
    with pytest.raises(InputError, match="groups"): evaluate_scores([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], groups=["a"])


def test_unsupported_fpr_flag():
    s, y = gauss(100, 150, 1.0, 0)  # 75 calibration negatives: 1% unsupported, 5% supported
    r = evaluate_scores(s, y, n_boot=100)
    one, five = r["tpr_at_fpr"]["0.01"], r["tpr_at_fpr"]["0.05"]
    assert not one["supported"] and one["tpr"] is None and "75 calibration negatives < 100" in one["reason"]
    assert five["supported"] and 0 <= five["tpr"] <= 1
    assert any("unsupported" in w for w in r["warnings"])
    s, y = gauss(100, 200, 1.0, 0)  # exactly 100 calibration negatives
    assert evaluate_scores(s, y, n_boot=100)["tpr_at_fpr"]["0.01"]["supported"]


def test_unbalanced_reported_and_groups():
    s, y = gauss(500, 30, 1.0, 0)
    r = evaluate_scores(s, y, n_boot=100)
    assert any("unbalanced" in w for w in r["warnings"])
    g = np.array(["a"] * 265 + ["b"] * 265)
    r = evaluate_scores(s, y, groups=g, n_boot=100)
    assert r["groups"]["a"].get("error", "").startswith("labels are single-class")  # 'a' holds only positives
    assert "auroc" in r["groups"]["b"]


def test_split_and_threshold_helpers():
    y = np.r_[np.ones(11), np.zeros(21)].astype(int)
    g = np.array(["x", "y"] * 16)
    cal = calibration_split(y, 0.5, seed=3, groups=g)
    for c in (0, 1):
        for gg in ("x", "y"):
            m = (y == c) & (g == gg)
            assert abs(cal[m].sum() - m.sum() / 2) <= 0.5
    assert (calibration_split(y, 0.5, seed=3) == calibration_split(y, 0.5, seed=3)).all()
    neg = np.r_[np.zeros(50), np.ones(50)]  # ties: threshold never lets more than target through
    assert (neg > threshold_at_fpr(neg, 0.05)).mean() <= 0.05
    lo, hi = clopper_pearson(5, 10)
    assert lo < 0.5 < hi


def test_roc_plot_leaderboard():
    import matplotlib; matplotlib.use("Agg")
    s, y = gauss(300, 300, 1.0, 0)
    fpr, tpr, thr = roc_points(s, y)
    assert fpr[0] == 0 and tpr[-1] == 1
    res = {"a": evaluate_scores(s, y, n_boot=100), "b": evaluate_scores(-s, y, n_boot=100, higher_means_positive=False)}
    assert abs(res["a"]["auroc"] - res["b"]["auroc"]) < 1e-12
    plot_roc(res); plot_roc(res, low_fpr=True); plot_roc((fpr, tpr))
    small = evaluate_scores(s[:100], np.r_[np.ones(50), np.zeros(50)].astype(int), n_boot=100)
    lb = leaderboard([{"method": "a", "setting": "s", "result": res["a"]}, {"method": "b", "setting": "s", "result": small, "x": 1}])
    assert not lb.isna().any().any()
    assert list(lb.columns[:2]) == ["method", "setting"] and "TPR@1%FPR" in lb.columns and "TPR@5%FPR" in lb.columns
    assert lb.loc[lb.method == "b", "TPR@1%FPR"].item().startswith("n/a")
    with pytest.raises(InputError): leaderboard([{"method": "x"}])
