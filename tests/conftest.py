"""Shared fixtures: the reference results of lme4 1.1-31 (copied under tests/data)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
CASES = sorted(p.stem for p in (DATA / "cases").glob("*.json"))


def load_case(name: str) -> dict:
    return json.loads((DATA / "cases" / f"{name}.json").read_text())


def load_json(*parts: str) -> dict:
    return json.loads(DATA.joinpath(*parts).read_text())


@pytest.fixture(scope="session")
def sleepstudy():
    import henderson as hd

    return hd.datasets.load("sleepstudy")
