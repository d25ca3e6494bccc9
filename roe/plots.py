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
