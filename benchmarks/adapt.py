"""fewshot adapt on the development domains: frozen vs every candidate vs adapt's choice, on held-out TEST classes.

    PYTHONPATH=. .venv/bin/python benchmarks/adapt.py [--data ../shared/datasets] [--domains dtd omniglot caltech]
        [--budget 10m] [--seeds 0 1 2] [--test-cap 10] [--out benchmarks/results/adapt]

Each domain's classes are split (seeded by --seed) into DEVELOPMENT classes, handed to ``adapt`` (which splits them
again into training and validation classes), and TEST classes that ``adapt`` never sees:
- dtd: the 10 texture classes of ``dtd/dtd_textures.zip``, 5 development / 5 test, 5-way;
- omniglot: the 30 background alphabets, 20 development / 10 test, within-alphabet 20-way;
- caltech: the 51 Caltech-101 base classes, 25 development / 26 test, 5-way.
Every candidate adapt scored is then measured on the test classes (1- and 5-shot accuracy, 1-shot open-set AUROC,
95% CIs over 600 episodes): the rows show what each transfer is worth on new classes, and whether adapt's choice
was right. Prints a markdown table per domain and seed, the targets of the issue, and writes adapt.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path


from fewshot import load_dataset, split_by_class, split_by_group
from fewshot.classifier import head_encoder
from fewshot.data.datasets import cap_per_class
from fewshot.learning.adapt import adapt, format_report
from fewshot.learning.adapt.validation import Validation

DOMAINS = {  # zip, held-out share, ways, within group
    "dtd": ("dtd/dtd_textures.zip", 5, 5, False),
    "omniglot": ("omniglot/images_background.zip", 10, 20, True),
    "caltech": ("caltech101/caltech101_base.zip", 26, 5, False),
}


def test_split(dataset, held_out: int, seed: int):
    if dataset.group_names is not None:
        return split_by_group(dataset, held_out, seed=seed)
    return split_by_class(dataset, held_out, seed=seed)


def test_scores(result, test, ways: int, within_group: bool, seed: int, episodes: int) -> list[dict]:
    """Every scored candidate on the test classes (same episodes for all)."""
    validation = Validation.build(test, ways=ways, within_group=within_group, episodes=episodes, seed=seed + 1000)
    rows = []
    for c in result.candidates:
        if c.score is None:
            rows.append({"name": c.name, "status": c.status, "note": c.note})
            continue
        encoder = head_encoder(c.model)
        start = time.perf_counter()
        vectors = encoder.embed(list(test.items), progress=False)
        score = validation.score(vectors, head=c.model)
        rows.append({"name": c.name, "status": c.status, "chosen": c.name == result.chosen,
                     "validation": c.score.to_dict(), "test": score.to_dict(), "seconds": c.seconds,
                     "ms_per_image": c.ms_per_image, "test_seconds": time.perf_counter() - start,
                     "gain_vs_frozen": None})
        rows[-1]["_score"] = score
    frozen = rows[0]["_score"]
    for row in rows:
        if "_score" in row:
            row["gain_vs_frozen"] = row.pop("_score").gain_over(frozen)
    return rows


def pm(d: dict | None, key: str = "accuracy", percent: bool = True) -> str:
    if not d:
        return "-"
    return f"{d[key]:.1%} ± {d['ci95']:.1%}" if percent else f"{d[key]:.3f} ± {d['ci95']:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| candidate | val 1-shot | test 1-shot | test 5-shot | test AUROC 1-shot | paired gain vs frozen | "
             "time | ms/img |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "test" not in r:
            lines.append(f"| {r['name']} | {r['status']}: {r['note']} | | | | | | |")
            continue
        t, v = r["test"], r["validation"]
        gain = f"{r['gain_vs_frozen'][0]:+.1%} ± {r['gain_vs_frozen'][1]:.1%}"
        mark = " **(chosen)**" if r["chosen"] else ""
        lines.append(f"| {r['name']}{mark} | {pm(v.get('1-shot'))} | {pm(t.get('1-shot'))} | {pm(t.get('5-shot'))} | "
                     f"{pm(t.get('auroc_1shot'), 'mean', False)} | {gain} | {r['seconds']:.0f} s | "
                     f"{r['ms_per_image']:.0f} |")
    return "\n".join(lines)


def verdicts(domain: str, rows: list[dict]) -> list[str]:
    frozen = rows[0]["test"]
    chosen = next(r for r in rows if r.get("chosen"))["test"]
    out = []
    never_worse = chosen["1-shot"]["accuracy"] >= frozen["1-shot"]["accuracy"] - chosen["1-shot"]["ci95"]
    out.append(f"never worse (chosen 1-shot >= frozen - CI): {'yes' if never_worse else 'NO'}")
    gain = chosen["1-shot"]["accuracy"] - frozen["1-shot"]["accuracy"]
    auroc_gain = chosen["auroc_1shot"]["mean"] - frozen["auroc_1shot"]["mean"]
    if domain == "dtd":
        reached = "reached" if gain >= 0.05 else "NOT reached"
        out.append(f"5-way 1-shot {gain:+.1%} over frozen (target +5.0 points): {reached}")
    if domain == "omniglot":
        error = 1 - chosen["1-shot"]["accuracy"]
        reached = "reached" if error <= 0.045 else "NOT reached"
        out.append(f"20-way 1-shot error {error:.1%} (target <= 4.5%): {reached}")
    if domain in ("dtd", "omniglot"):
        out.append(f"AUROC 1-shot {auroc_gain:+.3f} over frozen (target +0.05): "
                   f"{'reached' if auroc_gain >= 0.05 else 'NOT reached'}")
    if domain == "caltech":
        out.append(f"5-way 1-shot {gain:+.1%} over frozen (target >= 0): {'reached' if gain >= 0 else 'NOT reached'}")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(9.0, 6.5 * len(panels)), 5.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        rows = [r for r in results[key] if "test" in r]
        names = [r["name"] for r in rows]
        means = [r["test"]["1-shot"]["accuracy"] for r in rows]
        cis = [r["test"]["1-shot"]["ci95"] for r in rows]
        colours = ["tab:green" if r["chosen"] else "tab:grey" if i == 0 else "tab:blue" for i, r in enumerate(rows)]
        ax.barh(range(len(rows)), means, xerr=cis, color=colours, capsize=2)
        ax.axvline(means[0], color="tab:grey", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(max(0, min(m - c for m, c in zip(means, cis)) - 0.05), min(1, max(means) + 0.08))
        ax.set_title(f"{key}: test 1-shot accuracy", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("fewshot adapt on held-out test classes\n(green: adapt's choice; grey: frozen default)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--test-cap", type=int, default=10, help="test images per class (seeded sample)")
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--out", default="benchmarks/results/adapt")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; budget {args.budget} per adapt run\n")
    results = {}
    for domain in args.domains:
        zip_name, held_out, ways, within_group = DOMAINS[domain]
        dataset = load_dataset(Path(args.data) / zip_name)
        for seed in args.seeds:
            development, test = test_split(dataset, held_out, seed)
            result = adapt(development, budget=args.budget, seed=seed, ways=ways, within_group=within_group)
            print(format_report(result), flush=True)
            test = cap_per_class(test, args.test_cap, seed)
            rows = test_scores(result, test, ways, within_group, seed, args.test_episodes)
            key = f"{domain} seed {seed}"
            results[key] = rows
            print(f"\n### {key}: {len(development.classes)} development classes, {len(test.classes)} test classes "
                  f"({ways}-way{' within group' if within_group else ''})\n")
            print(table(rows))
            for line in verdicts(domain, rows):
                print(f"- {line}")
            print(flush=True)
            (out / "adapt.json").write_text(json.dumps(results, indent=2, default=float))
    plot(results, out / "adapt.png")
    print(f"wrote {out / 'adapt.png'} and {out / 'adapt.json'}")


if __name__ == "__main__":
    main()
