"""Plots (matplotlib, imported lazily): suppression histogram, activation statistics."""

from __future__ import annotations

from typing import Any


def plot_histogram(base_positions: Any, updated_positions: Any, epsilon: float, path: str) -> str | None:
    """Histogram of per-position mass on V_S, base and unlearned, with epsilon marked (needs matplotlib)."""
    import numpy as np

    plt = load_pyplot()
    if plt is None:
        return None
    bins = np.linspace(0.0, 1.0, 51)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(base_positions, bins=bins, alpha=0.5, label=f"base (mean {np.mean(base_positions):.3f})")
    ax.hist(updated_positions, bins=bins, alpha=0.5, label=f"unlearned (mean {np.mean(updated_positions):.3f})")
    ax.axvline(epsilon, color="red", linestyle="--", label=f"epsilon = {epsilon}")
    ax.set_yscale("log")
    ax.set_title("Per-position mass on the forbidden set")
    _label(ax, "mass on V_S at a held-out forget position", "positions")
    return _save(plt, fig, path)


def plot_activations(activations: dict[str, list[dict[str, float]]], path: str) -> str | None:
    """Per-layer hidden-state norms and cosine similarity to the base model (needs matplotlib)."""
    plt = load_pyplot()
    if plt is None:
        return None
    fig, (ax_n, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    for split, rows in activations.items():
        layers = [r["layer"] for r in rows]
        ax_n.plot(layers, [r["base_norm"] for r in rows], linestyle="--", marker=".", label=f"{split}: base")
        ax_n.plot(layers, [r["updated_norm"] for r in rows], marker="o", label=f"{split}: unlearned")
        ax_c.plot(layers, [r["cosine"] for r in rows], marker="o", label=split)
    from matplotlib.ticker import MaxNLocator

    for ax, ylabel in ((ax_n, "mean hidden-state norm"), (ax_c, "mean cosine(unlearned, base)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _label(ax, "layer", ylabel)
    return _save(plt, fig, path)


def _label(ax: Any, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()


def _save(plt: Any, fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_pyplot():
    """matplotlib's pyplot with the non-interactive Agg backend, or ``None`` when matplotlib (a dependency)
    is missing from the environment; callers then skip the figure with a warning."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
