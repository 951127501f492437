"""Set-up files agree with each other and with what the code imports."""
import re

from conftest import REPO


def pins(lines):
    return {re.split(r"[=<>\[]", line.strip())[0].lower(): line.strip() for line in lines
            if line.strip() and not line.strip().startswith("#")}


def test_bwr_yml_and_requirements_agree():
    req = pins(open(REPO / "requirements.txt").read().splitlines())
    yml = [line.strip()[2:] for line in open(REPO / "bwr.yml").read().splitlines()
           if line.startswith("    - ")]
    assert pins(yml) == req
    assert req["torch"] == "torch==2.13.0"


def test_ci_runs_the_readme_test_command():
    assert "make test" in open(REPO / ".ci/run").read()
    readme = open(REPO / "README.md").read()
    assert "make demo" in readme and "make test" in readme


def test_readme_reads_in_one_sitting():
    """The README is the front door (at most 300 lines); details live in docs/, each page short enough to read."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
    for page in (REPO / "docs").glob("*.md"):
        assert len(page.read_text().splitlines()) <= 250, page.name
