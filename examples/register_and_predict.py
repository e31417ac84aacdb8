"""Register classes from a folder (one subfolder per class) using a few images each; predict the rest.

    python examples/register_and_predict.py photos/ --shots 3
"""

import argparse

from fewshot import FewShotClassifier
from fewshot.data.datasets import class_folders, support_query_split

parser = argparse.ArgumentParser()
parser.add_argument("folder", help="one subfolder of images per class")
parser.add_argument("--shots", type=int, default=3, help="images registered per class")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

support, query = support_query_split(class_folders(args.folder), shots=args.shots, seed=args.seed)
classifier = FewShotClassifier()  # ImageNet EfficientNet-Lite0, offline
for label, images in support.items():
    classifier.register(label, images)

paths = [path for paths in query.values() for path in paths]
truth = [label for label, paths in query.items() for _ in paths]
predictions = classifier.predict(paths, top_k=3)
for path, prediction in zip(paths, predictions):
    print(f"{path}: {prediction.label} ({prediction.score:.2f})")
correct = sum(p.label == t for p, t in zip(predictions, truth))
print(f"accuracy: {correct}/{len(truth)} = {correct / len(truth):.1%}")
