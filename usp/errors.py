"""Errors a user can fix (a bad checkpoint, a full disk, a busy run folder, a diverged run): the CLI prints
each as one `error:` line naming the problem and the fix, and exits 2 (`--debug` shows the traceback)."""


class RunError(RuntimeError):
    pass


class CheckpointError(RunError):
    pass


class DiskFullError(RunError):
    pass


class RunLocked(RunError):
    pass
