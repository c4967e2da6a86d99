"""Printing and saving a benchmark's table: one place for the layout every bench/ script shares."""

import datetime
import subprocess


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    for line in [header] + rows:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def write_markdown(path: str, title: str, header: list[str], rows: list[list[str]]) -> None:
    """Writes ``title`` (prefixed with today's date and the commit) and the table as markdown."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(path, "w") as f:
        f.write(f"{datetime.date.today().isoformat()}, commit {commit or 'unknown'}: {title}\n\n")
        f.write("| " + " | ".join(header) + " |\n| " + " | ".join("---" for _ in header) + " |\n")
        for line in rows:
            f.write("| " + " | ".join(line) + " |\n")
