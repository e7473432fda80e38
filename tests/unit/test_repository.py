"""The repository stands alone: code and docs cite no file a user of the repository lacks."""
import os

from tests.support import REPO

# Notes that live beside the repository on the developers' machines, not in it.
OUTSIDE = tuple(name + ".md" for name in ("REFERENCE", "STYLE", "ENVIRONMENT")) + ("../" + "shared",)
TEXT = (".py", ".md", ".sh", ".yaml", ".yml", ".ini", ".cfg", ".txt")


def test_no_citation_of_files_outside_the_repository():
    hits = []
    for top in ("cmscale", "tools", "launch", "benchmarks", "configs", "docs", "tests"):
        for dirpath, _, files in os.walk(REPO / top):
            for name in files:
                if not name.endswith(TEXT):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    for i, line in enumerate(f, 1):
                        if any(o in line for o in OUTSIDE):
                            hits.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
    for name in ("README.md", "setup.py", "pytest.ini"):
        text = (REPO / name).read_text()
        hits += [f"{name}: {o}" for o in OUTSIDE if o in text]
    assert not hits, "\n".join(hits)
