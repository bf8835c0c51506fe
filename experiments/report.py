"""Rebuilds `docs/results.md` from the studies' committed results.

    python -m experiments.report

For each study (every `configs/studies/<name>.py` with its `experiments/<name>.py`, in the
order of their numbers): its title, the paper's claim, and for each size that has results
(`results/studies/<name>/<size>.md` and `.png`, written by the study script) the table with its
seeds and command, the verdict computed from the numbers, the figure, and our reading of the
result where one is written (`results/studies/<name>/<size>.reading.md`: why we think a
direction did not reproduce, or what a number does not show). Nothing else in the page is typed
by hand beyond the claims: rerun the studies, then this, to regenerate it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from experiments.study import CONFIGS, RESULTS, SIZES, Study

STUDIES = tuple(sorted(path.stem for path in CONFIGS.glob("*.py")))
DOCS = Path("docs/results.md")
PREAMBLE = """# Results

Each section is one study of `experiments/`: the claim of the paper it tests, then, for each
size that has been run, the table of the mean and standard deviation over seeds, the command
that regenerates it, whether the claim's direction reproduces (computed from the numbers by
the study's `verdict`), and its figure. `quick` sizes only exercise the scripts (they are what
the tests run); `default` is the CPU protocol and `full` the paper's. This page is written by
`python -m experiments.report` from `results/studies/`; a study or size with no section has
not been run yet.
"""


def section(study: Study, results: Path, docs: Path) -> list[str]:
    heading = f"## {study.number}. {study.title} (`experiments/{study.name}.py`)"
    lines = [heading, "", f"Claim: {study.claim}", ""]
    ran = False
    for size in SIZES:
        table = results / study.name / f"{size}.md"
        if not table.exists():
            continue
        ran = True
        lines += [f"### {size}", "", table.read_text().strip(), ""]
        figure = results / study.name / f"{size}.png"
        if figure.exists():
            relative = Path(os.path.relpath(figure, docs.parent)).as_posix()
            lines += [f"![{study.title}, {size}]({relative})", ""]
        reading = results / study.name / f"{size}.reading.md"
        if reading.exists():
            lines += [f"**Reading** (by hand): {reading.read_text().strip()}", ""]
    if not ran:
        lines += [f"Not run yet: `{study.command('default')}`.", ""]
    return lines


def build(results: Path = RESULTS, docs: Path = DOCS) -> str:
    """The page's markdown, from every study's results under `results`."""
    lines = [PREAMBLE]
    studies = [importlib.import_module(f"experiments.{name}").STUDY for name in STUDIES]
    for study in sorted(studies, key=lambda study: study.number):
        lines += section(study, results, docs)
    return "\n".join(lines)


def main() -> None:
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(build())
    print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
