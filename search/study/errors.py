"""The study's own failure: it cannot go on. Trial failures are `StageError`s of the trial pipeline."""

from mtp_abliterate.search.errors import UserError


class StudyError(UserError, RuntimeError):
    """The study cannot go on (vanilla model failing, too many failures in a row, disk full); one line + fix."""
