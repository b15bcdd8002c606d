"""The examples a reader copies run as written: the README's "Ten lines of Python" and every `>>>` example in
the packages' docstrings."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The ```python block under the README's "## Ten lines of Python"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Ten lines of Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one ```python block in the section, found {len(blocks)}"
    return blocks[0]


@pytest.mark.usefixtures("one_thread")  # a few seconds on one thread; spinning threads on busy cores are slower
def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run folder (runs/...) lands here
    code, scope = readme_example(), {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["info"]["text"].endswith("d") and scope["reward"] == 0.0  # one token of 3: no score yet
    result = scope["result"]
    budget = int(re.search(r"total_timesteps=(\d+)", code).group(1))
    assert result["global_step"] == budget and not result["interrupted"], result
    assert (tmp_path / result["run_dir"] / "checkpoint.pt").is_file(), result["run_dir"]


def modules_with_examples() -> list[str]:
    """The modules of textenv/ and agents/ whose source holds a `>>>` line."""
    found = []
    for package in ("textenv", "agents"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if re.search(r"^\s*>>> ", path.read_text(), flags=re.M):
                found.append(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
    return found


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    prompts = len(re.findall(r"^\s*>>> ", Path(module.__file__).read_text(), flags=re.M))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    # every `>>>` line of the file ran (an example doctest cannot find, e.g. in a comment, would be a silent pass)
    assert result.failed == 0 and result.attempted == prompts, (result, prompts)


def test_the_examples_a_reader_meets_first_are_found():
    assert {"textenv.env", "textenv.char_tokenizer"} <= set(modules_with_examples())
