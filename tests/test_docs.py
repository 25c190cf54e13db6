"""The documentation runs: every ```python block of every Markdown file.

For each Markdown file under ``docs/`` (and the root ``README.md``), the
```python blocks are run in order, in one namespace shared by the blocks of
that file, in a fresh interpreter (a subprocess with 8 emulated CPU devices).
When a python block is immediately followed by a ```text block (nothing but
blank lines between them), what the python block prints must equal the text
block's content, with two allowances:

- whitespace at the end of lines, and blank lines at the very end, are ignored;
- ``...`` in the text block matches any text, newlines included (as
  doctest's ELLIPSIS option), for output that is not deterministic such as
  function addresses or JAX-version-dependent jaxprs.

A block opened with ```python no-run is shown to readers but not run.
A python block with no text block after it only has to run without error.

A block opened with ```python launch processes=N devices=M is a whole
program for several processes: it runs on its own, as N processes with M
emulated CPU devices each, through ``scripts/launch_local.py`` (bounded in
time), and must exit without error; the lines of the text block after it
must appear, in order, among the lines the processes print (``[p0] ...``;
the processes' logs interleave with them).

Every ``python scripts/<name>.py --flag ...`` command quoted in the docs
names a script that exists and flags that its ``--help`` lists.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
PYTHON_LANGS = {"python", "py", "python3"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclasses.dataclass
class Block:
    lang: str  # first word of the info string, lower case
    options: list[str]  # the rest of the info string
    code: str
    line: int  # line of the opening fence, 1-based


@dataclasses.dataclass
class Example:
    code: str
    line: int
    expected: str | None  # the text block that follows, if any
    launch: dict[str, int] | None = None  # processes and devices of a `launch` block


def markdown_files() -> list[Path]:
    files = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    if (ROOT / "README.md").is_file():
        files.append(ROOT / "README.md")
    return files


def fenced_blocks(text: str) -> list[tuple[Block, int]]:
    """Fenced code blocks, each with the index of the line after its closing fence."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or (m.group("fence")[0] == "`" and "`" in m.group("info")):
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        info = m.group("info").split()
        closing = re.compile(r"^ {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
        body = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            # Content lines lose up to the fence's indentation (CommonMark).
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        lang = info[0].lower() if info else ""
        blocks.append((Block(lang, info[1:], "\n".join(body) + "\n", i + 1), j + 1))
        i = j + 1
    return blocks


def examples(path: Path) -> tuple[list[Example], int]:
    """The runnable python blocks of a file, and how many no-run blocks it has."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = fenced_blocks("\n".join(lines))
    found, skipped = [], 0
    for k, (block, after) in enumerate(blocks):
        if block.lang not in PYTHON_LANGS:
            continue
        if "no-run" in block.options:
            skipped += 1
            continue
        launch = None
        if "launch" in block.options:
            settings = dict(option.split("=", 1) for option in block.options if "=" in option)
            launch = {"processes": int(settings.get("processes", 2)), "devices": int(settings.get("devices", 1))}
        expected = None
        if k + 1 < len(blocks):
            nxt, _ = blocks[k + 1]
            between = lines[after : nxt.line - 1]
            if nxt.lang == "text" and all(not line.strip() for line in between):
                expected = nxt.code
        found.append(Example(block.code, block.line, expected, launch))
    return found, skipped


def normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")


def output_matches(expected: str, actual: str) -> bool:
    expected, actual = normalise(expected), normalise(actual)
    pattern = ".*?".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


RUNNER = textwrap.dedent(
    r'''
    """Run Markdown python blocks in order in one namespace; record what each prints."""
    import contextlib, io, json, linecache, sys, traceback, types

    blocks_file, result_file, source_name = sys.argv[1:4]
    with open(blocks_file, encoding="utf-8") as f:
        blocks = json.load(f)

    module = types.ModuleType("__main__")
    module.__file__ = source_name
    sys.modules["__main__"] = module
    namespace = module.__dict__
    results = []
    shown = []  # the lines of the Markdown file that the blocks run so far cover

    def save(running=None):
        with open(result_file, "w", encoding="utf-8") as f:
            json.dump({"results": results, "running": running}, f)

    for block in blocks:
        save(running=block["line"])
        # Padded so that tracebacks give the line numbers of the Markdown file.
        source = "\n" * block["line"] + block["code"]
        for number, text in enumerate(block["code"].splitlines(True), start=block["line"]):
            shown.extend(["\n"] * (number + 1 - len(shown)))
            shown[number] = text
        linecache.cache[source_name] = (len(shown), None, shown, source_name)
        out = io.StringIO()
        error = None
        try:
            code = compile(source, source_name, "exec")
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
        except BaseException:
            error = traceback.format_exc()
        results.append({"line": block["line"], "stdout": out.getvalue(), "error": error})
        if error is not None:
            break
    save()
    '''
)


def smap_path_entry() -> str | None:
    """The directory the subprocess must find ``smap`` in: the one this process uses."""
    spec = importlib.util.find_spec("smap")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]).parent)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}=8"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONIOENCODING"] = "utf-8"
    entry = smap_path_entry()
    if entry:
        env["PYTHONPATH"] = os.pathsep.join([entry] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def show(block: Example, path: Path) -> str:
    rel = path.relative_to(ROOT)
    return f"{rel}, block at line {block.line}:\n" + textwrap.indent(block.code.rstrip("\n"), "    | ")


def run_file(path: Path, blocks: list[Example]) -> tuple[list[dict], int | None, str]:
    with tempfile.TemporaryDirectory() as tmp:
        runner, blocks_file, result_file = (Path(tmp) / n for n in ("runner.py", "blocks.json", "result.json"))
        runner.write_text(RUNNER, encoding="utf-8")
        blocks_file.write_text(json.dumps([{"code": b.code, "line": b.line} for b in blocks]), encoding="utf-8")
        rel = str(path.relative_to(ROOT))
        try:
            proc = subprocess.run(
                [sys.executable, str(runner), str(blocks_file), str(result_file), rel],
                cwd=ROOT,
                env=subprocess_env(),
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
            stderr, timed_out = proc.stderr, False
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            timed_out = True
        if not result_file.exists():
            pytest.fail(f"{rel}: the runner wrote no result.\nstderr:\n{stderr[-5000:]}")
        data = json.loads(result_file.read_text(encoding="utf-8"))
        if timed_out:
            pytest.fail(
                f"{rel}: timed out after {TIMEOUT_S} s in the block at line {data['running']}.\n"
                f"stderr:\n{stderr[-5000:]}"
            )
        return data["results"], data["running"], stderr


DOC_FILES = markdown_files()
_names = [p.name for p in DOC_FILES]
IDS = [p.name if _names.count(p.name) == 1 else p.relative_to(ROOT).as_posix() for p in DOC_FILES]


@pytest.mark.parametrize("path", DOC_FILES, ids=IDS)
def test_markdown_examples(path: Path) -> None:
    found, n_no_run = examples(path)
    blocks = [b for b in found if b.launch is None]
    for block in found:
        if block.launch is not None:
            run_launched(path, block)
    if not found:
        reason = "only no-run python blocks" if n_no_run else "no python blocks"
        pytest.skip(f"{path.relative_to(ROOT)}: {reason}")

    if not blocks:
        return
    results, running, stderr = run_file(path, blocks)
    by_line = {r["line"]: r for r in results}
    failures = []
    for block in blocks:
        result = by_line.get(block.line)
        if result is None:
            failures.append(f"{show(block, path)}\nwas not run (an earlier block failed).")
            break
        if result["error"] is not None:
            failures.append(
                f"{show(block, path)}\nraised:\n{result['error']}"
                f"printed before the error:\n{result['stdout']}"
                f"\nsubprocess stderr (tail):\n{stderr[-3000:]}"
            )
            break
        if block.expected is not None and not output_matches(block.expected, result["stdout"]):
            failures.append(
                f"{show(block, path)}\n"
                f"--- expected (text block; '...' matches anything) ---\n{normalise(block.expected)}\n"
                f"--- actual output ---\n{normalise(result['stdout'])}\n"
                f"--- end ---"
            )
    if failures:
        pytest.fail(
            f"{len(failures)} problem(s) in {path.relative_to(ROOT)}:\n\n" + "\n\n".join(failures), pytrace=False
        )


LAUNCHER = ROOT / "scripts" / "launch_local.py"
LAUNCH_TIMEOUT_S = 240


def run_launched(path: Path, block: Example) -> None:
    """Run a ``launch`` block as several processes through scripts/launch_local.py."""
    rel = path.relative_to(ROOT)
    env = subprocess_env()
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if not f.startswith(DEVICE_COUNT_FLAG))
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.py"
        job.write_text(block.code, encoding="utf-8")
        command = [
            sys.executable,
            str(LAUNCHER),
            "--processes",
            str(block.launch["processes"]),
            "--devices",
            str(block.launch["devices"]),
            "--timeout",
            str(LAUNCH_TIMEOUT_S),
            "--",
            sys.executable,
            str(job),
        ]
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S + 60)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{show(block, path)}\nexited with code {proc.returncode}:\n{output[-5000:]}", pytrace=False)
    if block.expected is not None:
        printed = iter(normalise(proc.stdout).splitlines())
        missing = [line for line in normalise(block.expected).splitlines() if line not in printed]
        if missing:
            pytest.fail(
                f"{rel}, block at line {block.line}: these lines were not printed, in this order: {missing}\n"
                f"--- output ---\n{output[-5000:]}",
                pytrace=False,
            )


SCRIPT_COMMAND = re.compile(r"python (scripts/[\w/]+\.py)([^`\n#]*)")


def script_commands() -> list[tuple[str, str, list[str]]]:
    """Every ``python scripts/... --flags`` command in the docs: (where, script, flags)."""
    commands = []
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for match in SCRIPT_COMMAND.finditer(line):
                args = match.group(2).split()
                own = args[: args.index("--")] if "--" in args else args
                flags = [a.split("=", 1)[0] for a in own if a.startswith("--")]
                commands.append((f"{path.relative_to(ROOT)}:{number}", match.group(1), flags))
    return commands


def test_script_commands_in_the_docs_exist_and_take_their_flags() -> None:
    commands = script_commands()
    assert any(where.startswith("docs/performance.md") for where, _, _ in commands)
    helps: dict[str, str] = {}
    for where, script, flags in commands:
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        if script not in helps:
            proc = subprocess.run(
                [sys.executable, script, "--help"],
                cwd=ROOT,
                env=subprocess_env(),
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
            assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-3000:]}"
            helps[script] = proc.stdout
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", helps[script]), f"{where}: {script} takes no {flag}"
