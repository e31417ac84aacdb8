"""Vector checks and row arithmetic of the prototype table: finite rows of the right dimension,
normalised in chunks, in arrays that grow in place."""

from __future__ import annotations

import numpy as np

METRICS = ("cosine", "l2")  # "l2" = squared Euclidean
MAX_DIM = 65536
CHUNK_FLOATS = 2**22  # rows are normalised / copied in chunks of about 16 MiB of float32


def chunk_rows(dim: int) -> int:
    """Rows per chunk of ``dim``-dimensional float32 work, so temporaries stay bounded."""
    return max(1, CHUNK_FLOATS // max(1, dim))


def all_finite(arr: np.ndarray) -> bool:
    """np.isfinite(arr).all() without a full-size boolean temporary."""
    step = chunk_rows(arr.shape[1]) if arr.ndim == 2 else len(arr) or 1
    return all(np.isfinite(arr[a:a + step]).all() for a in range(0, len(arr), step))


def as_matrix(vectors, dim: int, what: str, *, copy: bool = True) -> np.ndarray:
    """Return a C-contiguous (n, dim) float32 array (a fresh copy unless copy=False and the input
    already is one), or raise ValueError naming `what`."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is caught below
            arr = np.array(vectors, dtype=np.float32, copy=True if copy else None, order="C")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: vectors must be a numeric array ({e})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"{what}: expected shape (dim,) or (n, dim) with n >= 1, got {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"{what}: expected dim {dim}, got {arr.shape[1]}; "
                         "vectors must come from the same encoder")
    if not all_finite(arr):
        raise ValueError(f"{what}: vectors contain NaN or infinity")
    return np.ascontiguousarray(arr)


def row_norms(x: np.ndarray) -> np.ndarray:
    """Row norms in float64, chunked (no full-size float64 copy)."""
    step = chunk_rows(x.shape[1])
    return np.concatenate([np.linalg.norm(x[a:a + step].astype(np.float64), axis=1)
                           for a in range(0, len(x), step)]) if len(x) else np.zeros(0)


def normalise_rows(x: np.ndarray, what: str) -> np.ndarray:
    """Unit-length rows (cosine); a zero row raises ValueError naming ``what``."""
    norms = row_norms(x)
    if (norms == 0).any():
        raise ValueError(f"{what}: a zero vector has no direction, so cosine similarity is undefined")
    return divide_rows(x, norms)


def divide_rows(x: np.ndarray, norms: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32(x / norms) computed in float64, chunked; rows with norm 0 become zeros."""
    out = np.empty(x.shape, np.float32) if out is None else out
    step = chunk_rows(x.shape[1])
    for a in range(0, len(x), step):
        n = norms[a:a + step, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a:a + step] = np.where(n > 0, x[a:a + step] / n, 0.0)
    return out


def grown_array(arr: np.ndarray, cap: int, fill=0) -> np.ndarray:
    """arr with room for cap rows. In place where numpy can (realloc: large blocks are moved by the
    OS, not copied, so growing a 5 GB array does not need 10 GB); the registry never lets views of
    its arrays escape its lock, which is what makes ``refcheck=False`` safe here."""
    old = len(arr)
    if arr.flags.owndata and arr.base is None and arr.flags.c_contiguous:
        try:
            arr.resize((cap,) + arr.shape[1:], refcheck=False)
            if fill:
                arr[old:] = fill
            return arr
        except (ValueError, MemoryError):
            pass
    new = np.full((cap,) + arr.shape[1:], fill, arr.dtype)
    new[:old] = arr
    return new
