"""The README's Python examples run as written (except blocks marked as not run)."""

import re

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"(<!-- not run[^>]*-->\n)?```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_python_examples():
    assert sum(1 for skip, _ in BLOCKS if not skip) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    skip, code = BLOCKS[index]
    if skip:
        pytest.skip(skip.strip())
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md block {index}", "exec"), {})
    assert (tmp_path / "my_ensemble" / "manifest.json").exists()
