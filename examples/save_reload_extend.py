"""Save a registry, reload it later (e.g. in another process), add a class, and predict.

    python examples/save_reload_extend.py shop.reg --first mug/*.jpg --second cup/*.jpg --query new.jpg
"""

import argparse

from fewshot import FewShotClassifier

parser = argparse.ArgumentParser()
parser.add_argument("registry", help="where to save the registry (a directory)")
parser.add_argument("--first", nargs="+", required=True, help="images of the class registered first")
parser.add_argument("--second", nargs="+", required=True, help="images of the class added after reloading")
parser.add_argument("--query", nargs="+", required=True, help="images to predict")
args = parser.parse_args()

classifier = FewShotClassifier()
classifier.register("first", args.first)
classifier.save(args.registry)  # atomic: a crash leaves the old or the new registry

reloaded = FewShotClassifier.load(args.registry)  # re-creates the encoder it was built with
reloaded.register("second", args.second)  # no retraining: just a new prototype
reloaded.save(args.registry)

for prediction in FewShotClassifier.load(args.registry).predict(args.query, top_k=2):
    print(prediction.input, prediction.label, f"{prediction.score:.2f}", prediction.top_k)
