"""The fault suite's counts: every trial that breaks something on purpose (a kill, a damaged
file, a bad input, a full disk, a write attempt through `sql`) records what it saw here, and the
test session prints the totals (see pytest_terminal_summary in conftest.py).

The tests assert each outcome themselves; the tally is the summary a reader of the CI log needs:
how many trials, how many ended in a clear error, and that tracebacks, mixed states and stale
rows served stayed at zero.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

OUTCOMES = ("clear error", "traceback", "mixed state", "stale rows served", "next run succeeded")


@dataclass
class FaultTally:
    trials: Counter = field(default_factory=Counter)  # category -> trials
    outcomes: Counter = field(default_factory=Counter)  # outcome -> trials that showed it

    def record(self, category: str, *, clear_error: bool = False, traceback: bool = False,
               mixed_state: bool = False, stale_rows: bool = False,
               next_run_succeeded: bool = False) -> None:
        self.trials[category] += 1
        for outcome, seen in zip(OUTCOMES, (clear_error, traceback, mixed_state, stale_rows,
                                            next_run_succeeded)):
            self.outcomes[outcome] += int(seen)

    def recovered(self) -> None:
        """The run after a series of trials (already recorded) succeeded."""
        self.outcomes["next run succeeded"] += 1

    def record_cli(self, category: str, result, *, mixed_state: bool = False) -> None:
        """A refused command run through click's CliRunner: clear when it exited with status 1
        and one `Error:` line, without a traceback."""
        traceback = "Traceback" in result.output or not (
            result.exception is None or isinstance(result.exception, SystemExit))
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        self.record(category, clear_error=result.exit_code != 0 and len(errors) == 1
                    and not traceback, traceback=traceback, mixed_state=mixed_state)

    def summary(self) -> list[str]:
        if not self.trials:
            return []
        total = sum(self.trials.values())
        return [f"fault suite: {total} trials ("
                + ", ".join(f"{c} {n}" for c, n in sorted(self.trials.items())) + ")",
                "  " + ", ".join(f"{o}: {self.outcomes[o]}" for o in OUTCOMES)]


TALLY = FaultTally()
