"""Writes a reference fixture as JSON that diffs well: one header key per line, then each list one item per line."""
import json
from pathlib import Path


def write(path: Path, header: dict, lists: dict):
    lines = [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in header.items()]
    for name, items in lists.items():
        body = ",\n".join(json.dumps(item, ensure_ascii=False) for item in items)
        lines.append(f"{json.dumps(name)}: [\n{body}\n]")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
