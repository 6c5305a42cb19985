"""ROAR's outputs (:mod:`saliencybench.benchmark.roar`): ``roar.md``, the curves figure, ``roar.csv``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .store import write_atomic

RANDOM = "random"  # the control: a seeded uniform ranking (not the registered ``random`` method)


def roar_markdown(table: pd.DataFrame) -> str:
    """``roar.md``: retrained accuracy per method (rows) and fraction removed (columns), and the cost."""
    std = table.accuracy_std.notna().any()
    cell = table.apply(lambda r: f"{r.accuracy:.3f}" + (f" ± {r.accuracy_std:.3f}" if std else ""), axis=1)
    pivot = table.assign(cell=cell).pivot(index="method", columns="fraction", values="cell")
    pivot = pivot.loc[list(dict.fromkeys(table.method))]
    head = "| method | " + " | ".join(f"{f:g}" for f in pivot.columns) + " |"
    lines = [head, "|---" * (len(pivot.columns) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(row) + " |" for m, row in pivot.iterrows()]
    r = table.iloc[0]
    per = pd.concat([table[table.fraction > 0], table[table.fraction == 0].head(1)]).train_seconds  # each cell once
    return (f"# ROAR on {r.model}\n\nHeld-out accuracy after removing the top fraction of pixels (per-channel training "
            f"mean) from {r.n_train} training and {r.n_val} held-out images and retraining from scratch "
            f"({r.repeats} repeat(s); fraction 0 = unmodified). Base model accuracy {r.base_accuracy:.3f}, chance "
            f"{r.chance:.3f}. Lower than `random` = the method found pixels the task needs.\n\n"
            + "\n".join(lines) + f"\n\nCost per retraining: {per.mean():.0f} s (mean of the cells, "
            f"{per.min():.0f}-{per.max():.0f} s); maps: " + ", ".join(
                f"{m} {s:.0f} s" for m, s in table.drop_duplicates("method")[["method", "explain_seconds"]].values
                if m != RANDOM) + ".\n")


def roar_figure(table: pd.DataFrame, out: Path) -> list[Path]:
    """The ROAR curves (accuracy vs fraction removed, one line per method, the random control black and
    dashed, chance dotted; error bars = std over repeats) as ``roar.png`` and ``roar.svg`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    colours = iter(plt.get_cmap("tab10").colors)
    for m, g in table.groupby("method", sort=False):
        g = g.sort_values("fraction")
        style = dict(color="black", linestyle="--", linewidth=2.2, marker="s", zorder=3, label="random (control)") \
            if m == RANDOM else dict(color=next(colours), marker="o", label=m)
        ax.errorbar(g.fraction, g.accuracy, yerr=g.accuracy_std.fillna(0.0), capsize=3, **style)
    ax.axhline(table.chance.iloc[0], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set(xlabel="fraction of pixels removed (train and test)", ylabel="held-out accuracy after retraining",
           title=f"ROAR: {table.model.iloc[0]}", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    paths = [out / "roar.png", out / "roar.svg"]
    for p in paths:
        fig.savefig(p, dpi=100)
    plt.close(fig)
    return paths


def write_outputs(table: pd.DataFrame, run_dir: Path) -> list[Path]:
    """Write ``roar.csv``, ``roar.md`` and the figure into ``run_dir`` (atomically for the text files)."""
    csv, md = run_dir / "roar.csv", run_dir / "roar.md"
    write_atomic(csv, table.to_csv(index=False).encode())
    write_atomic(md, roar_markdown(table).encode())
    return [csv, md, *roar_figure(table, run_dir)]
