import subprocess
import sys

from henderson.cli import main


def test_demo_prints_the_seed_matrices_and_summaries(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for piece in ["plants", "sleepstudy", "penicillin", "Sigma = Z G Z' + R", "REML crit"]:
        assert piece in out


def test_demo_into_a_closed_pipe_exits_cleanly():
    proc = subprocess.run(f"{sys.executable} -m henderson demo | head -1", shell=True,
                          capture_output=True, text=True)
    assert proc.stdout.startswith("==== plants")
    assert "Traceback" not in proc.stderr
