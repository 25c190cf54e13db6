"""The examples in the docstrings of every smap and sharding module run and print what they say.

``doctest.testmod`` skips objects whose ``__module__`` names another module,
and smap reports its public classes at their public location
(``smap.State``, ``smap.transform.StatefulMapping``), so the examples are
collected from every class and function *defined* in each module's file.
"""

import doctest
import importlib
import inspect
import pathlib
import re

import pytest


def _modules() -> list[str]:
    """Every module of the two packages, found from their files (a new module is never left out)."""
    names = []
    for package in ("smap", "sharding"):
        root = pathlib.Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules()
# The modules with examples in their docstrings (the others re-export names, or are internals with none).
WITH_EXAMPLES = [
    name
    for name in MODULES
    if any(line.strip().startswith(">>>") for line in inspect.getsource(importlib.import_module(name)).splitlines())
]


def _defined_in(obj, module, source):
    if inspect.isfunction(obj):
        return obj.__code__.co_filename == module.__file__
    if inspect.isclass(obj):
        return re.search(rf"^class {re.escape(obj.__name__)}\b", source, re.MULTILINE) is not None
    return False


def _doctests(module):
    source = inspect.getsource(module)
    tests = doctest.DocTestFinder(recurse=False).find(module)
    finder = doctest.DocTestFinder()
    seen = set()
    for attr, obj in sorted(vars(module).items(), key=lambda item: (item[0].startswith("_"), item[0])):
        if id(obj) not in seen and _defined_in(obj, module, source):
            seen.add(id(obj))
            tests.extend(finder.find(obj, f"{module.__name__}.{attr}", module=False, globs={}))
    return [t for t in tests if t.examples]


def _run(module):
    runner = doctest.DocTestRunner(verbose=False)
    for test in _doctests(module):
        runner.run(test)
    return runner.summarize(verbose=False)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = _run(module)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_every_example_in_the_package_is_collected():
    """No example is skipped: collected examples equal the '>>>' lines in each file."""
    for name in MODULES:
        module = importlib.import_module(name)
        prompts = sum(1 for line in inspect.getsource(module).splitlines() if line.strip().startswith(">>>"))
        collected = sum(len(t.examples) for t in _doctests(module))
        # An example may continue over '...' lines; each starts with one '>>>'.
        assert collected == prompts, f"{name}: {collected} examples collected, {prompts} in the source"


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_testmod(name):
    """doctest.testmod itself (which sees fewer examples) also reports no failure."""
    result = doctest.testmod(importlib.import_module(name), verbose=False, report=False)
    assert result.failed == 0
