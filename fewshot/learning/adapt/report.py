"""The report of ``fewshot adapt``: a table for people, the dict behind ``--json``, and a PNG."""

from __future__ import annotations

import os
from pathlib import Path

from .search import AdaptResult


def format_report(result: AdaptResult) -> str:
    """Every candidate tried or skipped, with validation accuracy and AUROC (95% CIs), time and cost."""
    shots = sorted({k for c in result.candidates if c.score for k in c.score.accuracy})
    header = ["candidate", *(f"{k}-shot" for k in shots), "AUROC 1-shot", "time", "ms/img"]
    rows = [header]
    for c in result.candidates:
        if c.score is None:
            rows.append([c.name, f"{c.status}: {c.note}"])
            continue
        d = c.score.to_dict()
        auroc = d.get("auroc_1shot")
        mark = " <- chosen" if c.name == result.chosen else ""
        rows.append([c.name + mark, *(f"{d[f'{k}-shot']['accuracy']:.1%} ± {d[f'{k}-shot']['ci95']:.1%}"
                                      if f"{k}-shot" in d else "-" for k in shots),
                     f"{auroc['mean']:.3f} ± {auroc['ci95']:.3f}" if auroc else "-",
                     f"{c.seconds:.0f} s", f"{c.ms_per_image:.0f}" if c.ms_per_image else "-"])
    widths = [max(len(r[i]) for r in rows if len(r) > i and len(r) == len(header)) for i in range(len(header))]
    lines = []
    for r in rows:
        if len(r) == len(header):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        else:
            lines.append(f"{r[0]}: {r[1]}")
    d = result.domain
    lines += ["", f"validation: {result.settings['ways']}-way episodes on {d['val_classes']} held-out classes "
                  f"({d['val_images']} images); trained on {d['train_classes']} classes ({d['train_images']} images)"
                  + (f" and {d['unlabeled_images']} unlabelled images" if d["unlabeled_images"] else ""),
              f"chosen: {result.chosen} ({result.reason})",
              f"time: {result.seconds:.0f} s of a {result.budget_seconds:.0f} s budget"
              + (" (interrupted: the best complete candidate was kept)" if result.interrupted else "")]
    return "\n".join(lines)


def plot_report(result: AdaptResult, path: str | os.PathLike) -> Path:
    """Validation accuracy (1- and 5-shot) and AUROC of every scored candidate, with 95% CIs; the chosen one
    and the frozen default marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [c for c in result.candidates if c.score is not None]
    names = [c.name for c in scored]
    shots = sorted({k for c in scored for k in c.score.accuracy})
    fig, axes = plt.subplots(1, len(shots) + 1, figsize=(5 + 3.2 * (len(shots) + 1), 0.42 * len(scored) + 1.8),
                             sharey=True)
    y = range(len(scored))
    panels = [(f"{k}-shot accuracy", [c.score.to_dict().get(f"{k}-shot") for c in scored], "accuracy")
              for k in shots] + [("open-set AUROC, 1 shot", [c.score.to_dict().get("auroc_1shot") for c in scored],
                                  "mean")]
    for ax, (title, values, key) in zip(axes, panels):
        means = [v[key] if v else float("nan") for v in values]
        cis = [v["ci95"] if v else 0 for v in values]
        colours = ["tab:green" if c.name == result.chosen else "tab:grey" if c.phase == "baseline" else "tab:blue"
                   for c in scored]
        ax.barh(list(y), means, xerr=cis, color=colours, capsize=2)
        low = min(m - e for m, e in zip(means, cis) if m == m)
        ax.set_xlim(max(0.0, low - 0.05), 1.0)
        ax.set_title(title, fontsize=10)
        ax.axvline(means[0], color="tab:grey", linestyle="--", linewidth=1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(y))
    axes[0].set_yticklabels(names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"fewshot adapt: held-out validation classes ({result.settings['ways']}-way; green = chosen, "
                 f"grey = frozen default)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
