"""Lazy package exports: names are imported on first use and unknown names fail as for any module."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_a_name_is_imported_on_first_use_only():
    code = ("import sys, fewshot.embedding as e; assert 'fewshot.embedding.views' not in sys.modules; "
            "assert 'SUPPORT_VIEWS' in dir(e); e.SUPPORT_VIEWS; assert 'fewshot.embedding.views' in sys.modules; "
            "assert 'SUPPORT_VIEWS' in vars(e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_an_unknown_name_is_an_attribute_error_naming_the_package():
    import fewshot.learning

    with pytest.raises(AttributeError, match="module 'fewshot.learning' has no attribute 'nope'"):
        fewshot.learning.nope  # noqa: B018
