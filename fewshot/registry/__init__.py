"""Persistent class registry: per-class prototypes plus a FAISS index for top-k search.

The registry knows nothing of images or encoders: it takes and returns numpy arrays and keeps an
opaque JSON-able ``fingerprint`` of the encoder that produced them. It holds work users cannot
easily redo, so saving is crash-safe (generation-numbered data files, then an atomically replaced
manifest, fsynced in that order) and loading is paranoid (sizes and sha256 checked before any data
file is parsed; the manifest checks itself). ``Registry.open`` binds a registry to its directory:
each change is saved before it returns, under a writer lock (``fewshot.registry.locking``) that keeps a
second writer out while readers go on; readers pin the generation they read (a shared lock held only
while they open its files) and writers delete older generations only when no reader is opening them,
so a reader gets a complete generation however big the registry and however often it is saved.
Nothing is ever unpickled: the formats are JSON, ``.npy`` read without pickle, and
``faiss.serialize_index`` bytes.

Scale: prototypes live in one growable ``(capacity, dim)`` float32 array (measured ~1.1x
``4 * dim`` bytes per class at 1M x 1280, index included), so a million classes load and save in
seconds without per-class array objects. With ``index="auto"`` (the default) searches are exact
(FAISS ``Flat``) while the registry is small, and from ``auto_threshold`` prototypes on scan 4-bit
fast-scan product-quantised codes of every prototype (2 dimensions per sub-quantiser; above 512
dimensions, of a projection onto the 512 principal directions: ``PCAR512,IVF{~sqrt(n)/4},PQ256x4fs``,
128 bytes a prototype), whose best 256 candidates are re-scored exactly against the stored
prototypes, so scores are always exact; only the candidate set is approximate. Partitions (IVF with
few lists probed, also with an HNSW coarse quantiser), graphs (HNSW, flat or on PCA vectors), OPQ and
coarser codes all lost the exact top-1 far more often on diffuse embeddings for the same time.
``benchmarks/registry_scale.py`` has the recall, speed and memory figures behind these choices.

Modules, one concern each: ``table`` (the Registry: prototype table, running means, examples and
other class data), ``index`` (FAISS index choice and auto sizing, search with exact re-scoring),
``persistence`` (save, load, the bound mode of ``Registry.open``), ``manifest`` (format version,
seal, paranoid parse), ``storage`` (atomic writes, generations, verified reads), ``locking`` (the writer
lock and reader pins), ``labels`` (labels, example sources, thumbnails' limits), ``vectors`` (vector checks,
row arithmetic), ``calibration`` (the unknown threshold fitted from the examples, and the softmax temperature),
``hygiene`` (near-duplicate classes, likely mislabelled examples), ``thumbnails`` (one small JPEG per class).
The registry stage imports the embedding stage's image decoder only (for thumbnails), nothing above it.
"""

from .calibration import Calibration, calibrate, current_calibration, fit_calibration
from .hygiene import Finding, diagnose
from .index import (
    AUTO,
    AUTO_FLAT_FLOATS,
    AUTO_PCA_DIM,
    AUTO_RERANK,
    AUTO_SCAN_CODES,
    AUTO_TRAIN_PER_LIST,
    MIN_AUTO_THRESHOLD,
    SERIAL_SEARCH_BELOW,
    SearchResult,
    openmp_threads,
)
from .labels import (
    MAX_LABEL_LEN,
    MAX_SOURCE_LEN,
    MAX_THUMBNAIL_BYTES,
    UNRECORDED,
    ExampleSource,
    check_label,
    check_thumbnail,
)
from .manifest import FORMAT_VERSION
from .storage import FORMAT_NAME, MANIFEST, MAX_ATTACHMENT_BYTES, MAX_MANIFEST_BYTES, lock_registry_dir
from .table import Registry
from .vectors import MAX_DIM, METRICS

__all__ = [
    "Calibration", "Finding", "calibrate", "current_calibration", "diagnose", "fit_calibration",
    "AUTO", "AUTO_FLAT_FLOATS", "AUTO_PCA_DIM", "AUTO_RERANK", "AUTO_SCAN_CODES", "AUTO_TRAIN_PER_LIST", "FORMAT_NAME",
    "FORMAT_VERSION", "MANIFEST", "MAX_ATTACHMENT_BYTES", "MAX_DIM", "MAX_LABEL_LEN", "MAX_MANIFEST_BYTES",
    "MAX_SOURCE_LEN", "MAX_THUMBNAIL_BYTES", "METRICS", "MIN_AUTO_THRESHOLD", "SERIAL_SEARCH_BELOW", "openmp_threads",
    "UNRECORDED", "ExampleSource", "Registry", "SearchResult", "check_label", "check_thumbnail",
    "lock_registry_dir",
]
