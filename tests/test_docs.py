"""Markdown in the repository links only to files that exist in the repository."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return [ROOT / line for line in listed.stdout.split()]
    return [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts]


def test_markdown_links_stay_inside_the_repository():
    files = markdown_files()
    assert any(f.name == "README.md" for f in files)
    bad = []
    for md in files:
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if target.startswith("#"):  # a heading of the same page
                continue
            if re.match(r"[a-z]+:", target):
                bad.append(f"{md.relative_to(ROOT)}: {target} (links outside the repository)")
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if ROOT not in path.parents and path != ROOT:
                bad.append(f"{md.relative_to(ROOT)}: {target} (outside the repository)")
            elif not path.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target} (missing)")
    assert not bad, "\n".join(bad)


def test_docs_hold_the_contracts():
    for name in ("two_stream_attention.md", "electra_objective.md", "backends.md", "benchmarks.md"):
        assert (ROOT / "docs" / name).stat().st_size > 1000, name
