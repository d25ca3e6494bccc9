"""Equivalent size, fitted (issue 20): held-out NLL against size, and where RoE-K lands on that curve.

Shapes: M members, N windows, K RoE points, R bootstrap resamples, G points of a curve's grid.

Two curves of mean NLL y against a size x (total or active parameters), fitted by least squares
on the M member means:

- ``log-linear``: y = a + b log x. Two parameters; over the family's range (less than one
  decade of x) it is the local form of any smooth scaling law.
- ``power-law``: y = E + A x^-alpha (Kaplan/Chinchilla's saturating form in one variable),
  fitted by profiling alpha over a grid (for a fixed alpha the fit is linear in E and A).
  Three parameters on M points: E and alpha are weakly identified from a short range.

The curve used for the equivalent sizes is the one with the lower AICc on the members (AICc =
M log(RSS/M) + 2p + 2p(p+1)/(M-p-1), p curve parameters): with 5 members the power law pays
+30 against the line's +10 and is chosen only when its curvature is unmistakable; with 4 it
cannot be chosen. Both curves' numbers are reported.

Equivalent size of an NLL value y: the size at which the fitted curve reaches y (x = f^-1(y));
a point outside the measured sizes is flagged as extrapolation, and a power law that never
reaches y (y below its asymptote E) gives infinity. Uncertainty: a bootstrap over windows. Each
resample draws N windows with replacement, the *same* windows for every member and every RoE
point (they were all scored on the same windows, so the differences that matter stay paired),
recomputes every mean, refits the curve and inverts it; intervals are the 2.5 and 97.5
percentiles. The windows are consecutive stretches of text, treated as independent; training
noise between members (another seed would give another curve) is not in these intervals.

This module reads the per-window units written by ``equivalent_size_measure`` and knows
nothing about models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ALPHAS = np.geomspace(0.01, 3.0, 240)  # the power law's exponent grid (profiled)


# -- curves -------------------------------------------------------------------------------------
# Each curve works on R rows at once: fit(u_M, y_RM) -> theta_R*, predict(theta, u_G) -> y_RG,
# inverse(theta, y_RP) -> u_RP, with u = log(x / x_ref).


class LogLinear:
    name = "log-linear"
    n_params = 2
    labels = ("a", "b")

    @staticmethod
    def fit(u_M: np.ndarray, y_RM: np.ndarray) -> np.ndarray:
        du_M = u_M - u_M.mean()
        b_R = (y_RM - y_RM.mean(axis=1, keepdims=True)) @ du_M / (du_M @ du_M)
        a_R = y_RM.mean(axis=1) - b_R * u_M.mean()
        return np.stack([a_R, b_R], axis=1)

    @staticmethod
    def predict(theta_R2: np.ndarray, u_G: np.ndarray) -> np.ndarray:
        return theta_R2[:, :1] + theta_R2[:, 1:] * u_G[None, :]

    @staticmethod
    def inverse(theta_R2: np.ndarray, y_RP: np.ndarray) -> np.ndarray:
        """u where the line reaches y; NaN where the fitted NLL does not fall with size (b >= 0)."""
        a_R1, b_R1 = theta_R2[:, :1], theta_R2[:, 1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b_R1 < 0, (y_RP - a_R1) / b_R1, np.nan)


class PowerLaw:
    name = "power-law"
    n_params = 3
    labels = ("E", "A", "alpha")

    @staticmethod
    def fit(u_M: np.ndarray, y_RM: np.ndarray) -> np.ndarray:
        """Least squares over (E, A) for each alpha of ALPHAS, then the alpha of least RSS, per row."""
        z_GM = np.exp(-ALPHAS[:, None] * u_M[None, :])  # (x / x_ref)^-alpha
        dz_GM = z_GM - z_GM.mean(axis=1, keepdims=True)
        yc_RM = y_RM - y_RM.mean(axis=1, keepdims=True)
        A_RG = yc_RM @ dz_GM.T / (dz_GM * dz_GM).sum(axis=1)
        E_RG = y_RM.mean(axis=1, keepdims=True) - A_RG * z_GM.mean(axis=1)
        rss_RG = ((y_RM[:, None, :] - E_RG[..., None] - A_RG[..., None] * z_GM[None]) ** 2).sum(axis=2)
        rss_RG = np.where(A_RG > 0, rss_RG, np.inf)  # a decreasing curve only
        best_R = rss_RG.argmin(axis=1)
        rows = np.arange(len(y_RM))
        return np.stack([E_RG[rows, best_R], A_RG[rows, best_R], ALPHAS[best_R]], axis=1)

    @staticmethod
    def predict(theta_R3: np.ndarray, u_G: np.ndarray) -> np.ndarray:
        E, A, alpha = (theta_R3[:, i : i + 1] for i in range(3))
        return E + A * np.exp(-alpha * u_G[None, :])

    @staticmethod
    def inverse(theta_R3: np.ndarray, y_RP: np.ndarray) -> np.ndarray:
        """u where the curve reaches y; +inf at or below the asymptote E (never reached)."""
        E, A, alpha = (theta_R3[:, i : i + 1] for i in range(3))
        with np.errstate(divide="ignore", invalid="ignore"):
            u = -np.log((y_RP - E) / A) / alpha
        return np.where(y_RP > E, u, np.inf)


CURVES = {c.name: c for c in (LogLinear, PowerLaw)}


def aicc(rss: float, n: int, p: int) -> float:
    """Small-sample Akaike criterion of a least-squares fit; +inf when n <= p + 1 (no correction possible)."""
    if n <= p + 1:
        return math.inf
    return n * math.log(max(rss, 1e-300) / n) + 2 * p + 2 * p * (p + 1) / (n - p - 1)


# -- bootstrap ----------------------------------------------------------------------------------

def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """[R, N] weights of a bootstrap over windows (counts / N): one draw of windows shared by every series."""
    rng = np.random.default_rng(seed)
    idx_RN = rng.integers(0, n, size=(resamples, n))
    counts_RN = np.zeros((resamples, n))
    np.add.at(counts_RN, (np.arange(resamples)[:, None], idx_RN), 1.0)
    return counts_RN / n


@dataclass(frozen=True, kw_only=True)
class Series:
    """Per-window NLLs of the members [M, N] and of the RoE points [K, N], all on the same N windows."""

    members: list[str]
    steps: dict[str, int] | None = None  # member -> the training step of its checkpoint
    sizes: dict[str, np.ndarray]  # axis name -> [M] sizes (params, active_params)
    nll_MN: np.ndarray
    roe_ks: list[int]
    roe_KN: np.ndarray
    one_x: str  # the member RoE runs on
    # fine-tuned versions of the 1x (RoE-aware training and its control) -> their NLLs [K, N] at roe_ks
    variants: dict[str, np.ndarray] = field(default_factory=dict)
    # a second training run of a member (another seed) -> its NLLs [N] at K = 1: the family's training noise
    replicates: dict[str, np.ndarray] = field(default_factory=dict)


def interval(values: np.ndarray) -> list[float]:
    """95% percentile interval of finite-or-infinite values, NaN (undefined) rows left out."""
    kept = values[~np.isnan(values)]
    if not len(kept):
        return [math.nan, math.nan]
    method = "linear" if np.isfinite(kept).all() else "nearest"  # no interpolating between infinities
    return [float(np.percentile(kept, q, method=method)) for q in (2.5, 97.5)]


def fit_axis(series: Series, axis: str, resamples: int = 2000, seed: int = 0) -> dict:
    """Both curves on one size axis, the chosen one, and every RoE point's equivalent size with its interval."""
    x_M = series.sizes[axis].astype(float)
    x_ref = float(x_M[series.members.index(series.one_x)])
    u_M = np.log(x_M / x_ref)
    w_RN = resample_weights(series.nll_MN.shape[1], resamples, seed)
    y_M, y_RM = series.nll_MN.mean(axis=1), w_RN @ series.nll_MN.T
    roe_K, roe_RK = series.roe_KN.mean(axis=1), w_RN @ series.roe_KN.T
    curves, scores = {}, {}
    for curve in CURVES.values():
        theta, theta_RP = curve.fit(u_M, y_M[None]), curve.fit(u_M, y_RM)
        rss = float(((curve.predict(theta, u_M)[0] - y_M) ** 2).sum())
        scores[curve.name] = aicc(rss, len(y_M), curve.n_params)
        curves[curve.name] = place(curve, theta, theta_RP, u_M, y_M, roe_K, roe_RK, series, x_ref)
        curves[curve.name]["rss"] = rss
        curves[curve.name]["variants"] = {  # the same resamples of windows: paired with the family and RoE
            name: equivalents(curve, theta, theta_RP, nll_KN.mean(axis=1), w_RN @ nll_KN.T, series.roe_ks, x_ref,
                              curves[curve.name]["measured_range"])
            for name, nll_KN in series.variants.items()}
        curves[curve.name]["replicates"] = {
            member: replicate_ratio(curve, theta, theta_RP, series.nll_MN[series.members.index(member)], again_N,
                                    w_RN, x_ref)
            for member, again_N in series.replicates.items()}
        if curve is PowerLaw:  # an exponent at the end of its grid: the data do not pin it down
            curves[curve.name]["alpha_at_grid_edge"] = bool(theta[0, 2] in (ALPHAS[0], ALPHAS[-1]))
    chosen = min(scores, key=lambda name: (scores[name], CURVES[name].n_params))
    return {"x_ref": x_ref, "chosen": chosen, "aicc": scores, "curves": curves, "resamples": resamples, "seed": seed}


