"""The template benchmark's report (pure) and its place in ``scripts/bench``'s options;
its measurements need the Debian guest under QEMU and run only when asked for."""

from __future__ import annotations

import pytest

from minidriver.bench import spawn
from minidriver.bench import template as bench


def stat(median: float) -> dict[str, float]:
    return {"min": median * 0.9, "median": median, "max": median * 1.1, "n": 3}


def section(boot: float, clone: float) -> dict[str, object]:
    ram = {
        str(mb): {
            "boot_to_ssh": 80.0,
            "save": 2.0,
            "memory_bytes": 200 * 2**20,
            "save_copy": stat(0.2),
            "restore": stat(1.5),
            "set_time": stat(0.1),
            "total": stat(2.0),
            "ssh": stat(clone),
        }
        for mb in bench.RAM_MB
    }
    return {
        "boot_vs_clone": {
            "flavor": "bench.deb1024",
            "boot": stat(boot),
            "clone": stat(clone),
            "ratio": stat(boot / clone),
            "goal": bench.GOAL,
        },
        "restore_vs_ram": ram,
    }


@pytest.mark.parametrize(("boot", "clone", "verdict"), [(80.0, 2.0, "met"), (80.0, 8.0, "not met")])
def test_the_report_gives_the_ratio_and_the_goal(boot: float, clone: float, verdict: str) -> None:
    text = bench.render(section(boot, clone))
    assert f"{boot / clone:.2f}x" in text
    assert text.splitlines()[5].endswith(f": {verdict}")
    for mb in bench.RAM_MB:
        assert f"{mb} MB" in text
    assert "200 MiB" in text


def test_flavors_differ_only_in_ram() -> None:
    flavors = list(bench.BENCH_FLAVORS.values())
    assert [f.memory_mb for f in flavors] == list(bench.RAM_MB)
    assert {(f.vcpus, f.root_gb) for f in flavors} == {(1, bench.ROOT_GB)}


def test_template_runs_alone_and_never_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert "template" not in spawn.SCENARIOS  # so neither a full run nor --quick has it
    with pytest.raises(SystemExit) as exc:
        spawn.main(["--only", "template", "--only", "phases"])
    assert exc.value.code == 2
    assert "--only template runs alone" in capsys.readouterr().err
