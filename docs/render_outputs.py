"""Run a Markdown file's code blocks as a reader would, and write what each prints
into the output block that follows it, so that the outputs in the docs are generated,
not typed.

    python docs/render_outputs.py docs/user-guide.md [--check]

Every ```python and ```bash block runs, top to bottom, in a temporary folder: the
Python blocks in one namespace (``__name__ == "__main__"``), the shell blocks by
``bash -e`` with this Python's ``bin/`` first on PATH (so ``henderson`` and ``python``
are the ones under test). A block followed directly (after one blank line at most) by
a bare ``` block has that block replaced with its printed output (warnings included),
and the images the page shows (``![...](name.png)``) are copied next to the Markdown
file from where the code saved them.
``--check`` rewrites nothing and fails when an output differs from the file.

An HTML comment on the line before a block changes how it runs (it is invisible in the
rendered page):

* ``<!-- docs-test: skip REASON -->``: not run (the set-up command itself; R);
  the reason is reported.
* ``<!-- docs-test: replace OLD -> NEW; OLD2 -> NEW2 -->``: run with these
  replacements (a smaller size in CI); its output is then not compared.
* ``<!-- docs-test: output varies -->``: run and rendered, but its output not
  compared (timings; numbers of a model fitted at a replaced size above).

``tests/test_docs.py`` runs every file this way in the default test run.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = re.compile(
    r"(?P<marker><!-- docs-test: (?P<directive>.*?) -->\n)?"
    r"```(?P<lang>python|bash|sh)\n(?P<code>.*?)```\n(?P<gap>\n?)(?P<output>```\n(?P<shown>.*?)```\n)?",
    re.S)


@dataclass
class Report:
    """What a run of one file did: its text with outputs as printed, the blocks
    skipped (with reasons) and the blocks whose outputs were not compared."""
    rendered: str
    skipped: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)


class BlockError(RuntimeError):
    """A documentation block failed; the message names the file, the line and the
    block's first line."""


def _directive(text: str | None) -> tuple[str, str]:
    if not text:
        return "", ""
    kind, _, rest = text.strip().partition(" ")
    if kind not in ("skip", "replace", "output"):
        raise ValueError(f"unknown docs-test directive {text!r}")
    return kind, rest.strip()


def _replacements(rest: str) -> list[tuple[str, str]]:
    pairs = []
    for part in rest.split(";"):
        old, arrow, new = part.partition("->")
        if not arrow:
            raise ValueError(f"docs-test replace needs OLD -> NEW, got {part!r}")
        pairs.append((old.strip(), new.strip()))
    return pairs


def _run_python(code: str, namespace: dict, where: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as exc:
            raise BlockError(f"{where}: {type(exc).__name__}: {exc}") from exc
    for w in seen:   # a dashboard port taken by another cluster is not the doc's output
        if "distributed" in str(w.filename).replace("\\", "/").split("/"):
            continue
        if not issubclass(w.category, (DeprecationWarning, FutureWarning, ResourceWarning)):
            buffer.write(f"{w.category.__name__}: {w.message}\n")
    return buffer.getvalue()


def _run_bash(code: str, where: str) -> str:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BlockError(f"{where}: exit code {done.returncode}\n{done.stderr[-2000:]}")
    return done.stdout


def run(text: str, name: str = "<doc>", small: bool = True) -> Report:
    """Run every block of ``text`` in the current folder; the text with its outputs as
    printed, and what was skipped or not compared. ``small`` applies the blocks'
    ``replace`` directives (the test run); rendering runs the code as written."""
    namespace: dict = {"__name__": "__main__"}
    report = Report("")
    pieces, last = [], 0
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        code = match.group("code")
        where = f"{name}:{line} ({code.strip().splitlines()[0][:60] if code.strip() else ''})"
        kind, rest = _directive(match.group("directive"))
        compare = True
        if kind == "skip":
            report.skipped.append(f"{where}: {rest}")
            printed = None
        else:
            run_code = code
            if kind == "replace" and small:
                for old, new in _replacements(rest):
                    if old not in run_code:
                        raise ValueError(f"{where}: docs-test replace: {old!r} not in the block")
                    run_code = run_code.replace(old, new)
                compare = False
            if kind == "output":
                compare = False
            printed = (_run_python(run_code, namespace, where) if match.group("lang") == "python"
                       else _run_bash(run_code, where))
        pieces.append(text[last:match.start()])
        block = (match.group("marker") or "") + f"```{match.group('lang')}\n{code}```\n"
        if match.group("output") is not None:
            shown = match.group("shown")
            if printed is None or (kind == "replace" and small):
                new_output = shown             # not run, or run at another size
                if printed is not None:
                    report.not_compared.append(where)
            elif not compare:
                new_output = printed           # rendered, but it varies run to run
                report.not_compared.append(where)
            else:
                new_output = printed
                if printed != shown:
                    report.differences.append(where)
            block += f"{match.group('gap')}```\n{new_output}```\n"
        elif match.group("gap"):
            block += match.group("gap")
        pieces.append(block)
        last = match.end()
    pieces.append(text[last:])
    report.rendered = "".join(pieces)
    return report


def run_file(path: Path, copy_images: bool = False, small: bool = True) -> Report:
    """Run ``path``'s blocks in a new temporary folder (with a ``docs/`` folder in it
    for the images the guide saves)."""
    path = Path(path).resolve()
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        (Path(folder) / "docs").mkdir()
        try:
            report = run(path.read_text(), path.name, small)
        finally:
            os.chdir(here)
        if copy_images:   # the images the page shows, saved where the code put them
            text = path.read_text()
            for image in [*Path(folder).glob("*.png"), *(Path(folder) / "docs").glob("*.png")]:
                if f"]({image.name})" in text:
                    shutil.copy(image, path.parent / image.name)
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    status = 0
    for path in (Path(a) for a in argv if a != "--check"):
        report = run_file(path, copy_images=not check, small=check)
        for reason in report.skipped:
            print(f"skipped {reason}", file=sys.stderr)
        if check:
            if report.differences:
                print(f"{path}: outputs differ from what the code prints: "
                      + "; ".join(report.differences), file=sys.stderr)
                status = 1
        else:
            path.write_text(report.rendered)
    return status


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    sys.exit(main())
