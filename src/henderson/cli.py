"""The ``henderson`` command line.

``henderson demo`` fits the bundled example data (the seed's plants in pots,
sleepstudy, Penicillin's crossed design) and prints the summaries.
"""
from __future__ import annotations

import argparse
import sys

DEMO_MODELS = [
    ("plants", "height ~ moisture + (1 | pot)", {}),
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", {}),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", {}),
    ("pastes", "strength ~ 1 + (1 | batch/cask)", {}),
]


def demo(out=None) -> int:
    import numpy as np

    import henderson as hd

    out = sys.stdout if out is None else out
    for name, formula, options in DEMO_MODELS:
        model = hd.lmm(formula, hd.datasets.load(name), **options)
        print(f"==== {name}: {formula}", file=out)
        print(model.summary(timings=True), file=out)
        if name == "plants":
            with np.printoptions(precision=3, suppress=True, linewidth=150):
                print("\nZ (10 x 4):\n", model.Z.toarray(), file=out)
                print("\nG:\n", model.G.toarray(), file=out)
                print("\nSigma = Z G Z' + R (block diagonal, one block per pot):\n",
                      model.Sigma.toarray(), file=out)
        print(file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="henderson",
                                     description="Linear mixed models on sparse MME.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="fit the bundled example data and print the summaries")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return demo()
    except BrokenPipeError:  # `henderson demo | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
