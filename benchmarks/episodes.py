"""Episodic evaluation speed on cached embeddings: fewshot vs easyfsl vs learn2learn.

    .venv/bin/python benchmarks/episodes.py [--episodes 10000] [--baseline-episodes 1000] [--reps 3]
                                            [--features X.npy --labels Y.npy]

5-way 1-shot 15-query nearest-prototype evaluation (squared euclidean distance, as easyfsl's
PrototypicalNetworks uses, so every row solves the same task and the accuracies must agree), timed end to
end: sampling the episodes, scoring them, per-episode accuracy. Each row runs in its own process (own peak
RSS). Data: synthetic float32 embeddings, 50 classes x 60 items x 1280 dims (Lite0's width): class
centres plus Gaussian noise, seeded; or any cached ``--features`` (N, dim) / ``--labels`` (N,) arrays.

Rows:
* fewshot, ``EpisodeSampler.sample_batch`` + ``evaluate_episodes`` (the public API today).
* fewshot, ``EpisodeSampler.sample_batch`` + ``evaluate_batch``: the batched path (same predictions as
  ``evaluate_episodes``; checked here each run).
* easyfsl 1.5.0: ``TaskSampler`` + ``DataLoader(collate_fn=episodic_collate_fn)`` + ``PrototypicalNetworks``
  with an identity backbone over the embeddings + ``easyfsl.utils.evaluate`` (its evaluation loop).
* learn2learn 0.2.0: ``TaskDataset`` with ``NWays``/``KShots``/``LoadData``/``RemapLabels`` over a
  ``MetaDataset`` of the embeddings, + a prototype classifier per task in torch.
The two baselines run ``--baseline-episodes`` episodes (they are slow); rates are per episode.

easyfsl is not a fewshot dependency: ``make bench-env`` installs it (and pandas, which it imports) into
``.bench-site/``, which this script appends to ``sys.path`` (after the venv's own packages).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH_SITE = ROOT / ".bench-site"
WAYS, SHOTS, QUERIES = 5, 1, 15


def synthetic(classes: int = 50, per_class: int = 60, dim: int = 1280, noise: float = 4.0, seed: int = 0):
    """Class centres + noise: hard enough that accuracy is far from 100% (so wrong rows would show)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    return centres[labels] + noise * rng.standard_normal((len(labels), dim)).astype(np.float32), labels


