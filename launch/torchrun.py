"""torchrun, as `python -m launch.train` runs it: the same arguments (torch.distributed.run's parser), plus

- clean stops: SIGTERM/SIGINT are passed to the training processes (which finish the step, write a checkpoint
  and exit) instead of torchrun's own handling (a SignalException traceback, and SIGKILL after 30 s however far
  the checkpoint got);
- one-line errors: when the ranks exit with one of dig train's documented codes (2 configuration/data/resume
  error, 3 aborted, 75 stopped) their message is already printed once by rank 0; this exits with that code
  without torchrun's ChildFailedError report. Any other failure keeps torchrun's report;
- no orphans: this process dies with the launcher (PR_SET_PDEATHSIG), and the training processes, which torchrun
  starts in sessions of their own, die with this one (dig train sets it for itself under torchrun).
"""
from __future__ import annotations

import glob
import logging
import os
import signal
import sys

from dig.cli import EXIT_ABORTED, EXIT_STOPPED, EXIT_USER_ERROR
from dig.lifeline import die_with_parent

EXPECTED_EXIT_CODES = (EXIT_USER_ERROR, EXIT_ABORTED, EXIT_STOPPED)


def _children() -> list[int]:
    pids = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


class _QuietExpectedFailures(logging.Filter):
    """Drops torchrun's 'failed (exitcode: N)' line for the codes whose message the ranks printed, and its notes
    on signalling the remaining ranks when one has ended (a failure's report lists them anyway)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "closing signal" in message:
            return False
        return not any(f"(exitcode: {code})" in message for code in EXPECTED_EXIT_CODES)


def main(argv: list[str] | None = None) -> int:
    launcher = os.environ.get("DIG_LAUNCHER_PID")
    die_with_parent(expected_parent=int(launcher) if launcher else None)
    os.environ["DIG_AGENT_PID"] = str(os.getpid())   # the workers' parent, for their own die_with_parent

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    started = False

    def forward(signum, _frame):
        nonlocal started
        workers = _children()
        if not workers:
            if not started:
                raise KeyboardInterrupt  # no rank started yet: leave (torchrun cleans up)
            return                       # the ranks have ended already
        started = True
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(["--signals-to-handle=SIGHUP,SIGQUIT", *argv])
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    quiet = _QuietExpectedFailures()
    for name in ("", "torch", "torch.distributed"):   # torch logs through handlers of its own
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(quiet)
    try:
        run(args)
    except ChildFailedError as exc:
        # The first rank to fail says what happened; the others were then stopped by torchrun.
        code = exc.get_first_failure()[1].exitcode
        if code in EXPECTED_EXIT_CODES:
            return code
        raise
    except KeyboardInterrupt:
        print("launch: stopped before training started", file=sys.stderr)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
