"""Study plots as matplotlib Figures (PNG via `save`): accuracy vs noise rate, per-epoch curves.

Figures are built with matplotlib.figure.Figure, not pyplot, so that nothing here depends on (or
changes) the backend: the report writes PNGs headless, a notebook displays the returned figure.
Each method keeps one colour in every figure.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.load import last_epoch
from analysis.tables import ZEROSHOT, method_order, noise_label, zeroshot_stats
from rsnl.files import atomic_write

# (metric, panel title, y label, range the +-std band is clipped to)
CURVES = (("test_acc", "test accuracy", "accuracy (%)", (0, 100)),
          ("val_acc", "validation accuracy (noisy labels)", "accuracy (%)", (0, 100)),
          ("kept_frac", "kept fraction", "share of training samples", (0, 1)),
          ("select_precision", "selection precision", "clean share of kept", (0, 1)),
          ("select_recall", "selection recall", "kept share of clean", (0, 1)),
          ("alpha", "alpha (weight of prompt similarity)", "alpha", (0, 1)))
# the last panel when no method selects samples (alpha is then unused)
LOSS_PANEL = ("train_loss", "training loss (kept samples)", "loss", (0, None))


def colors(methods: list[str]) -> dict[str, tuple]:
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def linestyles(methods: list[str]) -> dict[str, str]:
    """Different dashes too, so that identical curves (e.g. two methods without selection) stay visible."""
    return {m: ("-", "--", "-.", ":")[i % 4] for i, m in enumerate(methods)}


def save(fig: Figure, path) -> Path:
    """Atomically: a report re-made while someone looks at it never shows half a picture."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120, bbox_inches="tight"))


def accuracy_vs_noise(df: pd.DataFrame, metric: str = "test_acc") -> Figure:
    """Last-epoch accuracy of each method against the noise rate, mean +- std over seeds."""
    last = last_epoch(df)
    methods = [m for m in method_order(df) if m in set(last["method"])]
    col = colors(method_order(df))
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    rates = sorted(last["noise_rate"].unique()) if not last.empty else []
    span = (max(rates) - min(rates)) * 100 if len(rates) > 1 else 10.0
    for i, m in enumerate(methods):
        g = last[last["method"] == m].groupby("noise_rate")[metric].agg(["mean", "std", "size"]).reset_index()
        # a small sideways offset keeps overlapping error bars apart
        x = g["noise_rate"] * 100 + (i - (len(methods) - 1) / 2) * span * 0.012
        ax.errorbar(x, g["mean"], yerr=g["std"].fillna(0), color=col[m], marker="o", capsize=4, lw=1.8,
                    label=f"{m} (n={int(g['size'].min())}" + (f"-{int(g['size'].max())})" if g["size"].nunique() > 1
                                                               else ")"))
    zs = zeroshot_stats(df) if metric == "test_acc" else None
    if zs is not None and len(zs):
        ax.plot(zs["noise_rate"] * 100, zs["mean"], color="0.35", ls="--", lw=1.5, marker="x",
                label=f"{ZEROSHOT} (no training)")
    ax.set_xticks([r * 100 for r in rates], [noise_label(r) for r in rates])
    if rates:
        ax.set_xlim(min(rates) * 100 - span * 0.08, max(rates) * 100 + span * 0.08)
    name = {"test_acc": "test accuracy", "val_acc": "validation accuracy"}.get(metric, metric)
    ax.set_xlabel("label noise rate (%)")
    ax.set_ylabel(f"{name} at last epoch (%)")
    ax.set_title(f"{df.attrs.get('name', '')}: {name} vs noise rate\n(mean ± std over seeds, n = runs)")
    ax.grid(alpha=0.3)
    if methods:  # beside the axes: inside, a legend of many methods hides the lower curves
        ax.legend(title="method", fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no run has reached its last epoch yet", ha="center", va="center",
                transform=ax.transAxes)
    return fig


