"""What of the submitter's environment a job takes (the supervisor's teaching messages are tested
with the supervisor, end to end)."""

from __future__ import annotations

from gpujobd.shared import environment


def test_session_and_gpujobd_variables_are_not_inherited() -> None:
    caller = {"PATH": "/venv/bin:/usr/bin", "VIRTUAL_ENV": "/venv", "CONDA_PREFIX": "/c", "HF_HOME": "/h",
              "LD_LIBRARY_PATH": "/l", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1/bus",
              "XDG_RUNTIME_DIR": "/run/user/1", "SSH_AUTH_SOCK": "/tmp/a", "DISPLAY": ":0", "TERM": "xterm",
              "NOTIFY_SOCKET": "/run/n", "GPUJOB_ID": "3", "GPUJOB_RUN": "1", "USER": "a", "PWD": "/x"}
    assert environment.inherited(caller) == {
        "PATH": "/venv/bin:/usr/bin", "VIRTUAL_ENV": "/venv", "CONDA_PREFIX": "/c", "HF_HOME": "/h",
        "LD_LIBRARY_PATH": "/l"}


def test_names_and_values_an_environment_cannot_hold_are_not_inherited() -> None:
    assert environment.inherited({"": "x", "A=B": "1", "NUL": "a\0b", "OK": ""}) == {"OK": ""}


def test_the_size_counts_what_execve_takes() -> None:
    assert environment.size_bytes({"A": "bc", "D": ""}) == len("A=bc\0D=\0")
