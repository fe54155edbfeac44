"""Logs in glog's format and glog's flags and variables (espresso/glog.py, the CLI)."""

import datetime
import logging
import os
import re
from pathlib import Path

import pytest

import espresso
from espresso import cli, glog
from espresso.errors import EspressoError

# glog's prefix, as Caffe's tools/extra/extract_seconds.py cuts it: severity+MMDD, time, thread, file:line]
GLOG_LINE = re.compile(r"^([IWEF])(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) +\d+ [\w.]+:\d+\] ")


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def test_a_record_in_glogs_format(capsys):
    glog.install({}, stream=None)
    before = datetime.datetime.now().replace(microsecond=0)
    logging.getLogger("espresso").warning("Iteration %d, lr = %s", 100, "0.01")
    line = capsys.readouterr().err.splitlines()[-1]
    match = GLOG_LINE.match(line)
    assert match and match.group(1) == "W"
    assert re.search(r" test_glog\.py:\d+\] Iteration 100, lr = 0\.01$", line)  # the caller's file and line
    month, day, hour, minute, second = map(int, match.groups()[1:6])
    stamp = datetime.datetime(before.year, month, day, hour, minute, second)
    assert abs((stamp - before).total_seconds()) < 5
    assert line.split()[8] == "0.01"  # parse_log.sh's awk '{print $9}' of an lr line


@pytest.mark.parametrize("flags, env, shown", [
    ({}, {}, {"I", "W", "E"}),
    ({"minloglevel": "1"}, {}, {"W", "E"}),
    ({}, {"GLOG_minloglevel": "2"}, {"E"}),
    ({"minloglevel": "0"}, {"GLOG_minloglevel": "2"}, {"I", "W", "E"}),  # a flag beats the variable
])
def test_minloglevel_from_flags_or_the_environment(flags, env, shown, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    glog.install(flags)
    log = logging.getLogger("espresso")
    log.info("i"), log.warning("w"), log.error("e")
    assert {line[0] for line in capsys.readouterr().err.splitlines()} == shown


def test_log_dir_gets_a_file_named_as_glogs_and_logtostderr_writes_none(tmp_path, capsys):
    path = glog.install({"log_dir": str(tmp_path)})
    logging.getLogger("espresso").info("to the file too")
    assert re.fullmatch(r"espresso\.[^.]+.*\.log\.INFO\.\d{8}-\d{6}\.\d+", os.path.basename(path))
    assert "to the file too" in Path(path).read_text() and "to the file too" in capsys.readouterr().err
    assert os.readlink(tmp_path / "espresso.INFO") == os.path.basename(path)
    assert glog.install({"log_dir": str(tmp_path / "other"), "logtostderr": "true"}) is None
    with pytest.raises(EspressoError, match="no such directory"):
        glog.install({"log_dir": str(tmp_path / "missing")})


def test_split_flags_reads_glog_spellings_and_flagfiles(tmp_path):
    (tmp_path / "flags").write_text("# a comment\n--minloglevel=2\n\n-solver=s.prototxt\n")
    argv = ["train", "--logtostderr", "-log_dir", "/x", f"--flagfile={tmp_path / 'flags'}", "--nocolorlogtostderr",
            "-v=1", "--iterations", "3"]
    rest, flags = glog.split_flags(argv)
    assert rest == ["train", "-solver=s.prototxt", "--iterations", "3"]
    assert flags == {"logtostderr": "1", "log_dir": "/x", "minloglevel": "2", "colorlogtostderr": "0", "v": "1"}
    with pytest.raises(EspressoError, match="flagfile .*cannot read"):
        glog.split_flags(["--flagfile", str(tmp_path / "missing")])
    with pytest.raises(EspressoError, match="--minloglevel needs a value"):
        glog.split_flags(["-minloglevel"])


def test_the_cli_accepts_glogs_and_gflags_flags(tmp_path, capsys):
    assert cli.main(["device_query", "-minloglevel", "1", "--logtostderr"]) == 0
    assert "] " not in capsys.readouterr().err  # INFO lines suppressed
    assert cli.main(["train", "--version"]) == 0
    assert capsys.readouterr().out.strip() == f"espresso {espresso.__version__}"
    with pytest.raises(SystemExit) as done:
        cli.main(["-helpfull"])
    assert done.value.code == 0 and "usage: espresso" in capsys.readouterr().out
    assert cli.main(["device_query", "--log_dir", str(tmp_path)]) == 0
    assert (tmp_path / "espresso.INFO").exists()


def test_init_log_and_log_as_pycaffes(capsys):
    espresso.init_log()
    espresso.log("hello from pycaffe")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert GLOG_LINE.match(line) and re.search(r" test_glog\.py:\d+\] hello from pycaffe$", line)
    espresso.init_log(1, True)  # WARNING and up only
    espresso.log("not shown")
    assert capsys.readouterr().err == ""