def place(curve, theta_1P, theta_RP, u_M, y_M, roe_K, roe_RK, series: Series, x_ref: float) -> dict:
    """A curve's parameters with intervals, residuals, a band, and each RoE point's equivalent size."""
    lo, hi = float(np.exp(u_M.min()) * x_ref), float(np.exp(u_M.max()) * x_ref)
    points = equivalents(curve, theta_1P, theta_RP, roe_K, roe_RK, series.roe_ks, x_ref, (lo, hi))
    top = max([hi] + [p["equivalent"] for p in points if math.isfinite(p["equivalent"])])
    u_G = np.linspace(math.log(lo / x_ref), math.log(min(top, 20 * hi) / x_ref), 60)
    band_RG = curve.predict(theta_RP, u_G)
    return {"params": dict(zip(curve.labels, map(float, theta_1P[0]))),
            "params_ci95": {label: interval(theta_RP[:, i]) for i, label in enumerate(curve.labels)},
            "residuals": [float(r) for r in y_M - curve.predict(theta_1P, u_M)[0]],
            "band": {"x": [float(v) for v in np.exp(u_G) * x_ref],
                     "mid": [float(v) for v in curve.predict(theta_1P, u_G)[0]],
                     "lo": [float(v) for v in np.percentile(band_RG, 2.5, axis=0)],
                     "hi": [float(v) for v in np.percentile(band_RG, 97.5, axis=0)]},
            "measured_range": [lo, hi], "points": points}


