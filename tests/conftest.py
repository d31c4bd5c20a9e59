"""Shared test helpers: paths to the repository and to ../shared (present in CI, absent in a user's clone),
and real prose that every clone has (the embedded corpus)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cramming.data.sources import SourceStats, embedded_files, iter_embedded

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Characters taken from each embedded file by `embedded_prose` (six files: ~200 KB in all).
PROSE_CHARS_PER_FILE = 34_000


_HF_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """`cram glue` scores through an `evaluate` module, which evaluate copies into its caches under
    HF_HOME: point those at a folder of this test session so tests never write to the user's home."""
    cache = tempfile.mkdtemp(prefix="cramming-tests-hf-")
    config.stash[_HF_CACHE] = cache
    os.environ.setdefault("HF_MODULES_CACHE", os.path.join(cache, "modules"))
    os.environ.setdefault("HF_METRICS_CACHE", os.path.join(cache, "metrics"))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(config.stash.get(_HF_CACHE, ""), ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads fight.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder beside the checkout; tests that need it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists in CI, not in a user's clone)")
    return SHARED


def _middle_units(name: str, chars: int) -> list[str]:
    """Whole units from the middle of one embedded file, up to `chars` characters; a unit that does
    not fit is cut at its last sentence end that does, and ends the selection."""
    units = list(iter_embedded([name], SourceStats()))
    taken: list[str] = []
    for unit in units[len(units) // 2:]:
        if len(unit) > chars:
            cut = unit.rfind(". ", 0, chars)
            if cut > 0:
                taken.append(unit[: cut + 1])
            break
        taken.append(unit)
        chars -= len(unit)
    return taken


@pytest.fixture(scope="session")
def embedded_prose() -> list[str]:
    """About 450 documents of real prose (6 to 34,000 characters, ~200 KB) from the shipped corpus,
    chosen like ../shared/data/corpus/sample.txt (middle units of each file), so that tests needing
    varied text run in any clone."""
    names = [path.name.removesuffix(".txt.xz") for path in embedded_files()]
    return [unit for name in names for unit in _middle_units(name, PROSE_CHARS_PER_FILE)]
