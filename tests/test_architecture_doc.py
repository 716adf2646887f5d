"""docs/architecture.md's tree is the map of sd_scripts_lorax/: every module is on it, and everything
on it exists (a moved or deleted module fails here until the map follows)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sd_scripts_lorax"


def listed_paths() -> set[str]:
    """Paths relative to sd_scripts_lorax/ named by the tree block of docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("```", 2)[1].splitlines()
    start = block.index("sd_scripts_lorax/")
    paths: set[str] = set()
    stack: list[str] = []
    for line in block[start + 1:]:
        if not line.startswith("  "):
            break  # the next top-level entry (tests/, benchmarks/, ...)
        depth = (len(line) - len(line.lstrip(" "))) // 2
        names, desc = (re.split(r"\s{2,}", line.strip(), maxsplit=1) + [""])[:2]
        stack = stack[: depth - 1]
        for name in (n.strip() for n in names.split(",")):
            prefix = "".join(stack)
            if name.endswith("/"):
                paths.add(prefix + name)
                # a folder line may name its modules in its description ("env.py (...), workspace.py")
                paths.update(prefix + name + m for m in re.findall(r"\b(\w+\.py)\b", desc))
                stack.append(name)
            else:
                paths.add(prefix + name)
    return paths


def test_every_module_is_on_the_map():
    listed = listed_paths()
    modules = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")}
    missing = sorted(m for m in modules if m not in listed and not m.endswith("/__init__.py"))
    assert not missing, f"modules missing from docs/architecture.md: {missing}"


def test_everything_on_the_map_exists():
    stale = sorted(p for p in listed_paths() if not (PKG / p).exists())
    assert not stale, f"docs/architecture.md names what does not exist: {stale}"


def test_the_parser_reads_nested_folders():
    listed = listed_paths()
    assert {"lorax/bases.py", "transfer/distill/fit.py", "testing/embedded/render.py", "testing/kohya/env.py",
            "train/buckets.py", "demo.py"} <= listed


def test_references_point_inside_the_repo():
    """Docs and code cite docs/design.md and docs/kohya-contract.md, never files outside the repo."""
    outside = re.compile(r"DESIGN\.md|kohya-interfaces\.md|lorax-paper\.md|issue notes")
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".toml") and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    hits = [h for h in hits if not h.startswith("tests/test_architecture_doc.py")]
    assert not hits, f"references to files outside the repo: {hits}"
    for cited in ("docs/design.md", "docs/kohya-contract.md"):
        assert (REPO / cited).is_file()
