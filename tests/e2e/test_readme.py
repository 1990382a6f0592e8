"""Every example README.md shows runs, as written, against a real `bentoml serve`: each bash block
that calls curl and each Python block, in the README's order (later examples continue earlier
conversations), with localhost:3000 pointed at the test server. A ```text block right after an
example is its output: its lines must appear in that order (``…`` stands for any text within a
line, a line ``...`` for any number of lines). So the README cannot drift from the code."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
# curl fails on an HTTP error unless the example shows one as its output.
CURL = 'curl() { command curl --max-time 300 {fail} "$@"; }\nset -e\n'


@dataclass
class Example:
    line: int
    lang: str
    code: str
    output: str | None


def examples(text: str) -> list[Example]:
    blocks = [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2), m.end()) for m in FENCE.finditer(text)]
    found = []
    for i, (line, lang, code, end) in enumerate(blocks):
        runnable = lang == "python" or (lang == "bash" and re.search(r"^\s*curl ", code, re.M))
        if not runnable:
            continue
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        # The output block follows the example with nothing but blank lines between.
        output = nxt[2] if nxt and nxt[1] == "text" and not text[end: text.index("```text", end)].strip() else None
        found.append(Example(line, lang, code, output))
    return found


def pattern(expected: str) -> re.Pattern:
    parts = []
    for line in expected.strip("\n").split("\n"):
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.rstrip().split("…")) + r"\n")
    return re.compile("".join(parts))


def run(example: Example, url: str) -> subprocess.CompletedProcess:
    host = url.split("://", 1)[1]
    code = example.code.replace("http://localhost:3000", url).replace("localhost:3000", host)
    if example.lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        fail = "" if example.output and '"error"' in example.output else "--fail-with-body"
        argv = ["bash", "-c", CURL.replace("{fail}", fail) + code]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def srv(server):
    return server


def test_readme_has_examples():
    found = examples(README.read_text())
    assert sum(e.lang == "bash" for e in found) >= 10 and sum(e.lang == "python" for e in found) >= 2
    assert sum(e.output is not None for e in found) >= 4


def test_every_readme_example_runs_as_shown(srv):
    failures = []
    for ex in examples(README.read_text()):
        done = run(ex, srv.url)
        out = "\n".join(line.rstrip() for line in done.stdout.replace("\r\n", "\n").split("\n")).strip("\n") + "\n"
        if done.returncode != 0:
            failures.append(f"README.md:{ex.line} exited {done.returncode}:\n{out[-2000:]}{done.stderr[-2000:]}")
        elif ex.output is not None and not pattern(ex.output).fullmatch(out):
            failures.append(f"README.md:{ex.line} printed:\n{out[-3000:]}\nnot what the README shows:\n{ex.output}")
    assert not failures, "\n\n".join(failures)
