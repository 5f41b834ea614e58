"""The suite passes from a plain ``git clone``: no test reads the ``shared`` folder that
sits beside the checkout on developers' machines. Fixtures live in ``tests/fixtures/``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# "shared" as a path component: "<up>/shared", "shared/fixtures", a parents[N] join, ...
SHARED = re.compile(r"(^|[/\\])shared([/\\]|$)")


def shared_paths(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant in ``source`` that names a ``shared`` folder."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for line in node.value.splitlines() or [""]:
                if SHARED.search(line.strip()):
                    found.append((node.lineno, node.value))
                    break
    return found


def test_the_check_finds_the_ways_a_path_is_built() -> None:
    assert shared_paths('P = Path(__file__).parents[3] / "' + 'shared" / "fixtures"')
    assert shared_paths('P = ROOT / "' + ".." + '/shared/fixtures/istio-onboarding"')
    assert shared_paths('P = os.path.join(HERE, "..", "..", "shared", "reference")')
    assert not shared_paths('HOST = "shared.example.com"; doc = """shared in-flight requests"""')


def test_no_test_reads_the_shared_folder() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if path == Path(__file__).resolve():
            continue
        for line, text in shared_paths(path.read_text()):
            offenders.append(f"{path.relative_to(TESTS)}:{line}: {text!r}")
    assert not offenders, (
        "tests must not read the shared folder beside the clone (a plain clone has none); "
        "copy what they need into tests/fixtures/:\n" + "\n".join(offenders)
    )