# -- one row, in its own process ------------------------------------------------------------------
def run_row(row: str, features: np.ndarray, labels: np.ndarray, episodes: int, reps: int) -> dict:
    import torch

    run = check_batched_path if row == "check" else ROWS[row]
    timings, accuracy, extra = [], float("nan"), {}
    for rep in range(reps + 1):  # the first run warms up (imports, allocator); not timed
        start = time.perf_counter()
        accuracy = run(features, labels, episodes, seed=rep)
        if isinstance(accuracy, tuple):
            accuracy, extra = accuracy
        if rep:
            timings.append(time.perf_counter() - start)
    return {"row": row, "episodes": episodes, "seconds": timings, "accuracy": accuracy, **extra,
            "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def fewshot_evaluate_episodes(features, labels, episodes, seed):
    from fewshot.data.episodes import EpisodeSampler
    from fewshot.evaluation.evaluate import evaluate_episodes

    batch = EpisodeSampler(labels, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=seed).sample_batch(episodes)
    return evaluate_episodes(features, labels, batch.to_episodes(), metric="l2", progress=False).accuracy


def fewshot_evaluate_batch(features, labels, episodes, seed):
    from fewshot.data.episodes import EpisodeSampler
    from fewshot.evaluation.evaluate import evaluate_batch

    batch = EpisodeSampler(labels, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=seed).sample_batch(episodes)
    return evaluate_batch(features, labels, batch, metric="l2").accuracy


def easyfsl_loop(features, labels, episodes, seed):
    import random

    import torch
    from easyfsl.datasets import FeaturesDataset
    from easyfsl.methods import PrototypicalNetworks
    from easyfsl.samplers import TaskSampler
    from easyfsl.utils import evaluate

    if "__init__" not in vars(torch.utils.data.Sampler):
        # easyfsl 1.5.0 calls Sampler.__init__(data_source=None), an argument torch >= 2.6 no longer takes;
        # the base class stores nothing, so accepting and ignoring it is all the shim does.
        torch.utils.data.Sampler.__init__ = lambda self, data_source=None: None
    random.seed(seed)  # easyfsl's TaskSampler draws from Python's global random
    dataset = FeaturesDataset(labels.tolist(), torch.from_numpy(features), [str(c) for c in np.unique(labels)])
    sampler = TaskSampler(dataset, n_way=WAYS, n_shot=SHOTS, n_query=QUERIES, n_tasks=episodes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=sampler.episodic_collate_fn)
    model = PrototypicalNetworks(torch.nn.Identity())
    return float(evaluate(model, loader, device="cpu", use_tqdm=False))


def learn2learn_loop(features, labels, episodes, seed):
    import random

    import torch

    from fewshot.evaluation.learn2learn import import_learn2learn, to_meta_dataset

    l2l = import_learn2learn("the learn2learn baseline")
    random.seed(seed)  # l2l's task transforms draw from Python's global random
    meta = to_meta_dataset(features, labels)
    transforms = [l2l.data.transforms.NWays(meta, WAYS), l2l.data.transforms.KShots(meta, SHOTS + QUERIES),
                  l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta)]
    taskset = l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)
    correct = 0
    for _ in range(episodes):
        data, task_labels = taskset.sample()
        task_labels = torch.as_tensor(task_labels)
        order = torch.argsort(task_labels, stable=True)
        grouped = data[order].view(WAYS, SHOTS + QUERIES, -1)
        prototypes = grouped[:, :SHOTS].mean(dim=1)  # (W, d)
        queries = grouped[:, SHOTS:].reshape(WAYS * QUERIES, -1)
        predicted = torch.cdist(queries, prototypes).argmin(dim=1)
        truth = torch.arange(WAYS).repeat_interleave(QUERIES)
        correct += int((predicted == truth).sum())
    return correct / (episodes * WAYS * QUERIES)


def check_batched_path(features, labels, episodes, seed):
    """evaluate_batch must predict what evaluate_episodes predicts (the 'same task' column)."""
    from fewshot.data.episodes import EpisodeSampler
    from fewshot.evaluation.evaluate import evaluate_batch, evaluate_episodes

    worst = 0.0
    for shots, metric in [(SHOTS, "l2"), (SHOTS, "cosine"), (5, "l2"), (5, "cosine")]:
        batch = EpisodeSampler(labels, ways=WAYS, shots=shots, queries=QUERIES, seed=seed).sample_batch(episodes)
        reference = evaluate_episodes(features, labels, batch.to_episodes(), metric=metric, progress=False)
        for n in (episodes, 8):  # many episodes: the Gram path; a few: the gather path
            got = evaluate_batch(features, labels, batch_head(batch, n), metric=metric)
            differ = float(np.mean(got.episode_accuracies != reference.episode_accuracies[:n]))
            if differ > 1e-3:
                raise AssertionError(f"evaluate_batch ({shots}-shot, metric={metric}, {n} episodes) disagrees "
                                     f"with evaluate_episodes on {differ:.2%} of episodes")
            worst = max(worst, differ)
    return reference.accuracy, {"differing_episodes": worst}


def batch_head(batch, n: int):
    from fewshot.data.episodes import EpisodeBatch

    return EpisodeBatch(batch.classes[:n], batch.support[:n], batch.query[:n])


ROWS = {
    "fewshot: sample_batch + evaluate_episodes": fewshot_evaluate_episodes,
    "fewshot: sample_batch + evaluate_batch": fewshot_evaluate_batch,
    "easyfsl 1.5.0: TaskSampler + DataLoader + PrototypicalNetworks, utils.evaluate": easyfsl_loop,
    "learn2learn 0.2.0: TaskDataset(NWays, KShots, LoadData, RemapLabels) + prototypes": learn2learn_loop,
}


