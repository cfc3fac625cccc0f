"""%pyproject_install for `make rpm` on a Debian builder (see macros.debian-builder).

    install-wheel.py BUILDROOT SITELIB BINDIR INTERPRETER WHEELDIR

Installs every wheel of WHEELDIR into BUILDROOT with Fedora's layout (SITELIB, BINDIR), as
pyproject-rpm-macros does, using the `installer` library. Debian's own python3 would pick its
Debian-specific install scheme (dist-packages, /usr/local) instead.
"""

import glob
import sys

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile


def main(buildroot: str, sitelib: str, bindir: str, interpreter: str, wheeldir: str) -> int:
    wheels = glob.glob(f"{wheeldir}/*.whl")
    if not wheels:
        print(f"install-wheel.py: no wheel in {wheeldir}", file=sys.stderr)
        return 1
    prefix = bindir.rsplit("/", 1)[0]
    destination = SchemeDictionaryDestination(
        {"purelib": sitelib, "platlib": sitelib, "headers": f"{prefix}/include/python3",
         "scripts": bindir, "data": prefix},
        interpreter=interpreter, script_kind="posix", destdir=buildroot)
    for wheel in wheels:
        with WheelFile.open(wheel) as source:
            install(source, destination, {"INSTALLER": b"rpm\n"})
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
