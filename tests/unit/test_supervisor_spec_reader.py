"""The compiled supervisor's spec reader against supervisor.parse_spec, the daemon's own check: on
mutations of a valid spec line it accepts exactly what parse_spec accepts, and never crashes.

Nothing is released, so an accepted spec ends as a start-failed record (exit 0) and a refused one
exits EXIT_NO_SPEC; no command runs either way. One difference is deliberate: a lone UTF-16 surrogate
outside surrogateescape's range (U+DC80..U+DCFF, a byte that is not UTF-8) is refused by the
compiled reader, while Python accepts it and fails the run's exec later."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

from gpujobd import supervisor
from tests.unit.test_supervisor import needs_root

CASES = 400
SEED = 20261207
ESCAPE = re.compile(rb"\\u([0-9a-fA-F]{4})")


def _valid_line(state: Path) -> bytes:
    fields = {"job_id": 7, "argv": ["true", "a\u00e9\udc80"], "cwd": "/",
              "env": {"PATH": "/usr/bin", "X": "\u2603"}, "uid": 65534, "gid": 65534, "user": "nobody",
              "umask": 0o22, "exit_record": str(state / "7.json"), "runs_file": str(state / "7.runs"),
              "max_runs": 1, "restart_delay_s": 0, "stop_on_failure": False, "log_max_bytes": 0,
              "log_drain_s": 0.1}
    return json.dumps(fields).encode("ascii")


def _mutated(line: bytes, rng: random.Random) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 6)):
        where = rng.randrange(len(data) + 1)
        choice = rng.random()
        if choice < 0.3 and data:
            del data[where % len(data)]
        elif choice < 0.6:
            data.insert(where, rng.choice(b'"\\{}[]:,0123456789eE.-+tfnu\x00\xc3\xff '))
        elif choice < 0.8 and data:
            data[where % len(data)] = rng.randrange(256)
        else:
            other = rng.randrange(len(data) + 1)
            data[where:where] = data[min(where, other):max(where, other)][:48]
    return bytes(data).replace(b"\n", b" ") + b"\n"


def _has_other_surrogate(line: bytes) -> bool:
    codes = [int(code, 16) for code in ESCAPE.findall(line)]
    return any(0xD800 <= code <= 0xDFFF and not 0xDC80 <= code <= 0xDCFF for code in codes)


def _python_accepts(line: bytes) -> bool:
    try:
        supervisor.parse_spec(line)
    except supervisor.SpecError:
        return False
    return True


@needs_root
def test_the_compiled_reader_accepts_what_parse_spec_accepts(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    valid = _valid_line(tmp_path)
    lines = [valid + b"\n"] + [_mutated(valid, rng) for _ in range(CASES)]
    compared = refused = 0
    for line in lines:
        done = subprocess.run([supervisor.PROGRAM, "--cgroup-root", str(tmp_path)], input=line,
                              capture_output=True, timeout=30)
        assert done.returncode in (supervisor.EXIT_RECORDED, supervisor.EXIT_RECORD_FAILED,
                                   supervisor.EXIT_NO_SPEC), (line, done.returncode, done.stdout[-300:])
        if _has_other_surrogate(line):
            continue
        accepted = done.returncode != supervisor.EXIT_NO_SPEC
        assert accepted == _python_accepts(line), (line, done.stdout[-300:])
        compared += 1
        refused += not accepted
    assert compared > CASES // 2 and 0 < refused < compared  # both verdicts were exercised