def equivalents(curve, theta_1P, theta_RP, nll_K, nll_RK, ks: list[int], x_ref: float, measured) -> list[dict]:
    """Each point's equivalent size on the curve, its interval, its ratio to the 1x and to the same model's K = 1."""
    lo, hi = measured
    k1 = ks.index(1) if 1 in ks else None
    eq_1K = np.exp(curve.inverse(theta_1P, nll_K[None])) * x_ref
    eq_RK = np.exp(curve.inverse(theta_RP, nll_RK)) * x_ref
    points = []
    for j, K in enumerate(ks):
        eq, ci = float(eq_1K[0, j]), interval(eq_RK[:, j])
        with np.errstate(divide="ignore", invalid="ignore"):  # a curve that never reaches a value: inf / inf
            on_curve = eq_RK[:, j] / eq_RK[:, k1] if k1 is not None else np.full(len(eq_RK), np.nan)
            on_curve_1 = float(np.float64(eq) / eq_1K[0, k1]) if k1 is not None else None
        points.append({"K": K, "nll": float(nll_K[j]), "equivalent": eq, "ci95": ci,
                       "ratio_to_1x": eq / x_ref, "ratio_to_1x_ci95": [c / x_ref for c in ci],
                       "ratio_on_curve": on_curve_1,
                       "ratio_on_curve_ci95": interval(on_curve),
                       "undefined_resamples": int(np.isnan(eq_RK[:, j]).sum()),
                       "extrapolated": None if math.isnan(eq) else not lo <= eq <= hi,
                       "ci_within_measured": bool(lo <= ci[0] and ci[1] <= hi)})
    return points


