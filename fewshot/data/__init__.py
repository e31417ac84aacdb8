"""Data: image datasets (folders and zips, class and group splits) and the episodes drawn from them.

The input of both learning and evaluation. Modules: ``datasets`` (``ImageDataset``, ``load_dataset``, splits,
rotations, embedding a dataset), ``episodes`` (the seeded sampler, saved episode manifests, open-set episodes),
``protocols`` (benchmark protocol files, fixed-episode runs). Imports numpy and the image decoder only (cheap).
"""

from .datasets import ImageDataset as ImageDataset
from .datasets import load_dataset as load_dataset
from .datasets import split_by_class as split_by_class
from .datasets import split_by_group as split_by_group
from .episodes import Episode as Episode
from .episodes import EpisodeSampler as EpisodeSampler
from .episodes import OpenSetEpisode as OpenSetEpisode
from .episodes import load_episodes as load_episodes
from .episodes import sample_open_set as sample_open_set
from .episodes import save_episodes as save_episodes
from .protocols import Protocol as Protocol
from .protocols import load_fixed_runs as load_fixed_runs
from .protocols import load_protocol as load_protocol
from .protocols import write_fixed_runs as write_fixed_runs

__all__ = ["Episode", "EpisodeSampler", "ImageDataset", "OpenSetEpisode", "Protocol", "load_dataset", "load_episodes",
           "load_fixed_runs", "load_protocol", "sample_open_set", "save_episodes", "split_by_class", "split_by_group",
           "write_fixed_runs"]
