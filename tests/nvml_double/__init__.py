"""A scripted test double of NVIDIA's NVML library, for exercising the real pynvml without a GPU.

See README.md.  `build()` compiles it (once; later calls are quick no-ops), `environ()` is what a
process needs so that pynvml's dlopen("libnvidia-ml.so.1") finds it and it reads the given script.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
DEFAULT_OUTDIR = HERE.parents[1] / "build" / "nvml-double"
LIBRARY_NAME = "libnvidia-ml.so.1"


def build(outdir: Union[str, os.PathLike] = DEFAULT_OUTDIR) -> Path:
    """Build (if out of date) OUTDIR/libnvidia-ml.so.1; returns OUTDIR.  Raises CalledProcessError."""
    subprocess.run(["sh", str(BUILD_SCRIPT), str(outdir)], check=True)
    return Path(outdir).resolve()


def environ(libdir: Union[str, os.PathLike], script: Union[str, os.PathLike],
            base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """`base` (default os.environ) with the double first on LD_LIBRARY_PATH and NVML_DOUBLE_SCRIPT set."""
    env = dict(os.environ if base is None else base)
    paths = [str(libdir)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join(paths)
    env["NVML_DOUBLE_SCRIPT"] = str(script)
    return env