def replicate_ratio(curve, theta_1P, theta_RP, first_N, again_N, w_RN, x_ref: float) -> dict:
    """Where a second training run of a member lands on the curve against the first: the ratio of their
    equivalent sizes, with its interval over the same window resamples (training noise, in the units of RoE's
    equivalent size)."""
    nll_2 = np.array([first_N.mean(), again_N.mean()])
    eq_12 = np.exp(curve.inverse(theta_1P, nll_2[None])) * x_ref
    eq_R2 = np.exp(curve.inverse(theta_RP, w_RN @ np.stack([first_N, again_N]).T)) * x_ref
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"equivalent_first": float(eq_12[0, 0]), "equivalent_again": float(eq_12[0, 1]),
                "ratio": float(eq_12[0, 1] / eq_12[0, 0]), "ratio_ci95": interval(eq_R2[:, 1] / eq_R2[:, 0])}


def summary_rows(series: Series) -> dict:
    """Mean NLL and its SE sd/sqrt(N) for every member; for RoE also the paired change against K = 1."""
    n = series.nll_MN.shape[1]
    se = lambda v: float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan  # noqa: E731
    base = series.nll_MN[series.members.index(series.one_x)]
    steps = series.steps or {}
    members = [{"member": m, "step": steps.get(m), **{axis: int(size[i]) for axis, size in series.sizes.items()},
                "nll": float(series.nll_MN[i].mean()), "se": se(series.nll_MN[i])}
               for i, m in enumerate(series.members)]
    roe = [{"K": K, "nll": float(series.roe_KN[j].mean()), "se": se(series.roe_KN[j]),
            "delta_vs_K1": float((series.roe_KN[j] - base).mean()), "delta_se": se(series.roe_KN[j] - base)}
           for j, K in enumerate(series.roe_ks)]
    k1 = series.roe_ks.index(1)
    variants = {}
    for name, nll_KN in series.variants.items():
        rows = []
        for j, K in enumerate(series.roe_ks):
            gain, base_gain = nll_KN[j] - nll_KN[k1], series.roe_KN[j] - series.roe_KN[k1]
            rows.append({"K": K, "nll": float(nll_KN[j].mean()), "se": se(nll_KN[j]),
                         # against the 1x before fine-tuning at K = 1; RoE's gain on this model; how that gain
                         # differs from RoE's gain on the 1x (all paired over the same windows)
                         "delta_vs_1x_K1": float((nll_KN[j] - base).mean()), "delta_vs_1x_K1_se": se(nll_KN[j] - base),
                         "delta_vs_K1": float(gain.mean()), "delta_se": se(gain),
                         "gain_change": float((gain - base_gain).mean()), "gain_change_se": se(gain - base_gain)})
        variants[name] = rows
    replicates = {}
    for member, again_N in series.replicates.items():
        change_N = again_N - series.nll_MN[series.members.index(member)]
        replicates[member] = {"nll": float(again_N.mean()), "se": se(again_N),
                              "delta_vs_first": float(change_N.mean()), "delta_se": se(change_N)}
    return {"windows": n, "members": members, "roe": roe, "variants": variants, "replicates": replicates}


# -- from the measured units to fit.json and the report -----------------------------------------

AXES = ("params", "active_params")
TEXTS = ("test", "unseen")
PAPER = {"K": 32, "ratio_to_1x": 1.5, "source": "arXiv 2509.17238: a 7B MoE with RoE matches a 10.5B MoE"}


