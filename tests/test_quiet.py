"""Library output on a study goes to its folder's libraries.log, or stays on the terminal under --verbose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = """
import os, sys, warnings
from pathlib import Path
from mtp_abliterate.search import quiet
quiet.set_verbose(sys.argv[2] == "verbose")
quiet.quiet_libraries(Path(sys.argv[1]))
os.write(2, b"C-library line\\n")
warnings.warn("a library warning")
print("a stderr line", file=sys.stderr)
quiet.restore_stderr()
print("after restore", file=sys.stderr)
print("the tool's own line")
"""


def _run(log: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, str(log), mode], capture_output=True, text=True, check=True)


def test_library_output_goes_to_the_log_and_comes_back_after_restore_or_stays_with_verbose(tmp_path: Path) -> None:
    log = tmp_path / "study" / "libraries.log"
    quiet = _run(log, "quiet")
    routed = log.read_text()
    for line in ("C-library line", "a library warning", "a stderr line"):
        assert line in routed and line not in quiet.stderr
    assert quiet.stderr.strip() == "after restore" and quiet.stdout.strip() == "the tool's own line"

    log2 = tmp_path / "verbose" / "libraries.log"
    verbose = _run(log2, "verbose")
    assert not log2.exists()
    for line in ("C-library line", "a library warning", "a stderr line", "after restore"):
        assert line in verbose.stderr


def test_the_organism_builders_report_renders_from_what_its_check_recorded() -> None:
    """`organism build` prints the check's measurements (organism/card.json holds the shipped organism's): a key the
    table reads and the check does not write crashed the build after it had finished."""
    import json

    from rich.console import Console

    from mtp_abliterate.search.views import measured_table

    measured = json.loads((Path(__file__).parents[1] / "organism" / "card.json").read_text())["measured"]
    console = Console(record=True, width=140)
    console.print(measured_table(measured))
    assert f"{measured['vanilla']['acceptance']['harmful']['mean_accepted_tokens']:.3f}" in console.export_text()
