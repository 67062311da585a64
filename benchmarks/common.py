"""What the benchmark scripts share."""
from __future__ import annotations

import json
from pathlib import Path


def emit(out: dict, path: str | None) -> dict:
    """Print the result JSON and, with ``path``, write it there too."""
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return out
