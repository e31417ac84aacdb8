"""Class thumbnails: one small JPEG per class, kept in the registry (``Registry.set_thumbnail``) so that
a page or an app can show what each class looks like without keeping the user's photos."""

from __future__ import annotations

import io

from PIL import Image

from ..embedding.images import ImageInput, load_image

THUMBNAIL_SIZE = 128  # pixels on the longer side
_QUALITY = 80


def make_thumbnail(item: ImageInput, size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG of ``item`` (path, bytes, PIL image or array) at most ``size`` pixels on its longer side.

    Decoded with ``fewshot.embedding.images.load_image``, so bad or hostile inputs raise ``ImageError``."""
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 256:
        raise ValueError(f"thumbnail size must be an integer in 16..256, got {size!r}")
    image = load_image(item, min_size=size)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=_QUALITY, optimize=True)
    return out.getvalue()
