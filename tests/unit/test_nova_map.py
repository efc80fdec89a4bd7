"""The map of Nova's functions: the README's copy is the code's, and every entry names
a file of Nova's tree and what minidriver does there."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from minidriver import nova_map

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_section() -> str:
    text = README.read_text()
    start = text.index("## How the flow maps to Nova\n")
    end = text.index("\n## ", start + 1)
    section = text[start:end]
    return section[section.index("| Operation |") :].rstrip("\n") + "\n"


def test_readme_table_is_the_code_table() -> None:
    assert readme_section() == nova_map.markdown_table(), (
        "README.md's table drifted from minidriver/nova_map.py: paste"
        " nova_map.markdown_table() into the section"
    )


def test_every_operation_the_issue_lists_is_mapped() -> None:
    operations = {s.operation for s in nova_map.NOVA_STEPS}
    assert operations >= {
        "spawn",
        "destroy",
        "snapshot",
        "suspend",
        "resume",
        "attach",
        "detach",
        "image cache",
    }
    assert any("configdrive.py:ConfigDriveBuilder" in s.nova for s in nova_map.NOVA_STEPS)


def test_every_entry_names_a_file_of_nova_and_a_function() -> None:
    for s in nova_map.NOVA_STEPS:
        for ref in s.nova.split("; "):
            path, _, functions = ref.partition(":")
            assert re.fullmatch(r"nova/[a-z_/]+\.py", path), s
            assert functions.strip(), s


def test_every_minidriver_module_named_exists() -> None:
    package = Path(nova_map.__file__).parent
    for s in nova_map.NOVA_STEPS:
        for path in re.findall(r"[a-z_/]+\.py\b", s.minidriver):
            assert (package / path).is_file(), s
        for dotted in re.findall(
            r"(?<![/.\w])([a-z_]+)\.([A-Za-z_]+(?:\.[A-Za-z_]+)?)(?![\w.])", s.minidriver
        ):
            module, attrs = dotted
            if attrs == "py":
                continue
            obj = importlib.import_module(f"minidriver.{module}")
            for part in attrs.split("."):
                obj = getattr(obj, part)


def test_explain_lines_put_each_step_beside_its_nova_function() -> None:
    text = nova_map.text_table("spawn")
    lines = text.splitlines()
    wait = next(i for i, line in enumerate(lines) if line.strip().startswith("wait for RUNNING"))
    assert "_wait_for_boot" in lines[wait]
    assert lines[wait + 1].strip().startswith("differs: a deadline")
    assert "destroy" not in text


def test_every_step_explain_names_is_in_the_table() -> None:
    for name in (
        nova_map.ROOT,
        nova_map.KERNEL,
        nova_map.EPHEMERAL,
        nova_map.SWAP,
        nova_map.DISK,
        nova_map.FETCH,
        nova_map.RBD,
    ):
        assert nova_map.step(name).operation == "spawn"
    with pytest.raises(KeyError):
        nova_map.step("no such step")
