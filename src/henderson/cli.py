"""The ``henderson`` command line.

``henderson demo`` fits the bundled example data (the seed's plants in pots,
sleepstudy, Penicillin's crossed design) and prints the summaries.
``henderson fit "y ~ x + (1|g)" data.csv [--pedigree ped.csv] [--ml] [--out DIR]
[--chunked] [--save model.npz]`` fits a model from a CSV or Parquet file (in memory,
or streamed in chunks), prints the summary and writes the results as CSV plus a JSON
summary; ``henderson predict model.npz new.csv`` predicts from a saved model. Errors
are one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

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


def _read_table(path: str):
    import pandas as pd
    from pathlib import Path

    from .errors import DataError

    file = Path(path)
    if not file.exists():
        raise DataError(f"data file {path!r} not found")
    if file.suffix.lower() in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(file)
        except ImportError as exc:
            raise DataError("reading Parquet needs pyarrow: pip install henderson[pipeline]") from exc
    else:
        frame = pd.read_csv(file)
    if len(frame) == 0:
        raise DataError(f"data file {path!r} has no rows")
    return frame


def fit_command(args, out=None, err=None) -> int:
    import json
    from pathlib import Path

    import henderson as hd

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"[henderson] {msg}", file=err))
    if args.chunked:
        say(f"streaming {args.data} in chunks of {args.chunk_rows:,} rows (two passes)")
        data = hd.chunked(args.data, chunk_rows=args.chunk_rows)
        rows = "chunks"
    else:
        say(f"reading {args.data}")
        data = _read_table(args.data)
        rows = f"{len(data)} rows"
    relationships = None
    if args.pedigree:
        say(f"reading pedigree {args.pedigree}")
        pedigree = hd.Pedigree.read(args.pedigree, sep=None)
        group = args.animal or "animal"
        relationships = {group: pedigree}
    say(f"fitting {args.formula} to {rows}")
    model = hd.lmm(args.formula, data, reml=not args.ml, relationships=relationships,
                   verbose=False if args.quiet else 25)
    print(model.summary(), file=out)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        write = _table_writer(args.format)
        fixed = model.fixef.to_frame()
        fixed["std_error"] = np.sqrt(np.diag(model.vcov.to_numpy()))
        write(fixed.rename_axis("term").reset_index(), folder / "fixef")
        write(model.varcorr, folder / "varcorr")
        for group, values in model.ranef.items():
            table = values.join(model.ranef_sd[group].add_suffix("_cond_sd"))
            term = next(t for t in model.design.terms if t.group == group)
            if term.level_precision is not None and term.n_coefs == 1:
                bv = model.breeding_values(group)
                table = table.join(bv[["pev", "reliability"]])
            write(table.reset_index(), folder / f"ranef_{group.replace(':', '_')}")
        summary = {"formula": args.formula, "reml": not args.ml, "nobs": model.nobs,
                   "objective": model.objective, "loglik": model.loglik, "aic": model.aic,
                   "bic": model.bic, "sigma": model.sigma, "theta": model.theta.tolist(),
                   "fixef": model.fixef.to_dict(), "converged": model.converged,
                   "singular": model.singular, "evaluations": model.n_evaluations}
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
        say(f"results written to {folder}")
    if args.save:
        model.save(args.save)
        say(f"model saved to {args.save}")
    return 0


def _table_writer(kind: str):
    """Write a DataFrame as ``path.csv`` or ``path.parquet``."""
    def write(frame, path):
        frame = frame.copy()
        frame.columns = [str(c) for c in frame.columns]
        if kind == "parquet":
            frame.to_parquet(path.with_suffix(".parquet"), index=False)
        else:
            frame.to_csv(path.with_suffix(".csv"), index=False)
    return write


def predict_command(args, out=None, err=None) -> int:
    import henderson as hd

    out = sys.stdout if out is None else out
    model = hd.load(args.model)
    data = _read_table(args.data)
    prediction = model.predict(data, re=not args.population)
    frame = data.assign(prediction=prediction)
    if args.out:
        frame.to_csv(args.out, index=False)
    else:
        frame.to_csv(out, index=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="henderson",
                                     description="Linear mixed models on sparse MME.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="fit the bundled example data and print the summaries")
    fit = sub.add_parser("fit", help="fit a model to a CSV or Parquet file")
    fit.add_argument("formula", help='lme4 formula, e.g. "y ~ x + (1 | g)"')
    fit.add_argument("data", help="CSV or Parquet file")
    fit.add_argument("--pedigree", help="pedigree file (animal, sire, dam) for an animal term")
    fit.add_argument("--animal", help="grouping factor that the pedigree belongs to "
                                       "(default: animal)")
    fit.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    fit.add_argument("--out", help="folder for the results (fixef, varcorr, ranef_<group>) "
                                   "and summary.json")
    fit.add_argument("--format", choices=["csv", "parquet"], default="csv",
                     help="file format of the result tables (default csv)")
    fit.add_argument("--quiet", action="store_true", help="no progress on stderr")
    fit.add_argument("--chunked", action="store_true",
                     help="stream the file in chunks (out of core: memory bounded by the "
                          "MME, not the rows; no fitted values or residuals)")
    fit.add_argument("--chunk-rows", type=int, default=1_000_000,
                     help="rows per chunk with --chunked (default 1,000,000)")
    fit.add_argument("--save", help="write the fitted model to this file (.npz, no pickle) "
                                    "for `henderson predict`")
    fit.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
    predict = sub.add_parser("predict", help="predict new rows from a saved model")
    predict.add_argument("model", help="file written by `henderson fit --save`")
    predict.add_argument("data", help="CSV or Parquet file of new rows")
    predict.add_argument("--out", help="CSV file for the rows with a prediction column "
                                       "(default: stdout)")
    predict.add_argument("--population", action="store_true",
                         help="fixed effects only (no BLUPs)")
    predict.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return demo()
        if args.command in ("fit", "predict"):
            from .errors import HendersonError

            try:
                return (fit_command if args.command == "fit" else predict_command)(args)
            except (HendersonError, OSError) as exc:
                if args.traceback:
                    raise
                print(f"henderson: error: {exc}", file=sys.stderr)
                return 2
    except BrokenPipeError:  # `henderson demo | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
