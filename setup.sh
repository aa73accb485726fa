#!/usr/bin/env bash
# Set up henderson on a fresh Debian machine with Python 3.11:
#   SuiteSparse (CHOLMOD) and OpenBLAS from Debian when missing, then the package.
#   ./setup.sh          package only        ./setup.sh --test   package + test needs
set -euo pipefail
cd "$(dirname "$0")"
if ! ldconfig -p | grep -q libcholmod.so || [ ! -f /usr/include/suitesparse/cholmod.h ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libsuitesparse-dev libopenblas0-pthread >/dev/null
fi
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