def curves(df: pd.DataFrame, noise_rate: float) -> Figure:
    """Per-epoch curves at one noise rate: mean over the runs of each method with a +-1 std band.
    Failed runs are left out; running ones are drawn as far as they got."""
    d = df[(df["noise_rate"] == noise_rate) & (df["status"] != "ERROR")].dropna(subset=["epoch"])
    methods = [m for m in method_order(df) if m in set(d["method"])]
    col, ls = colors(method_order(df)), linestyles(method_order(df))
    fig = Figure(figsize=(14, 8))
    axes = fig.subplots(2, 3)
    selects = "selector" not in d or (d["selector"] != "none").any()
    panels = CURVES if selects else CURVES[:-1] + (LOSS_PANEL,)
    for ax, (key, title, unit, (lo_clip, hi_clip)) in zip(axes.flat, panels):
        for m in methods:
            dm = d[d["method"] == m]
            if key == "alpha" and "selector" in dm and (dm["selector"] == "none").all():
                continue  # alpha only weights the selection score; without selection it is unused
            g = dm.groupby("epoch")[key].agg(["mean", "std", "size"])
            if g["mean"].notna().any():
                ax.plot(g.index, g["mean"], color=col[m], ls=ls[m], lw=1.8, marker="." if len(g) < 15 else None,
                        label=m)
                lo = (g["mean"] - g["std"].fillna(0)).clip(lo_clip, hi_clip)
                hi = (g["mean"] + g["std"].fillna(0)).clip(lo_clip, hi_clip)
                ax.fill_between(g.index, lo, hi, color=col[m], alpha=0.18, lw=0)
        if key == "test_acc" and "zeroshot_acc" in d and d["zeroshot_acc"].notna().any():
            ax.axhline(d["zeroshot_acc"].mean(), color="0.35", ls="--", lw=1.2, label=ZEROSHOT)
        _epoch_axis(ax, title, unit, "not reported")
    n = d.groupby("method")["run"].nunique()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    labels = [m if m == ZEROSHOT else f"{m} (n={n.get(m, 0)})" for m in labels]
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 6), title="method (n = runs)",
                   fontsize=10, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"{df.attrs.get('name', '')}: per-epoch curves at {noise_label(noise_rate)} label noise "
                 f"(mean ± std over seeds)", fontsize=13)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _epoch_axis(ax, title: str, unit: str, empty: str) -> None:
    """A per-epoch panel's title, axes and grid; `empty` is written where no method drew anything."""
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("epoch (0-indexed)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    if not ax.has_data():
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)


# (metric, panel title, y label); the feature similarity's AUROC is drawn in the prompt panel, where the two
# sides of G meet
DIAGNOSTICS = (("noise_auroc", "AUROC of the selection score (G, or Q for OT)", "AUROC, clean vs noisy"),
               ("prompt_auroc", "AUROC of each side of G alone", "AUROC, clean vs noisy"),
               ("block_cosine", "blocks' mean cosine (same class)", "cosine"),
               ("class_cosine", "classes' mean cosine (1: no class told apart)", "cosine"))


def diagnostics(df: pd.DataFrame, noise_rate: float) -> Figure:
    """Which side of G separates clean from noisy samples, epoch by epoch, and whether the blocks differ:
    the AUROC of G, of the prompt similarity (solid) and of the feature similarity (dotted, fixed by the
    frozen features), the blocks' mean cosine (1: collapsed into one prompt) and the classes' (1: one
    feature for every class, as CoOp under heavy noise on some seeds). Mean over the runs of each method;
    band +-1 std."""
    d = df[(df["noise_rate"] == noise_rate) & (df["status"] != "ERROR")].dropna(subset=["epoch"])
    methods = [m for m in method_order(df) if m in set(d["method"])]
    col = colors(method_order(df))
    fig = Figure(figsize=(5 * len(DIAGNOSTICS), 4.6))
    axes = fig.subplots(1, len(DIAGNOSTICS))
    for ax, (key, title, unit) in zip(axes, DIAGNOSTICS):
        for m in methods:
            dm = d[d["method"] == m]
            if key not in dm:
                continue
            g = dm.groupby("epoch")[key].agg(["mean", "std"])
            if g["mean"].notna().any():
                ax.plot(g.index, g["mean"], color=col[m], lw=1.8, label=m)
                ax.fill_between(g.index, g["mean"] - g["std"].fillna(0), g["mean"] + g["std"].fillna(0),
                                color=col[m], alpha=0.15, lw=0)
            if key == "prompt_auroc" and "feature_auroc" in dm:
                f = dm.groupby("epoch")["feature_auroc"].mean()
                if f.notna().any():
                    ax.plot(f.index, f.values, color=col[m], lw=1.4, ls=":")
        _epoch_axis(ax, title, unit, "not reported (no noise, or one block)")
    axes[1].plot([], [], color="0.3", lw=1.8, label="prompt similarity")
    axes[1].plot([], [], color="0.3", lw=1.4, ls=":", label="feature similarity")
    axes[1].legend(fontsize=9, loc="lower right")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 8), title="method", fontsize=10,
                   bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{df.attrs.get('name', '')}: the two sides of G, the blocks and the classes at "
                 f"{noise_label(noise_rate)} label "
                 f"noise (mean ± std over seeds)", fontsize=13)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes, for IPython.display.Image: shows in any notebook backend (Agg included)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def noise_rates(df: pd.DataFrame) -> list[float]:
    return sorted(float(r) for r in df.dropna(subset=["epoch"])["noise_rate"].unique()) if "noise_rate" in df else []