def load_series(results, members: list[str], one_x: str, ks: list[int], text: str,
                variants: dict | None = None, replicates: dict | None = None) -> Series:
    """The paired per-window NLLs of one text; refuses missing members or K, and units scored on other windows.

    ``variants``: name -> the results folder of a fine-tuned 1x (``evaluate --results DIR`` of its run),
    scored at the same K on the same windows. ``replicates``: member -> the results folder of a second training
    run of it (another seed), scored at K = 1 on the same windows.
    """
    from benchmarks.equivalent_size_measure import read_unit

    if one_x not in members:
        raise SystemExit(f"the 1x member {one_x} must be among the fitted members {members}")
    ks = sorted(ks)
    units = {(m, 1): read_unit(results, m, text, 1) for m in members}
    units |= {(one_x, K): read_unit(results, one_x, text, K) for K in ks}
    extra = {(name, K): read_unit(folder, one_x, text, K) for name, folder in (variants or {}).items() for K in ks}
    again = {m: read_unit(folder, m, text, 1) for m, folder in (replicates or {}).items()}
    missing = [f"{m} K={K}" for (m, K), unit in units.items() if unit is None]
    missing += [f"{name}: {one_x} K={K} in {variants[name]}" for (name, K), unit in extra.items() if unit is None]
    missing += [f"a second run of {m}: {m} K=1 in {replicates[m]}" for m, unit in again.items() if unit is None]
    missing += [f"a second run of {m}, which is not fitted" for m in again if m not in members]
    if missing:
        raise SystemExit(f"no finished {text} evaluation of {missing} in {results}: run `equivalent_size.py "
                         "evaluate` for them (or fit fewer with --members)")
    prints = {unit["meta"]["fingerprint"] for unit in (*units.values(), *extra.values(), *again.values())}
    if len(prints) > 1:
        raise SystemExit(f"the {text} units were scored on different windows ({sorted(prints)}): not paired; "
                         "rescore them with one set of evaluate options")
    steps = {(m, K): unit["meta"]["step"] for (m, K), unit in (units | extra).items()}
    for who in (one_x, *(variants or {})):
        if len({steps[(who, K)] for K in ks}) > 1:
            raise SystemExit(f"the {who} units come from different checkpoints ({steps}): rescore them")
    sizes = {axis: np.array([units[(m, 1)]["meta"][axis] for m in members]) for axis in AXES}
    return Series(members=members, steps={m: steps[(m, 1)] for m in members}, sizes=sizes,
                  nll_MN=np.array([units[(m, 1)]["nll"] for m in members]), roe_ks=ks,
                  roe_KN=np.array([units[(one_x, K)]["nll"] for K in ks]), one_x=one_x,
                  variants={name: np.array([extra[(name, K)]["nll"] for K in ks]) for name in variants or {}},
                  replicates={m: np.array(unit["nll"]) for m, unit in again.items()})


def fit_all(results, members: list[str], one_x: str, ks: list[int], resamples: int = 2000, seed: int = 0,
            variants: dict | None = None, replicates: dict | None = None) -> dict:
    """fit.json: per text, the member and RoE means and, per size axis, both curves and the equivalent sizes
    (also of each fine-tuned 1x in ``variants``: name -> its results folder; and of a second training run of a
    member in ``replicates``: member -> its results folder)."""
    if len(members) < 3:
        raise SystemExit(f"a curve with uncertainty needs at least 3 members, got {members}")
    out = {"members": members, "one_x": one_x, "ks": sorted(ks), "variants": sorted(variants or {}),
           "replicates": sorted(replicates or {}), "texts": {}}
    for text in TEXTS:
        series = load_series(results, members, one_x, ks, text, variants, replicates)
        out["texts"][text] = {**summary_rows(series),
                              "axes": {axis: fit_axis(series, axis, resamples, seed) for axis in AXES}}
    return out


def placed(axes: dict, *path) -> dict:
    """Per size axis, the chosen curve's name and the placement found under ``path`` in that curve's fit."""
    placements = {}
    for axis in AXES:
        entry = axes[axis]["curves"][axes[axis]["chosen"]]
        for key in path:
            entry = entry[key]
        placements[axis] = {"curve": axes[axis]["chosen"], **entry}
    return placements


