"""PNG of a bench run (matplotlib, optional): GB/s of the throughput workloads (log scale: NIXL
and the limits can be 1000x apart on GPUs) and median ms of the latency workloads (log scale too), with p90 as
error bars; ours, the one-process references and each NIXL configuration side by side."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .report import nixl_entries


def series(rows: Sequence[Mapping[str, Any]], latency: bool) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    """Workload names and, per implementation, (value, p90) per workload (0 where missing):
    GB/s (best rep) for throughput rows, ms (median) for latency rows."""
    picked = [r for r in rows if (r["measure"] == "latency") == latency]
    names = [r["workload"]["name"] for r in picked]
    out: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(picked):
        entries = {"ours": r["ours"], **{v.get("name", k): v for k, v in r["references"].items()},
                   **nixl_entries(r.get("nixl"))}
        for label, e in entries.items():
            col = out.setdefault(label, [(0.0, 0.0)] * len(picked))
            if e and e.get("gbps"):
                col[i] = (e["median_ms"], e["p90_ms"]) if latency else (e["gbps"], 0.0)
    return names, out


def plot(rows: Sequence[Mapping[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(lat, *series(rows, lat)) for lat in (False, True)]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ValueError("no rows to plot")
    labels = list(dict.fromkeys(label for p in panels for label in p[2]))
    color = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}  # same colour in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.2), squeeze=False)
    for ax, (latency, names, cols) in zip(axes[0], panels):
        width = 0.8 / max(1, len(cols))
        for j, (label, vals) in enumerate(cols.items()):
            xs = [x + j * width for x in range(len(names))]
            heights = [v for v, _ in vals]
            err = [[0] * len(vals), [max(0.0, p - v) for v, p in vals]] if latency else None
            ax.bar(xs, heights, width, label=label, color=color[label], yerr=err, capsize=2)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=15, ha="right", fontsize=8)
        if latency:
            ax.set_title("latency: ms per request, median (bar) and p90 (whisker); lower is better", fontsize=9)
        else:
            ax.set_title("throughput: GB/s of the best rep; higher is better", fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
