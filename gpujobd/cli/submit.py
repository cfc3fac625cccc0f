"""gpujobctl submit: its flags are derived from the submit options of gpujobd.shared.spec.

Only `--with-background`, `--wait` and `--json` are the CLI's own. What a value may be is the
daemon's to judge (it reports every problem at once); the CLI parses text into values and refuses
only flags that cannot go together here.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Sequence

from gpujobd.cli import common
from gpujobd.cli.common import PROG, Job, print_error, print_json
from gpujobd.shared import api, errors, spec, text

_WITH_BACKGROUND = "--with-background"


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "submit", "submit a command as a new job", _epilog(), usage=_usage())
    groups: Dict[str, Any] = {}
    for option in spec.OPTIONS:
        if option.cli.flags:
            group = option.cli.group
            if group and group not in groups:
                groups[group] = sub.add_argument_group(group)
            target = groups[group] if group else sub
            target.add_argument(*option.cli.flags, dest=option.key, help=_help(option), **_how(option))
    groups[spec.LOOPS].add_argument(
        _WITH_BACKGROUND, type=common.typed(text.command), metavar="'CMD [ARG...]'",
        help="also start this command (one quoted string) as a background loop bound to the job; prints "
             "both ids, \"FOREGROUND BACKGROUND\"")
    sub.add_argument("--wait", action="store_true",
                     help="follow the job's log until it ends, and exit with its exit code")
    sub.add_argument("--json", action="store_true", help="print the job as JSON instead of its id")
    for option in spec.OPTIONS:
        if not option.cli.flags:  # the command, after `--`
            sub.add_argument(option.key, nargs=argparse.REMAINDER, metavar=option.cli.metavar,
                             help=option.cli.help)
    sub.set_defaults(handler=run, check=_check(sub))


def _how(option: spec.Option) -> Dict[str, Any]:
    """argparse's action, type, default and metavar for an option."""
    if option.signature == "b":
        return {"action": "store_true"}
    how: Dict[str, Any] = {"metavar": option.cli.metavar}
    if option.cli.parse is not None:
        how["type"] = common.typed(option.cli.parse)
    if option.cli.repeat:
        how.update(action="append", default=[])
    if option.choices:
        how["choices"] = option.choices
    return how


def _help(option: spec.Option) -> str:
    if not option.server_default:
        return option.cli.help
    return f"{option.cli.help} (default: the server's {option.server_default})"


def _usage() -> str:
    words = [f"{PROG} submit [-h]"]
    for option in spec.OPTIONS:
        if not option.cli.flags:
            continue
        value = option.cli.metavar or "{" + ",".join(option.choices) + "}"
        word = f"[{option.cli.flags[0]}]" if option.signature == "b" else f"[{option.cli.flags[0]} {value}]"
        words.append(word + ("..." if option.cli.repeat else ""))
    words += [f"[{_WITH_BACKGROUND} 'CMD [ARG...]']", "[--wait] [--json] -- CMD [ARG...]"]
    return " ".join(words)


def _fixed_flags() -> List[spec.Option]:
    """The options --with-background sets itself (the loop's background and bind_to)."""
    return [option for option in spec.OPTIONS if option.pair == "fixed" and option.cli.flags]


