"""Every fenced Python and shell block of README.md and docs/*.md, run in order per
file in a temporary folder, as a reader would (docs/render_outputs.py); the outputs
the docs show must be the outputs the code prints. Blocks marked ``docs-test: skip``
are reported as warnings with their reason; ``docs-test: replace`` blocks run at a
smaller size."""
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("render_outputs", ROOT / "docs" / "render_outputs.py")
render_outputs = importlib.util.module_from_spec(spec)
sys.modules["render_outputs"] = render_outputs      # its dataclasses look themselves up
spec.loader.exec_module(render_outputs)

FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_doc_blocks_run_and_print_what_the_doc_shows(path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    report = render_outputs.run_file(path)
    for reason in report.skipped:
        warnings.warn(f"docs block not run: {reason}")
    assert not report.differences, (
        f"outputs in {path.name} differ from what the code prints (run "
        f"`python docs/render_outputs.py {path.relative_to(ROOT)}`): {report.differences}")


def test_the_runner_catches_an_error_and_a_typed_output(tmp_path):
    """The runner itself: a failing block fails, a wrong shown output is a difference,
    a skip is reported, a replace runs the smaller code."""
    good = ("```python\nprint(1 + 1)\n```\n\n```\n3\n```\n"
            "<!-- docs-test: skip needs R -->\n```bash\nRscript -e 'q()'\n```\n"
            "<!-- docs-test: replace 10 -> 2 -->\n```python\nn = 10\nprint(n)\n```\n"
            "```bash\necho $((6 * 7))\n```\n\n```\n42\n```\n")
    report = render_outputs.run(good, "t.md")
    assert report.differences == ["t.md:1 (print(1 + 1))"]
    assert report.skipped == ["t.md:9 (Rscript -e 'q()'): needs R"]
    assert "```\n2\n```" in report.rendered and "```\n42\n```" in report.rendered
    with pytest.raises(render_outputs.BlockError, match="t.md:1 .*ZeroDivisionError"):
        render_outputs.run("```python\n1 / 0\n```\n", "t.md")
    with pytest.raises(render_outputs.BlockError, match="exit code"):
        render_outputs.run("```bash\nfalse\n```\n", "t.md")