def report(fit: dict, latency: dict | None) -> dict:
    """The one JSON of the result: the family (sizes, NLL with SE, step times) and the RoE points placed on it."""
    test, one_x = fit["texts"]["test"], fit["one_x"]
    timed = (latency or {}).get("configs", {})
    batches = (latency or {}).get("conditions", {}).get("batches", [1, 8])

    def step(member: str, K: int) -> dict:
        rows = {f"step_ms_b{b}": timed.get(f"{member} K={K} B={b}") for b in batches}
        return {k: None if v is None else {"median": v["step_ms"], "ci95": v["ci95_ms"]} for k, v in rows.items()}

    family = []
    for i, row in enumerate(test["members"]):
        unseen = fit["texts"]["unseen"]["members"][i]
        family.append({**{k: v for k, v in row.items() if k not in ("nll", "se")}, "nll_test": row["nll"],
                       "se_test": row["se"], "nll_unseen": unseen["nll"], "se_unseen": unseen["se"],
                       **step(row["member"], 1)})
    roe = []
    for j, row in enumerate(test["roe"]):
        point = {"K": row["K"], "member": one_x}
        for text in TEXTS:
            summary, axes = fit["texts"][text]["roe"][j], fit["texts"][text]["axes"]
            point[text] = {**{k: summary[k] for k in ("nll", "se", "delta_vs_K1", "delta_se")},
                           **placed(axes, "points", j)}
        roe.append({**point, **step(one_x, row["K"])})
    variants = {}
    for name in fit.get("variants", []):
        variants[name] = []
        for j, row in enumerate(test["variants"][name]):
            point = {"K": row["K"]}
            for text in TEXTS:
                summary, axes = fit["texts"][text]["variants"][name][j], fit["texts"][text]["axes"]
                point[text] = {**{k: v for k, v in summary.items() if k != "K"},
                               **placed(axes, "variants", name, j)}
            variants[name].append(point)
    replicates = {member: {text: {**fit["texts"][text]["replicates"][member],
                                  **placed(fit["texts"][text]["axes"], "replicates", member)} for text in TEXTS}
                  for member in fit.get("replicates", [])}
    curves = {text: {axis: fit_summary(a) for axis, a in fit["texts"][text]["axes"].items()} for text in TEXTS}
    return {"family": family, "roe": roe, "variants": variants, "replicates": replicates, "fits": curves,
            "paper": PAPER,
            "windows": {text: fit["texts"][text]["windows"] for text in TEXTS},
            "bootstrap": {"resamples": test["axes"]["params"]["resamples"], "seed": test["axes"]["params"]["seed"],
                          "unit": "windows, the same resample for every member and K"},
            "latency_conditions": (latency or {}).get("conditions"), "latency_rounds": (latency or {}).get("rounds")}


def strict_json(value):
    """``value`` with NaN as null and infinities as "inf" / "-inf": the report is standard JSON.

    An infinite equivalent size is meaningful (a power law whose asymptote lies above that NLL
    never reaches it); NaN only means undefined (a fit whose NLL does not fall with size).
    """
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def fit_summary(axis_doc: dict) -> dict:
    """One size axis of fit.json without its bands and points: which curve, why (AICc), and both curves' fits."""
    kept = ("params", "params_ci95", "residuals", "rss", "alpha_at_grid_edge")
    return {"chosen": axis_doc["chosen"], "aicc": axis_doc["aicc"],
            **{name: {k: c[k] for k in kept if k in c} for name, c in axis_doc["curves"].items()}}


