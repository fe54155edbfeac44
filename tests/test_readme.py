"""Every command block of the README runs as written, so the README cannot drift from the code.

The blocks run in order, in a copy of the repository (its tracked files), whose example solvers
stop at ITERATIONS iterations instead of 10,000 (the README says so; the snapshots they score
are then _iter_ITERATIONS).  `bash tools/test.sh` is not run: it is this suite (.ci/run runs it).
`python3 -m pip` finds a stand-in that installs nothing (the suite's environment already has
every extra), so the copy never replaces the installed package; the copy's own code runs
(`python3 -m espresso.cli`, and PYTHONPATH for the `espresso` command).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 200
SOLVERS = ("examples/lenet/lenet_solver.prototxt", "examples/lenet_300_100/lenet_300_100_solver.prototxt")


def blocks(text):
    """(language, [commands]) of each fenced block; a command's continuation lines joined."""
    found = []
    for language, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S):
        if language == "python":
            found.append((language, [body]))
        elif language == "bash":
            joined = re.sub(r"\\\n\s*", " ", body)
            found.append((language, [line for line in joined.splitlines() if line.strip()]))
    return found


def test_the_readme_has_runnable_blocks_only():
    found = blocks((ROOT / "README.md").read_text())
    languages = [language for language, _ in found]
    assert languages.count("bash") >= 3 and "python" in languages
    for _, commands in found:
        for command in commands:
            assert not re.search(r"\[--|\|\s*(convert|compress)|<\w+>", command), f"a synopsis: {command}"
    assert "bash tools/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """The repository's tracked files, its solvers cut to ITERATIONS iterations."""
    work = tmp_path_factory.mktemp("readme")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, work / name)
    (work / ".no-pip" / "pip").mkdir(parents=True)
    (work / ".no-pip" / "pip" / "__init__.py").write_text("")
    (work / ".no-pip" / "pip" / "__main__.py").write_text("import sys\nprint('(not installing)', *sys.argv[1:])\n")
    if sys.prefix == sys.base_prefix:  # not in a virtualenv: the one the set-up commands would make, seeing ours
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", work / ".venv"],
                       check=True)
    for solver in SOLVERS:
        text = (work / solver).read_text()
        text = re.sub(r"max_iter: \d+", f"max_iter: {ITERATIONS}", text)
        text = re.sub(r"test_interval: \d+", "test_interval: 100", text)
        text = re.sub(r"test_iter: \d+", "test_iter: 10", text)
        (work / solver).write_text(re.sub(r"snapshot: \d+", f"snapshot: {ITERATIONS}", text))
    return work


def run(command, work):
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHONPATH": f"{work / '.no-pip'}:{work}", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_readme_block_runs_as_written(copy):
    ran = []
    for language, commands in blocks((copy / "README.md").read_text()):
        for command in commands:
            if language == "python":
                command = f"python3 - <<'EOF'\n{command}EOF"
            elif command.split("#")[0].strip() == "bash tools/test.sh":
                continue  # the suite itself
            command = command.replace("_iter_10000", f"_iter_{ITERATIONS}")
            result = run(command, copy)
            assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
            ran.append(command)
    assert len(ran) >= 12
    assert (copy / "examples/lenet/curves_from_log.png").stat().st_size > 10_000
    assert (copy / "examples/lenet_300_100/lenet_300_100.espz").stat().st_size < 60_000
    assert not subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout \
        .count("examples/")  # the checkout itself was left alone
