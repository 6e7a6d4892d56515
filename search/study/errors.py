"""The study's own failure: it cannot go on. Trial failures are `StageError`s of the trial pipeline."""


class StudyError(RuntimeError):
    """The study cannot go on (vanilla model failing, too many failures in a row, disk full); one line + fix."""