def load_data(args) -> tuple[np.ndarray, np.ndarray, str]:
    if args.features is not None:
        features = np.load(args.features, allow_pickle=False).astype(np.float32)
        labels = np.unique(np.load(args.labels, allow_pickle=False), return_inverse=True)[1]
        return features, labels, f"{args.features} ({features.shape[0]} x {features.shape[1]} float32)"
    features, labels = synthetic()
    return features, labels, "synthetic: 50 classes x 60 items x 1280-d float32 (class centres + noise, seed 0)"


def spawn(args, row: str, episodes: int, reps: int) -> dict:
    command = [sys.executable, __file__, "--worker", row, "--episodes", str(episodes), "--reps", str(reps)]
    if args.features is not None:
        command += ["--features", str(args.features), "--labels", str(args.labels)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.threads:  # numpy's BLAS (the Gram matrix of evaluate_batch) gets the same thread count as torch
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        return {"row": row, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=10_000, help="episodes per fewshot run")
    parser.add_argument("--baseline-episodes", type=int, default=1_000, help="episodes per easyfsl / l2l run")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per row (after one warm-up run)")
    parser.add_argument("--features", type=Path, help="cached (N, dim) embeddings .npy (default: synthetic)")
    parser.add_argument("--labels", type=Path, help="(N,) labels .npy for --features")
    parser.add_argument("--threads", type=int, help="torch threads in every row (default: torch's default; on a "
                        "shared machine 1 avoids OpenMP threads spinning against other jobs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.features is None) != (args.labels is None):
        sys.exit("pass --features and --labels together")
    sys.path.append(str(BENCH_SITE))  # easyfsl (+ pandas) from `make bench-env`, after the venv's packages

    features, labels, described = load_data(args)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(run_row(args.worker, features, labels, args.episodes, args.reps)))
        return

    load_before = os.getloadavg()
    check = spawn(args, "check", args.episodes, 0)
    results = []
    for row in ROWS:
        n = args.episodes if row.startswith("fewshot") else args.baseline_episodes
        print(f"  timing {row} ...", file=sys.stderr, flush=True)
        results.append(spawn(args, row, n, args.reps))
    load_after = os.getloadavg()

    import torch

    print(f"\n### Episodic evaluation: {WAYS}-way {SHOTS}-shot {QUERIES}-query, nearest prototype (squared L2)\n")
    threads = results[0].get("threads", "?")
    print(f"data: {described}; torch {torch.__version__}, {os.cpu_count()} CPUs, {threads} torch threads; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
          + (" (SHARED/BUSY machine: compare ratios, not absolute numbers)"
             if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1) else ""))
    if "error" in check:
        print(f"\nWARNING: batched-path check failed: {check['error']}")
    else:
        print(f"evaluate_batch (Gram and gather paths) vs evaluate_episodes on {check['episodes']} episodes "
              f"(1-shot and 5-shot, l2 and cosine): "
              f"{check['differing_episodes']:.3%} of episodes differ (ties in float rounding)\n")
    rates = {r["row"]: r["episodes"] / statistics.median(r["seconds"]) for r in results if "error" not in r}
    easyfsl = next((rate for row, rate in rates.items() if row.startswith("easyfsl")), None)
    print("| implementation | episodes timed | episodes/s (median) | vs easyfsl | mean accuracy | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | - | failed: {r['error']} | - | - | - |")
            continue
        rate = rates[r["row"]]
        ratio = f"{rate / easyfsl:.1f}x" if easyfsl else "-"
        print(f"| {r['row']} | {r['episodes']} x {len(r['seconds'])} | {rate:,.0f} | {ratio} | {r['accuracy']:.2%} | "
              f"{r['peak_rss_mb']:.0f} |")
    print("\nTargets: >= 10,000 episodes/s and >= 20x easyfsl's loop. Peak RSS is the whole process "
          "(python + torch + the 15 MB embedding table).")


if __name__ == "__main__":
    main()
