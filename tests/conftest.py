"""Shared fixtures: the real Lite0 encoder, real bundled photos, a real Caltech-101 subset."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CALTECH_ZIP = SHARED / "caltech101" / "caltech101_base.zip"
OMNIGLOT_SMALL_ZIP = SHARED / "omniglot" / "images_background_small1.zip"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never read or fill the user's embedding cache."""
    os.environ["FEWSHOT_CACHE_DIR"] = str(tmp_path_factory.mktemp("fewshot-cache"))


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one torch thread is fastest, and robust on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def encoder():
    from fewshot import create_encoder

    return create_encoder()


@pytest.fixture(scope="session")
def photo_root() -> Path:
    """scikit-image's bundled sample photos: real PNG/JPEG files on disk."""
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def photos(photo_root) -> dict[str, Path]:
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "coins.png", "camera.png"]
    return {Path(n).stem: photo_root / n for n in names}


@pytest.fixture(scope="session")
def views_of():
    """``views_of(path, n, seed)``: different crops/flips of one photo, the same "thing" seen again."""
    return _views_of


def _views_of(path: Path, n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    views = []
    for _ in range(n):
        s = rng.uniform(0.6, 0.85)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = img.crop((x, y, x + cw, y + ch))
        views.append(view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view)
    return views


@pytest.fixture(scope="session")
def caltech_subset(tmp_path_factory) -> Path:
    """A few Caltech-101 classes extracted from ../shared/datasets (skips where absent)."""
    if not CALTECH_ZIP.is_file():
        pytest.skip(f"Caltech-101 subset not found at {CALTECH_ZIP} (needs ../shared/datasets beside the repo)")
    root = tmp_path_factory.mktemp("caltech")
    wanted = ["bonsai", "camera", "elephant", "grand_piano", "pizza", "revolver", "strawberry", "umbrella"]
    per_class: dict[str, int] = {}
    with zipfile.ZipFile(CALTECH_ZIP) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) != 3 or parts[1] not in wanted or not parts[2].endswith(".jpg"):
                continue
            if per_class.get(parts[1], 0) >= 6:
                continue
            per_class[parts[1]] = per_class.get(parts[1], 0) + 1
            target = root / parts[1] / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    if len(per_class) < 5:
        pytest.skip(f"expected Caltech classes {wanted} in {CALTECH_ZIP}, found {sorted(per_class)}")
    return root


@pytest.fixture(scope="session")
def omniglot_small() -> Path:
    """Omniglot's official 5-alphabet "small1" background split (a zip, read in place)."""
    if not OMNIGLOT_SMALL_ZIP.is_file():
        pytest.skip(f"Omniglot not found at {OMNIGLOT_SMALL_ZIP} (needs ../shared/datasets beside the repo)")
    return OMNIGLOT_SMALL_ZIP


@pytest.fixture
def corrupt_jpeg(tmp_path) -> Path:
    """A real JPEG cut in half: the kind of file a failed upload leaves behind."""
    path = tmp_path / "broken.jpg"
    Image.new("RGB", (200, 200), (10, 200, 30)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def run_on_a_terminal():
    """``run_on_a_terminal(*argv) -> (exit status, stdout, what the terminal showed)``."""
    return _run_on_a_terminal


def _run_on_a_terminal(*argv) -> tuple[int, str, str]:
    """Run the fewshot command with stderr on a pseudo-terminal, as in an interactive shell."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 x 120, as a real one
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the command has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    out = proc.stdout.read().decode()
    return proc.wait(), out, b"".join(chunks).decode(errors="replace")
