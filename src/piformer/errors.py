"""Exceptions that are not bad input, each with its own CLI exit status (see piformer.cli).

Bad input is ValueError / FileNotFoundError (exit 2); a diverged run is a result (exit 3).
Kept free of heavy imports so the CLI can catch them without importing torch.
"""


class RunInUseError(RuntimeError):
    """Another process holds the run directory: a lost race, not bad input (exit 75)."""


class RunTerminated(KeyboardInterrupt):
    """SIGTERM arrived: training stops as on Ctrl-C and the run records 'terminated' (exit 143)."""
