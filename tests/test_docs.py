"""The docs stand alone: every file they name exists, every relative link resolves, and nothing in the
repository points to notes outside it. And the public API is what rsnl/__init__.py says."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): every file below the repo
        return [p for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]
    return [REPO / line for line in out.stdout.splitlines()]


def test_files_and_links_named_in_the_docs_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for path in re.findall(r"`((?:rsnl|tune|analysis|benchmarks|tests|docs)/[\w/.-]+\.(?:py|md|yaml|sh|ipynb))`", text):
            if not (REPO / path).exists():
                missing.append(f"{doc.name}: {path}")
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative Markdown links
            if not (doc.parent / link).exists():
                missing.append(f"{doc.name}: link {link}")
    assert not missing, missing


def test_nothing_points_outside_the_repository():
    design = "DES" + "IGN"  # spelled apart so that this file does not match itself
    pattern = re.compile(rf"{design}(\.md| section)|\.\./shared")
    hits = [f"{p.relative_to(REPO)}:{n}" for p in tracked_files() if p.suffix in {".py", ".md", ".yaml", ".sh", ".ipynb", ".toml"}
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_public_api_is_lazy_and_complete():
    code = ("import sys, rsnl, rsnl.config; assert 'torch' not in sys.modules, 'torch imported'; "
            "import rsnl.models, rsnl.trainer, rsnl.similarity; "
            "assert rsnl.load_clip is rsnl.models.load_clip and rsnl.Trainer is rsnl.trainer.Trainer; "
            "assert all(getattr(rsnl, n) is not None for n in rsnl.__all__); print(len(rsnl.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) >= 15