def plot(fit: dict, doc: dict, path) -> None:
    """NLL against parameters (members, fitted curve and band, RoE points at their equivalent size) and NLL
    against decode-step time (every member at K = 1, RoE-K on the 1x member)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_doc = fit["texts"]["test"]["axes"]["params"]
    curve = axes_doc["curves"][axes_doc["chosen"]]
    fig, (left, right, ratios) = plt.subplots(1, 3, figsize=(18, 4.8))
    band = curve["band"]
    left.fill_between(band["x"], band["lo"], band["hi"], alpha=0.25, label="95% band (bootstrap over windows)")
    left.plot(band["x"], band["mid"], label=f"fit: {axes_doc['chosen']}")
    left.errorbar([m["params"] for m in doc["family"]], [m["nll_test"] for m in doc["family"]],
                  yerr=[1.96 * m["se_test"] for m in doc["family"]], fmt="o", color="k", label="family (K=1)")
    for m in doc["family"]:
        left.annotate(m["member"], (m["params"], m["nll_test"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for p in (q for q in curve["points"] if q["K"] > 1 and math.isfinite(q["equivalent"])):
        lo, hi = (min(c, 1e12) for c in p["ci95"])
        left.errorbar([p["equivalent"]], [p["nll"]], xerr=[[p["equivalent"] - lo], [hi - p["equivalent"]]],
                      fmt="s", color="tab:red", ms=4, capsize=2,
                      label="RoE-K on 1x at its equivalent size" if p["K"] == 2 else None)
        left.annotate(f"K={p['K']}" + (" (extrapolated)" if p["extrapolated"] else ""), (p["equivalent"], p["nll"]),
                      textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:red")
    for (name, points), color in zip(curve.get("variants", {}).items(), ("tab:green", "tab:purple", "tab:orange")):
        shown = [q for q in points if math.isfinite(q["equivalent"])]
        left.plot([q["equivalent"] for q in shown], [q["nll"] for q in shown], "D", color=color, ms=4,
                  label=f"{name}: its K=1..{shown[-1]['K'] if shown else ''} at their equivalent sizes")
    sizes = {m["member"]: m["params"] for m in doc["family"]}
    for i, (member, again) in enumerate(doc.get("replicates", {}).items()):
        left.errorbar([sizes[member]], [again["test"]["nll"]], yerr=[1.96 * again["test"]["se"]], fmt="o",
                      mfc="none", color="k", label="a second seed of a member (training noise)" if i == 0 else None)
    left.set(xscale="log", xlabel="total parameters", ylabel="test NLL (nats/token)", title="NLL against size")
    left.legend(fontsize=7)
    batches = (doc["latency_conditions"] or {}).get("batches", [])
    for batch, marker in zip(batches, "o^sv"):
        key = f"step_ms_b{batch}"
        for rows, nll, color, who in ((doc["family"], lambda r: r["nll_test"], "k", "family K=1"),
                                      (doc["roe"], lambda r: r["test"]["nll"], "tab:red", "RoE-K on 1x")):
            rows = [r for r in rows if r[key]]  # in size order, then K order
            if not rows:
                continue
            ms = [r[key]["median"] for r in rows]
            ci = [r[key]["ci95"] or [m, m] for r, m in zip(rows, ms)]
            right.errorbar(ms, [nll(r) for r in rows], xerr=[[m - c[0] for m, c in zip(ms, ci)],
                                                             [c[1] - m for m, c in zip(ms, ci)]],
                           marker=marker, color=color, capsize=2, label=f"{who}, batch {batch}")
            for r, m in zip(rows, ms):
                right.annotate(r.get("member") if "nll_test" in r else f"K={r['K']}", (m, nll(r)), fontsize=7,
                               textcoords="offset points", xytext=(3, 3), color=color)
    untrained = (doc["latency_conditions"] or {}).get("weights") == "init"
    right.set(xscale="log", xlabel="decode step (ms, median)", ylabel="test NLL (nats/token)",
              title="quality against latency" + (" (steps timed on the shapes, untrained)" if untrained else ""))
    right.legend(fontsize=7)
    plot_ratios(ratios, doc)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ratios(ax, doc: dict) -> None:
    """RoE-K's equivalent size over the 1x member's own point, against K, on both texts; the paper's 1.5x at
    K = 32; a second seed of a member against its first run (training noise) as a band around 1."""
    for text, color, shift in (("test", "tab:red", 0.97), ("unseen", "tab:orange", 1.03)):
        rows = [(p["K"], p[text]["params"]) for p in doc["roe"] if p["K"] > 1]
        ks = [k * shift for k, _ in rows]  # side by side, not on top of each other
        mid = [r["ratio_on_curve"] for _, r in rows]
        ax.errorbar(ks, mid, yerr=[[m - r["ratio_on_curve_ci95"][0] for m, (_, r) in zip(mid, rows)],
                                   [r["ratio_on_curve_ci95"][1] - m for m, (_, r) in zip(mid, rows)]],
                    marker="o", color=color, capsize=2, label=f"RoE-K on {doc['roe'][0]['member']}, {text}")
        for i, (member, again) in enumerate(doc.get("replicates", {}).items()):
            lo, hi = again[text]["params"]["ratio_ci95"]
            ax.axhspan(min(lo, 1 / hi), max(hi, 1 / lo), color=color, alpha=0.12,
                       label=f"a second seed of {member}, {text}: {again[text]['params']['ratio']:.3f}x "
                             f"({lo:.3f}-{hi:.3f})" if i == 0 else None)
    paper = doc["paper"]
    ax.plot([paper["K"]], [paper["ratio_to_1x"]], "*", ms=12, color="tab:blue",
            label=f"paper: {paper['ratio_to_1x']}x at K = {paper['K']} (extrapolated)")
    ax.axhline(1, color="k", lw=0.6)
    ax.set(xscale="log", xlabel="roster size K", ylabel="equivalent size / the 1x member's own",
           title="RoE's equivalent size (total parameters)")
    ax.set_xticks([2, 4, 8, 16, 32], labels=["2", "4", "8", "16", "32"])
    ax.minorticks_off()
    ax.legend(fontsize=7, loc="center left")
