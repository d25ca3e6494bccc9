"""PNG plots of the command-line tables (matplotlib is the optional `plot` extra)."""

from __future__ import annotations


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'roe[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_nll_vs_k(rows, path, title: str, against_label: str | None = None) -> None:
    """Change in held-out NLL against K = 1, with +-1 standard-error bars, log-scale K.

    With ``against_label``, rows carrying ``against_nll`` add that configuration's curve.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r.K for r in rows]
    ax.errorbar(ks, [r.delta_nll * 1e3 for r in rows], yerr=[r.delta_se * 1e3 for r in rows], marker="o", capsize=3,
                label="schedule" if against_label else None)
    if against_label:
        base = {r.K: r.nll - r.delta_nll for r in rows}
        other = [r for r in rows if r.against_nll is not None]
        ax.plot([r.K for r in other], [(r.against_nll - base[r.K]) * 1e3 for r in other], marker="s",
                linestyle="--", label=against_label)
        ax.legend()
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("roster size K")
    ax.set_ylabel("NLL change vs K=1 (1e-3 nats/token)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost_vs_k(rows, path, title: str) -> None:
    """Decode-step time (left) and peak memory (right) against K, one line per method (paper Fig. 4)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ks = [r["K"] for r in mine]
        left.plot(ks, [r["decode_step_ms"] for r in mine], marker="o", label=method)
        right.plot(ks, [r["peak_rss_mb"] for r in mine], marker="o", label=method)
    for ax, label in ((left, "decode step (ms, median)"), (right, "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("roster size K")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_calibration(result, path, title: str) -> None:
    """Temperature search: objective per trial with running best, best per-layer tau, NLL vs uniform tau."""
    import itertools

    plt = _pyplot()
    panels = 3 if result.uniform else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4))
    history, layers = axes[0], axes[1]
    trials = range(len(result.trial_values))
    delta = [(v - result.base_value) * 1e3 for v in result.trial_values]
    history.plot(trials, delta, "o", ms=3, alpha=0.6, label="trial")
    history.plot(trials, list(itertools.accumulate(delta, min)), color="C3", label="running best")
    history.axhline(0, color="grey", lw=0.8)
    history.set_xlabel("TPE trial")
    history.set_ylabel("NLL change vs K=1 (1e-3 nats/token)")
    history.legend()
    layers.bar(range(len(result.tau)), result.tau)
    layers.set_xlabel("MoE layer")
    layers.set_ylabel("tau (best schedule)")
    if result.uniform:
        taus, values = zip(*result.uniform, strict=True)
        axes[2].plot(taus, [(v - result.base_value) * 1e3 for v in values], marker="o", label="uniform tau")
        axes[2].axhline((result.best_value - result.base_value) * 1e3, color="C3", ls="--", label="TPE best")
        axes[2].axhline(0, color="grey", lw=0.8)
        axes[2].set_xlabel("uniform tau on the noisy layers")
        axes[2].set_ylabel("NLL change vs K=1 (1e-3 nats/token)")
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
