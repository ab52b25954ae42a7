"""Small CSV files for the ingest tests: a header and rows of ``gene,position,label,score``."""

from pathlib import Path

HEADER = "gene,position,label,score"


def write_rows(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return path


def simple_rows(n: int, start: int = 0) -> list[str]:
    return [f"G{(i * 7) % 50:03d},{i},{i % 3},{(i * 0.37) % 1:.4f}" for i in range(start, start + n)]
