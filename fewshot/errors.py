"""Typed exceptions of fewshot, all in one place.

Every error a user can cause subclasses ``FewShotError`` and, where the cause is a bad
argument or a bad file, ``ValueError`` too, so ``except ValueError`` keeps working.
Messages say what went wrong *and* what to do about it.
"""

from __future__ import annotations


class FewShotError(Exception):
    """Base class of every error raised on purpose by fewshot."""


class ImageError(FewShotError, ValueError):
    """An input could not be read as an image (missing, not an image, truncated, too large)."""


class WeightsError(FewShotError, ValueError):
    """Encoder weights are missing, unreadable or do not fit the model."""


class EncoderMismatchError(FewShotError, ValueError):
    """A registry (or cache entry) was built with a different encoder than the one in use."""


class RegistryError(FewShotError):
    """Base class of registry problems."""


class RegistryFormatError(RegistryError, ValueError):
    """A registry on disk is missing, corrupt, tampered with, or from an unsupported format version."""


class RegistrySaveError(RegistryError, OSError):
    """Saving a registry failed; the previously saved registry is left intact."""


class RegistryLockedError(RegistryError):
    """Another writer (a process, or another open registry object) has the registry open for writing."""


class HeadFormatError(FewShotError, ValueError):
    """A saved head is missing, corrupt, tampered with, or from an unsupported format version."""


class UnknownClassError(FewShotError, ValueError):
    """A class name that the registry does not hold."""


class DuplicateClassError(FewShotError, ValueError):
    """A class name that the registry already holds, where a new one was expected."""


class ExportError(FewShotError):
    """A model could not be exported to ONNX, or the export folder cannot be written as asked."""
