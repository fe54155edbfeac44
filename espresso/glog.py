"""Logs in glog's line format, so the tools written for Caffe's logs read Espresso's.

Each line starts `I1205 23:07:36.123456 12345 solver.py:302] ` (severity I/W/E/F, month and
day, time to the microsecond, thread id, source file and line), the messages those tools look
for ("Iteration N, loss = ...", "Test net output #0: ...", "Solving ...") worded as Caffe's.
Settings come from glog's environment variables and flags:
  minloglevel (GLOG_minloglevel): 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL and above are written;
  logtostderr (GLOG_logtostderr): stderr only, no file;
  log_dir (GLOG_log_dir): also write `<program>.<host>.<user>.log.INFO.<date>-<time>.<pid>`
  there, with the link `<program>.INFO` to the latest, as glog does.
Unlike glog, no file is written unless a log_dir is given (glog's default is /tmp).
"""

import datetime
import getpass
import logging
import os
import socket
import sys
import threading

from espresso.errors import EspressoError

SEVERITIES = (logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)  # glog's 0..3
LETTERS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E", logging.CRITICAL: "F"}
FALSE = ("0", "false", "no", "f", "n", "")
BOOL_FLAGS = ("logtostderr", "alsologtostderr", "colorlogtostderr", "stop_logging_if_full_disk")
VALUE_FLAGS = ("minloglevel", "log_dir", "stderrthreshold", "v", "vmodule", "logbuflevel", "logbufsecs",
               "max_log_size")


class GlogFormatter(logging.Formatter):
    """glog's prefix on the first line of each record."""

    def formatMessage(self, record):
        t = datetime.datetime.fromtimestamp(record.created)
        return (f"{LETTERS.get(record.levelno, 'I')}{t:%m%d %H:%M:%S}.{t.microsecond:06d} "
                f"{threading.get_native_id():5d} {record.filename}:{record.lineno}] {record.getMessage()}")


def split_flags(argv):
    """(argv without glog's flags, {flag: value}); --flagfile=F's lines (one flag each, # comments)
    are read in place, as gflags does.  Flags take one or two dashes, `=value` or the next word;
    a boolean flag stands alone, or as --noflag, or with =true/false."""
    rest, flags, words = [], {}, list(argv)
    while words:
        word = words.pop(0)
        name, eq, value = word.lstrip("-").partition("=")
        if not word.startswith("-") or word in ("-", "--"):
            rest.append(word)
        elif name == "flagfile":
            words[:0] = _flagfile(value if eq else (words.pop(0) if words else ""))
        elif name in BOOL_FLAGS or (name[:2] == "no" and name[2:] in BOOL_FLAGS):
            flags[name.removeprefix("no") if name not in BOOL_FLAGS else name] = \
                (value if eq else "1") if name in BOOL_FLAGS else "0"
        elif name in VALUE_FLAGS:
            if not eq and not words:
                raise EspressoError(f"flag --{name} needs a value")
            flags[name] = value if eq else words.pop(0)
        else:
            rest.append(word)
    return rest, flags


def _flagfile(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise EspressoError(f"--flagfile {path}: cannot read: {e.strerror}") from None
    return [line for line in lines if line and not line.startswith("#")]


def settings(flags=None):
    """{minloglevel, logtostderr, log_dir}: the flags given (a dict), else GLOG_* variables."""
    flags = dict(flags or {})
    env = {name: os.environ[f"GLOG_{name}"] for name in ("minloglevel", "logtostderr", "log_dir")
           if f"GLOG_{name}" in os.environ}
    value = {**env, **flags}
    try:
        level = int(value.get("minloglevel", 0))
    except ValueError:
        raise EspressoError(f"minloglevel must be an integer 0-3, got {value['minloglevel']!r}") from None
    return {"minloglevel": level, "logtostderr": str(value.get("logtostderr", "0")).lower() not in FALSE,
            "log_dir": value.get("log_dir", "")}


def install(flags=None, program="espresso", stream=None):
    """Send this process's log records (the root logger's) to stderr, and to a file in log_dir,
    in glog's format at the minloglevel of `flags` or the environment; replaces an earlier
    install.  Returns the log file's path, or None."""
    s = settings(flags)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h.formatter, GlogFormatter)]:
        root.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(stream or sys.stderr)]
    path = None
    if s["log_dir"] and not s["logtostderr"]:
        path = _log_file(s["log_dir"], program)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(GlogFormatter())
        root.addHandler(handler)
    root.setLevel(SEVERITIES[min(max(s["minloglevel"], 0), 3)])
    return path


def _log_file(folder, program):
    """A new file named as glog names them, and the <program>.INFO link to it."""
    if not os.path.isdir(folder):
        raise EspressoError(f"log_dir {folder}: no such directory")
    now = datetime.datetime.now()
    name = (f"{program}.{socket.gethostname()}.{getpass.getuser()}.log.INFO."
            f"{now:%Y%m%d-%H%M%S}.{os.getpid()}")
    link = os.path.join(folder, f"{program}.INFO")
    if os.path.islink(link) or not os.path.exists(link):
        if os.path.islink(link):
            os.remove(link)
        os.symlink(name, link)
    return os.path.join(folder, name)


def init_log(level=None, stderr=None):
    """pycaffe's init_log([level[, stderr]]): log in glog's format from now on, INFO and up (or
    `level` and up: 0 INFO .. 3 FATAL); stderr=True: to stderr only (no log_dir file)."""
    flags = {}
    if level is not None:
        flags["minloglevel"] = int(level)
    if stderr is not None:
        flags["logtostderr"] = "1" if stderr else "0"
    install(flags, program=os.path.basename(sys.argv[0] or "python") or "python")


def log(message):
    """pycaffe's log: `message` as an INFO line."""
    logging.getLogger("espresso").info("%s", message, stacklevel=2)  # the caller's file and line
