#!/bin/sh
# Build the NVML test double:  tests/nvml_double/build.sh OUTDIR  ->  OUTDIR/libnvidia-ml.so.1
#
# nvml_double.c is compiled against NVIDIA's own nvml.h, taken from the PyPI wheel
# nvidia-nvml-dev (a header-only wheel; it is a build input, never a runtime dependency of
# gpujobd).  The wheel is fetched once with pip into build/nvml-dev/VERSION/ in this checkout
# (ignored by git); a later run that finds the library newer than its inputs does nothing.
#
# Needs: a C compiler (CC, default gcc) and python3 with pip that can reach PyPI, or
# NVML_INCLUDE_DIR naming a directory that already holds nvml.h (then nothing is fetched).
# Settings (environment):
#   NVML_DEV_VERSION   nvidia-nvml-dev version to fetch (default below; pinned so builds repeat)
#   NVML_DEV_CACHE     where fetched headers live (default: <checkout>/build/nvml-dev)
#   NVML_INCLUDE_DIR   use this nvml.h instead of fetching one
#   CC, PYTHON         compiler (default gcc) and interpreter running pip (default python3)
set -eu

NVML_DEV_VERSION=${NVML_DEV_VERSION:-13.5.37}
CC=${CC:-gcc}
PYTHON=${PYTHON:-python3}

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
src=$here/nvml_double.c
mkdir -p "$1"
out=$(cd "$1" && pwd)
lib=$out/libnvidia-ml.so.1

if [ -n "${NVML_INCLUDE_DIR:-}" ]; then
    incdir=$NVML_INCLUDE_DIR
    if [ ! -f "$incdir/nvml.h" ]; then
        echo "nvml-double: NVML_INCLUDE_DIR=$incdir holds no nvml.h" >&2
        exit 1
    fi
else
    cache=${NVML_DEV_CACHE:-$root/build/nvml-dev}
    incdir=$cache/$NVML_DEV_VERSION/include
    if [ ! -f "$incdir/nvml.h" ]; then
        mkdir -p "$cache/$NVML_DEV_VERSION" "$incdir"
        tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        echo "nvml-double: fetching nvidia-nvml-dev==$NVML_DEV_VERSION from PyPI" >&2
        # The header is the same in every platform's wheel: ask for one fixed platform so the
        # fetch works whatever this machine's architecture is.
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
            --only-binary=:all: --platform manylinux2014_x86_64 \
            --dest "$tmp" "nvidia-nvml-dev==$NVML_DEV_VERSION"
        # Unpack nvml.h only (no unzip needed); rename into place so concurrent builds are safe.
        "$PYTHON" - "$tmp" "$incdir/nvml.h.tmp.$$" <<'PY'
import glob, sys, zipfile
wheels = glob.glob(sys.argv[1] + "/nvidia_nvml_dev-*.whl")
if len(wheels) != 1:
    sys.exit("nvml-double: expected one nvidia_nvml_dev wheel, found %r" % wheels)
with zipfile.ZipFile(wheels[0]) as wheel:
    headers = [n for n in wheel.namelist() if n.endswith("/include/nvml.h")]
    if len(headers) != 1:
        sys.exit("nvml-double: expected one include/nvml.h in %s, found %r" % (wheels[0], headers))
    with open(sys.argv[2], "wb") as out:
        out.write(wheel.read(headers[0]))
PY
        mv -f "$incdir/nvml.h.tmp.$$" "$incdir/nvml.h"
        mv -f "$tmp"/nvidia_nvml_dev-*.whl "$cache/$NVML_DEV_VERSION/"
    fi
fi

if [ -f "$lib" ] && [ "$lib" -nt "$src" ] && [ "$lib" -nt "$incdir/nvml.h" ] && [ "$lib" -nt "$0" ]; then
    exit 0  # up to date
fi

"$CC" -std=c11 -O2 -g -fPIC -shared -fvisibility=hidden -pthread \
    -Wall -Wextra -Werror -Wmissing-prototypes -Wstrict-prototypes -Wshadow -Wformat=2 \
    -I "$incdir" -Wl,-soname,libnvidia-ml.so.1 -Wl,--no-undefined \
    -o "$lib.tmp.$$" "$src"
mv -f "$lib.tmp.$$" "$lib"
echo "nvml-double: built $lib (nvml.h from $incdir)" >&2
