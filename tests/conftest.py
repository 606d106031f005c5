"""Shared fixtures: the reference vectors, Hypothesis profiles (dev / ci / expensive).

HYPOTHESIS_PROFILE picks the profile; with CI=true the default is `ci`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings


import resonant  # noqa: E402,F401  (the installed package, imported before the checkout is put on the path)

ROOT = Path(__file__).resolve().parent.parent
# Subprocesses (the CLI, fuzz targets, servers) import the same resonant as this process: an
# in-place build of the checkout, or the installed package, whichever the tests run.
_PACKAGE_ROOT = str(Path(resonant.__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                               if p and p != _PACKAGE_ROOT])
sys.path.insert(0, str(Path(__file__).parent))  # tests/strategies.py (generated)
sys.path.append(str(ROOT))  # `codegen` for its tests; appended, so it never shadows the installed `resonant`
VECTORS = Path(__file__).parent / "vectors" / "reference"
SHARED_VECTORS = ROOT.parent / "shared" / "vectors" / "reference"

settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile("ci", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
settings.register_profile("expensive", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))


def pytest_collection_modifyitems(config, items):
    """With RESONANT_PURE=1 (resonant.fast_paths() empty) the tests that assert a fast path is
    taken (marker fast_paths) are skipped."""
    if resonant.fast_paths():
        return
    skip = pytest.mark.skip(reason="RESONANT_PURE=1: the fast paths are off")
    for item in items:
        if "fast_paths" in item.keywords:
            item.add_marker(skip)


def load_manifest() -> list[dict]:
    return json.loads((VECTORS / "manifest.json").read_text())["vectors"]


MANIFEST = load_manifest()


def vector_bytes(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


@pytest.fixture(params=[v["file"] for v in MANIFEST])
def vector(request):
    entry = next(v for v in MANIFEST if v["file"] == request.param)
    return entry, vector_bytes(entry["file"])
