"""scripts/bench-rbd's figures: each side must have taken its path, ratios per round."""

from __future__ import annotations

import pytest

from minidriver.bench.harness import BenchError
from minidriver.bench.rbd import check_path, render, summary
from minidriver.steps import StepTimer


def timings(**seconds: float) -> dict[str, float]:
    base = StepTimer().as_dict()
    return {**dict.fromkeys(base, 0.0), **seconds}


CLONE = timings(clone=0.02, resize=0.01, start=0.5, total=1.0)
IMPORT = timings(**{"import": 0.06}, resize=0.01, start=0.5, total=1.1)
COLD = timings(fetch=0.1, convert=0.1, **{"import": 0.06}, resize=0.01, start=0.5, total=1.3)


def test_each_side_must_take_its_own_path() -> None:
    check_path("clone", CLONE)
    check_path("import", IMPORT)
    check_path("fetch + import", COLD)
    with pytest.raises(BenchError, match="import: clone/fetch/import took"):
        check_path("import", COLD)  # the base was not cached: not what "import" means
    with pytest.raises(BenchError, match="clone"):
        check_path("clone", IMPORT)


def test_summary_compares_to_the_clone_round_by_round() -> None:
    result = summary({"clone": [CLONE], "import": [IMPORT], "fetch + import": [COLD]})
    assert result["clone"]["spawn_ratio"]["median"] == 1.0
    assert result["import"]["spawn"]["median"] == 1.1
    assert result["fetch + import"]["root_disk"]["median"] == pytest.approx(0.27)
    assert result["fetch + import"]["root_disk_ratio"]["median"] == pytest.approx(9.0)
    text = render(result, 1, "guest.qcow2")
    assert "fetch + import" in text
    assert "9.00x" in text
