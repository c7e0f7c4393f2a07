"""The ablation's statistics and its teacher-only gate (`flowsteer_jax.digits.ablate`), on made-up results."""

import numpy as np
import pytest
from scipy import stats

from flowsteer_jax.digits import ablate


def _paired_runs(diffs: list[np.ndarray]) -> list[dict]:
    """Table 1 runs whose per-image paired differences (reference - row) are `diffs`, one array per seed."""
    out = []
    for d in diffs:
        d = np.asarray(d, np.float64)
        out.append({"accuracy": 0.5, "paired_n": float(d.size), "paired_mean": d.mean(), "paired_var": d.var(ddof=1)})
    return out


def test_pooled_paired_equals_the_concatenated_sample():
    rng = np.random.default_rng(0)
    diffs = [rng.integers(-1, 2, size=n).astype(float) for n in (50, 80, 65)]
    mean, se = ablate.pooled_paired(_paired_runs(diffs))
    all_d = np.concatenate(diffs)
    assert mean == pytest.approx(all_d.mean())
    assert se == pytest.approx(all_d.std(ddof=1) / np.sqrt(all_d.size))


def test_mean_std_and_p_values():
    a, b = [0.30, 0.32, 0.31, 0.29, 0.33], [0.25, 0.28, 0.26, 0.23, 0.28]
    assert ablate._mean_std(a) == f"0.310 ± {np.std(a, ddof=1):.3f}"  # the sample std, ddof = 1
    assert ablate.welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert ablate.paired_p(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert np.isnan(ablate.paired_p(a, [x - 0.05 for x in a]))  # the same difference on every seed: no spread
    assert ablate._noise_mark(a, b) == ""  # p ~ 1e-4: resolved
    close = [0.305, 0.335, 0.29, 0.32, 0.30]
    assert ablate.welch_p(a, close) >= 0.05 and ablate._noise_mark(a, close) == " ≈"
    assert ablate._noise_mark(a[:1], b[:1]) == ""  # one seed: nothing to test
    assert np.isnan(ablate.welch_p([1.0, 1.0], [1.0, 1.0]))
    assert ablate.gap_closed(0.35, 0.30, 0.40) == pytest.approx(0.5)


def _tables(drop: float, control: float, acc28: float, acc4: float, nocfg: float) -> tuple[dict, dict]:
    rng = np.random.default_rng(1)

    def diffs(p):  # reference - row per image: +1 with probability p over its -1 rate
        return [np.where(rng.random(1000) < 0.1 + p, 1.0, 0.0) - np.where(rng.random(1000) < 0.1, 1.0, 0.0)]

    t1 = {"trajectory": [{"accuracy": acc28}]}
    for t in ("0.900", "0.750", "0.500"):
        t1[f"interpolated_{t}"] = _paired_runs(diffs(drop))
        t1[f"coupled_{t}"] = _paired_runs(diffs(control))
    t2 = {
        "teacher_28_diffusers": [{"accuracy": acc28}],
        "teacher_4_diffusers": [{"accuracy": acc4 - 0.02}],
        "teacher_4_rectified": [{"accuracy": acc4}],
        "teacher_28_diffusers_nocfg": [{"accuracy": nocfg}],
    }
    return t1, t2


def test_gate_passes_only_when_every_criterion_holds():
    passing = ablate.gate(*_tables(drop=0.10, control=0.0, acc28=0.6, acc4=0.5, nocfg=0.4))
    assert [p for _, p, _ in passing] == [True] * 4, passing
    cases = [  # each breaks one criterion, in GATE's order
        dict(drop=0.0, control=0.0, acc28=0.6, acc4=0.5, nocfg=0.4),  # no drop from interpolated starts
        dict(drop=0.10, control=0.10, acc28=0.6, acc4=0.5, nocfg=0.4),  # the own-sample control drops too
        dict(drop=0.10, control=0.0, acc28=0.6, acc4=0.58, nocfg=0.4),  # 4 steps almost as good as 28
        dict(drop=0.10, control=0.0, acc28=0.6, acc4=0.5, nocfg=0.5),  # CFG adds only 10 points
    ]
    for broken, case in enumerate(cases):
        result = [p for _, p, _ in ablate.gate(*_tables(**case))]
        assert result == [i != broken for i in range(4)], (case, result)
    # without Table 2 (or Table 1's paired statistics) the gate cannot pass
    t1, _ = _tables(drop=0.10, control=0.0, acc28=0.6, acc4=0.5, nocfg=0.4)
    assert not all(p for _, p, _ in ablate.gate(t1, {}))
    assert not ablate.gate({"trajectory": [{"accuracy": 0.5}]}, {})[0][1]


def test_ablation_json_names_the_papers_rows():
    trained = {
        "perflow": [{"accuracy": 0.2, "mse_to_reference": 0.01, "step": 200}, {"accuracy": 0.3, "step": 200}],
        "full": [{"accuracy": 0.4, "mse_to_reference": 0.005, "label": "x"}],
        "k2": [{"accuracy": 0.25}],
    }
    out = ablate.ablation_json(trained)
    assert set(out) == {"PeRFlow", "full", "k2"}
    assert out["PeRFlow"]["accuracy"] == [0.2, 0.3] and out["PeRFlow"]["mse_teacher"] == [0.01, None]
    assert out["full"] == {"accuracy": [0.4], "mse_teacher": [0.005]}
