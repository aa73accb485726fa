#!/usr/bin/env bash
# Set up henderson on a fresh Debian machine with Python 3.11:
#   SuiteSparse (CHOLMOD) and OpenBLAS from Debian when missing, then a new virtual
#   environment .venv/ (made afresh on every run, so that pip resolves the newest
#   versions pyproject.toml allows, as on a new machine) with the package in it.
#   ./setup.sh          package only        ./setup.sh --test   package + test needs
set -euo pipefail
cd "$(dirname "$0")"
if ! ldconfig -p | grep -q libcholmod.so || [ ! -f /usr/include/suitesparse/cholmod.h ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libsuitesparse-dev libopenblas0-pthread >/dev/null
fi
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
python3 -m venv --clear .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
