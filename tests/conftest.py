import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs two workers on this two-core machine: one torch thread each, or their thread
    # pools spin against each other.
    torch.set_num_threads(1)

# The cache the setup fetched the real teacher and data into; tiny-model tests get an empty one.
REAL_CACHE = os.environ.get("PDQ_CACHE") or str(Path.home() / ".cache" / "pdq-compress")


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Tests never read or write the user's cache, except those marked real_teacher."""
    if request.node.get_closest_marker("real_teacher"):
        monkeypatch.setenv("PDQ_CACHE", REAL_CACHE)
        return
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("PDQ_CACHE", str(cache))
    # Every run is also measured on the general evaluation set: its sources (fetched by the setup, under 1 MB)
    # are linked in read-only, so tiny runs measure on real general English without fetching anything.
    from compress.sources.corpora import CORPORA, GENERAL_EVAL

    (cache / "data" / "sources").mkdir(parents=True)
    for source in CORPORA[GENERAL_EVAL].sources:
        fetched = Path(REAL_CACHE) / "data" / "sources" / f"{source}.jsonl"
        if fetched.exists():
            (cache / "data" / "sources" / f"{source}.jsonl").symlink_to(fetched)
