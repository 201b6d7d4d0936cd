"""What a commit must not carry: the paths of the machine it was made on."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: absolute paths that only exist on somebody's machine: a home directory, a
#: workspace, a pyenv interpreter (this file is the one place they are named)
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|root|home|Users)/[\w.-]+|\.pyenv/versions/")


def _tracked() -> list[str]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: no tracked files to read")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [name for name in out.decode().split("\0") if name]


def test_no_tracked_file_names_a_path_of_the_machine_it_was_written_on():
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()
    found = []
    for name in _tracked():
        path = ROOT / name
        if name == me or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # not text
        for lineno, line in enumerate(text.splitlines(), 1):
            match = MACHINE_PATH.search(line)
            if match:
                found.append(f"{name}:{lineno}: {match.group(0)}")
    assert found == [], "paths of a developer's machine in tracked files:\n" + "\n".join(found)


def test_the_check_sees_such_a_path():
    """The pattern would catch the comment this file's first test found in
    a plugin's source (a benchmark run "from /work/main"), and leaves a
    path inside the tree or a system path alone."""
    assert MACHINE_PATH.search("# from /work/main with the venv's python")
    assert MACHINE_PATH.search("File /root/.pyenv/versions/3.11.7/lib/x.py")
    assert MACHINE_PATH.search("see /home/alice/hsu/notes")
    assert not MACHINE_PATH.search("docs/work/notes.md, /usr/sbin/nginx, /tmp/x, ~/work/y")
