"""Reading and writing Caffe's text (.prototxt) and small binary files, with errors that name the place.

Parsing goes through protobuf only: loading a file never runs code.  Large weight files
(.caffemodel) go through `espresso.proto.weights`, which keeps memory near the weights' size.
"""

import os
import re
import stat
import tempfile
import warnings

from google.protobuf import message as pb_message
from google.protobuf import text_format

from espresso.errors import ModelFileError, PrototxtError
from espresso.proto import caffe_pb2

# A backslash that starts no escape Python's protobuf decodes (C's, less the rare "\?").
_BAD_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\(?![abfnrtv\\'\"0-7xuU])")
# One token of prototxt: a quoted string, a comment, a brace, or a bare word (field name, value).
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|[{}<>]|[^\s{}<>:"\'#]+|:')


def parse_text(text, message, filename="<string>"):
    """Merge prototxt `text` into `message`; a syntax error names file, line and column.

    A non-repeated field given twice is an error, as in Caffe (C++ TextFormat::Parse), not
    "last one wins" (text_format.Merge).
    """
    try:
        with warnings.catch_warnings():
            # Python protobuf lets a bad escape such as "\{" through with only this warning and
            # keeps the backslash; C++ protobuf (Caffe) refuses the file.
            warnings.filterwarnings("error", category=DeprecationWarning, module=r"google\.protobuf\.")
            text_format.Parse(text, message)
    except text_format.ParseError as e:
        line, column = e.GetLine(), e.GetColumn()
        detail = str(e).split(" : ", 1)[-1]
        raise PrototxtError(f"{filename}:{line}:{column}: {detail}") from None
    except DeprecationWarning as e:
        detail = str(e).rsplit("(DeprecationWarning: ", 1)[-1].rstrip(")")
        raise PrototxtError(f"{filename}:{_bad_escape_line(text)}: {detail} in a string") from None
    return message


def _bad_escape_line(text):
    """Line of the first quoted string holding an escape C++ protobuf does not accept."""
    for match in _TOKEN.finditer(text):
        if match.group()[:1] in "\"'" and _BAD_ESCAPE.search(match.group()):
            return text.count("\n", 0, match.start()) + 1
    return "?"


def read_text(path, message):
    """Parse the prototxt file at `path` into `message` (a fresh caffe_pb2 message)."""
    return parse_text(_read(path, "r"), message, str(path))


def require_regular(path, error=ModelFileError):
    """Refuse what is not a regular file (a device such as /dev/zero, a pipe): reading it has no
    size to end at.  A missing path is left to the open() that follows, which says so."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        raise error(f"{path}: not a regular file ({'a folder' if stat.S_ISDIR(mode) else 'a device or a pipe'})")


def _read(path, mode):
    require_regular(path)
    try:
        with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            return f.read()
    except UnicodeDecodeError:
        raise PrototxtError(f"{path}: not a text file (is it a binary .caffemodel?)") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror}") from None


def block_lines(text, names=("layer", "layers")):
    """1-based starting line of each top-level `name { ... }` block, in file order.

    Net errors use these to cite the line of the offending layer.
    """
    lines, depth, line, last, pending = [], 0, 1, 0, None
    for match in _TOKEN.finditer(text):
        token = match.group()
        line += text.count("\n", last, match.start())
        last = match.start()
        if token in ("{", "<"):
            if depth == 0 and pending is not None:
                lines.append(pending)
            depth += 1
        elif token in ("}", ">"):
            depth -= 1
        if token != ":":
            pending = line if depth == 0 and token in names else None
    return lines


def read_net_text(path):
    """A NetParameter from a prototxt file, plus the starting line of each layer block."""
    text = _read(path, "r")
    net = parse_text(text, caffe_pb2.NetParameter(), str(path))
    return net, block_lines(text)


def read_binary(path, message):
    """Parse a small binary protobuf file (.binaryproto, .solverstate)."""
    data = _read(path, "rb")
    try:
        message.ParseFromString(data)
    except pb_message.DecodeError as e:
        raise ModelFileError(f"{path}: truncated or corrupt {type(message).__name__}: {e}") from None
    return message


def atomic_write(path, write):
    """Write a file through a temporary beside it and a rename, so a crash never leaves half a
    file.  It gets the mode a plain open() would give it (0644 under the usual umask: others
    may read it, as Caffe's files), not the temporary's 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w+b") as f:  # readable too: HDF5 reads back what it wrote
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename: a power cut leaves the old file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_binary(path, message):
    atomic_write(path, lambda f: f.write(message.SerializeToString()))


def write_text(path, message):
    atomic_write(path, lambda f: f.write(to_text(message).encode()))


_INTEGRAL_FLOAT = re.compile(r"^(\s*\w+: -?\d+)\.0$", re.M)


def to_text(message):
    """Protobuf's text format as Caffe's C++ writes it: an integral float is `1`, not `1.0`
    (strings are quoted and integers have no point, so only floats match)."""
    return _INTEGRAL_FLOAT.sub(r"\1", text_format.MessageToString(message))
