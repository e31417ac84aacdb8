"""Train a head on one set of classes, then evaluate it on classes it never saw, against raw features.

    python examples/train_and_evaluate_head.py omniglot/images_background.zip --head protonet \
        --stages 2,3 --pool 7 --input-size 112 --episodes 2000
"""

import argparse

from fewshot import EpisodeSampler, create_encoder, evaluate_episodes, load_dataset, split_by_class, split_by_group
from fewshot.workflows import embed_dataset, train_head_on_dataset

parser = argparse.ArgumentParser()
parser.add_argument("data", help="dataset folder or zip: class folders, or group/class folders")
parser.add_argument("--head", default="protonet", help="identity, protonet, metric, anil or maml")
parser.add_argument("--ways", type=int, default=5)
parser.add_argument("--shots", type=int, default=1)
parser.add_argument("--episodes", type=int, default=1000, help="training episodes")
parser.add_argument("--test-fraction", type=float, default=0.3, help="share of classes (or groups) held out")
parser.add_argument("--stages", default=None, help="encoder stages, e.g. 2,3 (default: final features)")
parser.add_argument("--pool", default="avg", help="'avg' or a grid size")
parser.add_argument("--input-size", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

dataset = load_dataset(args.data)
if dataset.groups is not None:  # hold out whole groups (e.g. alphabets): a harder, honest split
    train, test = split_by_group(dataset, max(1, round(args.test_fraction * len(dataset.group_names))), seed=args.seed)
else:
    train, test = split_by_class(dataset, args.test_fraction, seed=args.seed)
encoder = create_encoder(stages=[int(s) for s in args.stages.split(",")] if args.stages else None,
                         pool=args.pool if args.pool == "avg" else int(args.pool), input_size=args.input_size)

head, training = train_head_on_dataset(train, encoder, args.head, ways=args.ways, shots=args.shots,
                                       episodes=args.episodes, seed=args.seed)
print(f"trained {args.head} on {len(train.classes)} classes; best validation accuracy {training.best_val_accuracy}")

features, test = embed_dataset(encoder, test)
ways = min(args.ways, len(test.classes))
episodes = EpisodeSampler(test.labels, ways=ways, shots=args.shots, queries=5, seed=args.seed).sample_many(300)
raw = evaluate_episodes(features, test.labels, episodes)
trained = evaluate_episodes(features, test.labels, episodes, head=head)
print(f"unseen classes, raw features: {raw.summary()}")
print(f"unseen classes, {args.head} head: {trained.summary()}")
