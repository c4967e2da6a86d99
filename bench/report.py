"""Printing and saving a benchmark's table: one place for the layout every bench/ script shares."""

import datetime
import os
import subprocess


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    for line in [header] + rows:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def commit() -> str:
    """$TIDAL_COMMIT when set (a copy of the tree whose .git, if any, is not the commit it holds), else
    the checkout's short commit, else "unknown"."""
    if os.environ.get("TIDAL_COMMIT"):
        return os.environ["TIDAL_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def write_markdown(path: str, title: str, header: list[str], rows: list[list[str]]) -> None:
    """Writes ``title`` (prefixed with today's date and the commit) and the table as markdown."""
    with open(path, "w") as f:
        f.write(f"{datetime.date.today().isoformat()}, commit {commit()}: {title}\n\n")
        f.write("| " + " | ".join(header) + " |\n| " + " | ".join("---" for _ in header) + " |\n")
        for line in rows:
            f.write("| " + " | ".join(line) + " |\n")
