"""gpujobctl as users meet it: list --limit is the newest jobs, logs -n, Slurm durations, verb hints."""

from __future__ import annotations

import json


def test_list_limit_3_is_the_newest_three_newest_first(ctl):
    ids = [ctl.submit("bob", "true") for _ in range(5)]
    for job_id in ids:
        ctl.wait_state("bob", job_id, "succeeded")
    listed = json.loads(ctl("bob", "list", "--me", "--limit", "3", "--json", check=True).stdout)
    assert [job["id"] for job in listed] == ids[:-4:-1]  # the default view, not only --all
    table = ctl("bob", "list", "--user", "bob", "--limit", "3", check=True).stdout.splitlines()
    assert [int(line.split()[0]) for line in table[1:]] == ids[:-4:-1]
    assert table[0].split()[:8] == ["ID", "USER", "STATE", "EXIT", "SUBMIT", "START", "ELAPSED", "GPUS"]
    assert "\033[" not in "".join(table)  # not a terminal: no colour


def test_logs_n_prints_the_last_lines(ctl):
    job_id = ctl.submit("bob", "sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done")
    ctl.wait_state("bob", job_id, "succeeded")
    assert ctl("bob", "logs", "-n", "2", str(job_id), check=True).stdout == "line 4\nline 5\n"


def test_a_slurm_timeout_is_accepted_and_a_typo_gets_a_guess(ctl):
    job_id = ctl.submit("bob", "true", opts=["--timeout", "0-01:00:00"])
    assert ctl.wait_state("bob", job_id, "succeeded")["timeout_s"] == 3600.0
    typo = ctl("bob", "sumbit", "--", "true")
    assert typo.returncode == 2 and "did you mean `submit`?" in typo.stderr
    missing = ctl("bob", "stop", "999999")
    assert missing.returncode == 3 and missing.stderr.count("999999") == 1, missing.stderr
