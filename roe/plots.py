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


def plot_nll_vs_k(rows, path, title: str) -> None:
    """Change in held-out NLL against K = 1, with +-1 standard-error bars, log-scale K."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r.K for r in rows]
    ax.errorbar(ks, [r.delta_nll * 1e3 for r in rows], yerr=[r.delta_se * 1e3 for r in rows], marker="o", capsize=3)
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
