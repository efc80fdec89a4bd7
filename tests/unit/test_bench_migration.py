"""scripts/bench --only migration: never in a full run or --quick, alone, and its
table (the moves themselves need root and a second libvirtd: run by hand, figures in
the README)."""

from __future__ import annotations

import pytest

from minidriver.bench import livemigration, spawn


def test_migration_runs_alone_and_never_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert "migration" not in spawn.SCENARIOS  # so neither a full run nor --quick has it
    with pytest.raises(SystemExit) as exc:
        spawn.main(["--only", "migration", "--only", "phases"])
    assert exc.value.code == 2
    assert "--only migration runs alone" in capsys.readouterr().err


def test_the_table_gives_medians_each_way() -> None:
    stat = {"median": 3.0, "min": 2.5, "max": 4.0, "mean": 3.1, "stdev": 0.5}
    section = {"t1.nano": {"ram_mb": 128, "to_dev_host": stat, "to_this_host": stat}}
    text = livemigration.render(section, 3)
    assert "median (min..max) of 3 runs each way" in text
    assert "t1.nano" in text and "128 MB" in text and "3.00 s (2.50..4.00)" in text
    assert set(livemigration.FLAVORS.values()) == {128, 1024}
