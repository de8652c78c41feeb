"""The GPU program's report: one JSON and one markdown file, rewritten after every item so a run
cut short (a device call that hits its limit) still leaves every figure measured until then.

Sections are keyed by check; a later run into the same folder keeps the sections it does not
redo (the device plan runs the program over two calls and merges them into one report).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

# Rendering order of the sections (the order the program runs them in).
ORDER = ("env", "mask", "gpu_check", "decode", "fidelity")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Report:
    """`sections[check] = {"status", "items": [...], "lines": [markdown...], ...}`."""

    def __init__(self, folders: list[Path], name: str, title: str):
        self.folders, self.name, self.title = [Path(f) for f in folders], name, title
        for f in self.folders:
            f.mkdir(parents=True, exist_ok=True)
        self.data = {"title": title, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
        old = self.folders[0] / f"{name}.json"
        if old.exists():
            self.data["sections"] = json.loads(old.read_text()).get("sections", {})
        self.renderers: dict[str, Callable[[dict], list[str]]] = {}

    def section(self, check: str, renderer: Callable[[dict], list[str]], **head) -> dict:
        """A fresh section for `check` (replacing one of an earlier run)."""
        self.renderers[check] = renderer
        self.data["sections"][check] = {"status": "running", "items": [], **head}
        self.write()
        return self.data["sections"][check]

    def add(self, check: str, item: dict) -> None:
        self.data["sections"][check]["items"].append(item)
        self.write()

    def finish(self, check: str, status: str, **extra) -> None:
        self.data["sections"][check].update(status=status, **extra)
        self.write()

    def markdown(self) -> str:
        L = [f"# {self.title}\n", f"Started {self.data['started']}; written {time.strftime('%H:%M:%S')}.\n"]
        for check in sorted(self.data["sections"], key=lambda c: ORDER.index(c) if c in ORDER else len(ORDER)):
            sec = self.data["sections"][check]
            L.append(f"## {check} ({sec['status']})\n")
            render = self.renderers.get(check)
            if render is not None:
                L += render(sec)
            else:  # a section from an earlier run of the program: its markdown was kept with it
                L += sec.get("md", [])
            L.append("")
        return "\n".join(L) + "\n"

    def write(self) -> None:
        for check, sec in self.data["sections"].items():
            if check in self.renderers:
                sec["md"] = self.renderers[check](sec)
        text, md = json.dumps(self.data, indent=1, default=str), self.markdown()
        for f in self.folders:
            _atomic_write(f / f"{self.name}.json", text)
            _atomic_write(f / f"{self.name}.md", md)