def _check(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Flags that cannot go together here: usage errors, before any call."""

    def check(args: argparse.Namespace) -> None:
        if args.with_background is None:
            return
        clashing = [option.cli.flags[0] for option in _fixed_flags()
                    if option.given(getattr(args, option.key))]
        if clashing:
            parser.error(f"{' and '.join(clashing)} cannot be combined with {_WITH_BACKGROUND} (its loop "
                         "is bound to the job after `--`)")

    return check


def given_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The submit options given on the command line, by keyword (only those are sent)."""
    values: Dict[str, Any] = {}
    for option in spec.OPTIONS:
        if not option.cli.flags:
            continue
        value = getattr(args, option.key)
        if option.cli.repeat:
            value = dict(value) if value else None
        if option.given(value):
            values[option.key] = value
    return values


def run(args: argparse.Namespace, client: Any) -> int:
    command = submitted_command(args.argv)
    options = given_options(args)
    if args.with_background is not None:
        return _submit_pair(args, client, command, options)
    if options.get("array"):
        return _submit_array(args, client, command, options)
    job = client.submit(command, **options, raw=True)
    if not args.wait:
        if args.json:
            print_json(api.job_to_json(job))
        else:
            print(job["id"])
        return errors.EXIT_OK
    final = _follow_to_the_end(
        client, job, args.json, f"job {job['id']} keeps running; `{PROG} stop {job['id']}` stops it")
    if final is None:
        return common.EXIT_INTERRUPTED
    if args.json:
        print_json(api.job_to_json(final))
    return common.exit_code_for(final)


def _submit_array(args: argparse.Namespace, client: Any, command: List[str], options: Dict[str, Any]) -> int:
    """submit --array: one job per index; their ids one per line (--json: a list); with --wait, wait
    for every task and exit with the code of the first that failed."""
    tasks = client.submit_all(command, **options, raw=True)
    if args.wait:
        try:
            tasks = [client.wait(task["id"], raw=True) for task in tasks]
        except KeyboardInterrupt:
            print_error(f"interrupted: array {tasks[0]['array_id']} goes on; "
                        f"`{PROG} stop {tasks[0]['array_id']}` stops it")
            return common.EXIT_INTERRUPTED
    if args.json:
        print_json([api.job_to_json(task) for task in tasks])
    else:
        for task in tasks:
            print(task["id"])
    if not args.wait:
        return errors.EXIT_OK
    return next((code for code in map(common.exit_code_for, tasks) if code != errors.EXIT_OK), errors.EXIT_OK)


def _submit_pair(args: argparse.Namespace, client: Any, command: List[str], options: Dict[str, Any]) -> int:
    """submit --with-background: the job after `--` and a loop bound to it, in one call."""
    foreground, background = client.submit_with_background(command, args.with_background, **options,
                                                           raw=True)
    if not args.wait:
        if args.json:
            print_json({"foreground": api.job_to_json(foreground),
                        "background": api.job_to_json(background)})
        else:
            print(f"{foreground['id']} {background['id']}")
        return errors.EXIT_OK
    final = _follow_to_the_end(
        client, foreground, args.json,
        f"jobs {foreground['id']} and {background['id']} keep running; `{PROG} stop {foreground['id']}` "
        "stops both")
    if final is None:
        return common.EXIT_INTERRUPTED
    if args.json:
        print_json({"foreground": api.job_to_json(final),
                    "background": api.job_to_json(client.get(background["id"], raw=True))})
    return common.exit_code_for(final)


def _follow_to_the_end(client: Any, job: Job, quiet: bool, still_running: str) -> Job | None:
    """Follow the job's log (unless quiet) and wait for its end; None after Ctrl-C, which says
    `still_running` on stderr."""
    try:
        if not quiet:
            common.write_chunks(client.logs(job["id"], follow=True))
        return client.wait(job["id"], raw=True)
    except KeyboardInterrupt:
        print_error(f"interrupted: {still_running}")
        return None


def submitted_command(command: Sequence[str]) -> List[str]:
    """The command after `--` (argparse keeps the `--` in front of a REMAINDER)."""
    words = list(command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise errors.InvalidArgument(f"no command given: put it after `--`, e.g. "
                                     f"`{PROG} submit -- python3 train.py`")
    return words


def _epilog() -> str:
    loop_flags = [option.cli.flags[0] for option in spec.OPTIONS if option.loop_only]
    return _EPILOG.format(loop_flags=", ".join(loop_flags[:-1]) + " and " + loop_flags[-1])


_EPILOG = """\
examples:
  gpujobctl submit -- python3 train.py --lr 0.1         # prints the job id
  id=$(gpujobctl submit --name sweep-3 -- ./run.sh 3)
  gpujobctl submit --env CUDA_VISIBLE_DEVICES=0 --timeout 2h -- python3 train.py
  gpujobctl submit --wait -- make test                 # log to stdout, exit with the job's code
  gpujobctl submit --json -- sleep 60 | jq .unit
  gpujobctl submit --background --max-runs 5 --restart-delay 30s -- python3 eval.py
  gpujobctl submit --background --bind-to 42 -- ./watch_gpu.sh   # stopped when job 42 ends
  gpujobctl submit --gpus 2 -- python3 train.py             # waits queued for 2 free GPUs
  gpujobctl submit --after 41 -- python3 eval.py          # once job 41 succeeded
  gpujobctl submit --array 0-19%4 --gpus 1 -- ./shard.sh # 20 tasks, 4 at once; GPUJOB_ARRAY_INDEX
  gpujobctl submit --name exp1 --with-background 'python3 eval.py --latest' -- python3 train.py
      # prints "FOREGROUND BACKGROUND": the eval loop runs until train.py ends

Put the command after `--`. The job's environment is what --env gives, plus your LANG.
A background loop runs its command again after each run ends (GPUJOB_RUN says which run), up to
--max-runs times; {loop_flags} need --background (or, with
--with-background, apply to that loop). With --with-background, --timeout applies to the foreground
job; --name NAME names the loop NAME-bg; if the loop cannot be submitted, the foreground job is
stopped again.
With --wait, a job killed by signal N exits 128+N and one that failed without an exit code exits 1;
with --with-background it follows and waits for the foreground job (systemd stops the loop when it
ends). Ctrl-C stops following but leaves the job running."""
