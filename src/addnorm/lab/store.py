"""``runs.jsonl``: one JSON record per finished run, appended and flushed to disk as it
finishes, so a lab killed at any moment (even by SIGKILL) and started again with the
same directory skips what is recorded, loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path


class RunStore:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "runs.jsonl"

    def records(self) -> list[dict]:
        """Every complete record; a last line cut short by a kill is not one."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def done(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def append(self, record: dict) -> None:
        """Write one record as a line, flushed and synced before returning; a partial
        line left by a kill is closed first, so the new record stands on its own line."""
        line = json.dumps(record, sort_keys=True, allow_nan=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
