"""Run a Markdown file's Python blocks and write what each prints into the output block
that follows it, so that the outputs in the docs are generated, not typed.

    python docs/render_outputs.py docs/animal-breeding.md [--check]

Every ```python block runs, top to bottom, in one namespace, in a temporary folder. A
block followed directly (after one blank line at most) by a bare ``` block has that
block replaced with its printed output (warnings included), and the images the code
saves under ``docs/`` are copied next to the Markdown file. ``--check`` rewrites
nothing and fails when an output differs from the file.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

BLOCK = re.compile(r"```python\n(.*?)```\n(\n?)(```\n(.*?)```\n)?", re.S)


def render(text: str) -> str:
    namespace: dict = {"__name__": "__main__"}
    pieces, last = [], 0
    for match in BLOCK.finditer(text):
        code = match.group(1)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            exec(compile(code, "<doc>", "exec"), namespace)
        for w in seen:
            if not issubclass(w.category, (DeprecationWarning, FutureWarning)):
                buffer.write(f"{w.category.__name__}: {w.message}\n")
        pieces.append(text[last:match.start()])
        block = f"```python\n{code}```\n"
        if match.group(3) is not None:
            block += f"{match.group(2)}```\n{buffer.getvalue()}```\n"
        elif match.group(2):
            block += match.group(2)
        pieces.append(block)
        last = match.end()
    pieces.append(text[last:])
    return "".join(pieces)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    paths = [Path(a).resolve() for a in argv if a != "--check"]
    status = 0
    for path in paths:
        text = path.read_text()
        here = os.getcwd()
        with tempfile.TemporaryDirectory() as folder:
            os.chdir(folder)
            (Path(folder) / "docs").mkdir()
            try:
                rendered = render(text)
            finally:
                os.chdir(here)
            if not check:
                for image in (Path(folder) / "docs").glob("*.png"):
                    shutil.copy(image, path.parent / image.name)
        if check:
            if rendered != text:
                print(f"{path}: outputs differ from what the code prints", file=sys.stderr)
                status = 1
        else:
            path.write_text(rendered)
    return status


if __name__ == "__main__":
    sys.exit(main())
