"""What of the submitter's environment a job takes, and the supervisor's teaching messages."""

from __future__ import annotations

import errno

from gpujobd import supervisor
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


def test_exec_failed_names_the_path_searched_and_suggests_python3() -> None:
    message = supervisor.exec_failure_message("python", errno.ENOENT, "No such file or directory",
                                              "/usr/bin:/bin")
    assert "searched PATH=/usr/bin:/bin" in message and "python3" in message
    assert "python3" not in supervisor.exec_failure_message("pyhton", errno.ENOENT, "No such file", "/bin")


def test_exec_failed_of_a_path_names_no_search() -> None:
    assert supervisor.exec_failure_message("./run.sh", errno.ENOENT, "No such file", "/bin") == \
        "./run.sh: No such file"


def test_chdir_failed_with_a_tilde_says_the_shell_did_not_expand_it() -> None:
    message = supervisor.chdir_failure_message("/home/alice/~/proj", "No such file or directory")
    assert message.startswith("/home/alice/~/proj: No such file or directory") and "expands ~" in message
    assert "~" not in supervisor.chdir_failure_message("/srv/x", "No such file or directory")
