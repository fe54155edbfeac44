"""Choices made by timing (a convolution's cuDNN algorithms and engine), kept on disk so that a
process running a net this machine has run before skips the timing, as cuDNN's own users keep
"find" results.  One JSON file per machine set-up: the GPU model, its driver, CUDA, cuDNN, CuPy,
Espresso's version and this file's FORMAT name it, so a change of any of them starts a new file
rather than reusing stale choices; what else a choice depends on (the shapes, the numerics
policy, TF32) is in its key.

The directory is $ESPRESSO_CACHE_DIR, else $XDG_CACHE_HOME/espresso, else ~/.cache/espresso;
ESPRESSO_CACHE_DIR set empty turns the cache off.  Writes replace the file atomically (a
temporary file and a rename), merged with what other processes (MPI ranks on the machine) wrote
meanwhile; an unreadable file counts as empty, and the reader checks each entry it takes.  Only
choices are kept, never results: a cached choice runs kernels a fresh timing could have picked.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

# of the entries (espresso/layers/vision.py writes and checks them), and of the rule that made
# them: 2 since near-tied algorithms are chosen by least workspace
FORMAT = 2


def cache_dir():
    """Where the choice files live, or None when the cache is off."""
    chosen = os.environ.get("ESPRESSO_CACHE_DIR")
    if chosen is not None:
        return Path(chosen) if chosen else None
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home (a container's arbitrary user): no cache
            return None
    return Path(base) / "espresso"


class Choices:
    """{key: value} of JSON values for one machine set-up `context` ({what: version}), backed by
    a file in `folder` (None: in memory only)."""

    def __init__(self, folder, context):
        context = {**context, "format": FORMAT}
        digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(folder) / f"choices-{digest}.json" if folder is not None else None
        self.known = self._read()

    def _read(self):
        if self.path is None:
            return {}
        try:
            known = json.loads(self.path.read_text())
            return known if isinstance(known, dict) else {}
        except (OSError, ValueError):  # no file yet, or a damaged one
            return {}

    def get(self, key):
        return self.known.get(key)

    def put(self, key, value):
        """Keep `value` under `key`, in memory and (merged with the file's newer entries) on disk."""
        self.known[key] = value
        if self.path is None:
            return
        temporary = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.known = {**self._read(), **self.known}
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".choices-")
            with os.fdopen(handle, "w") as f:
                json.dump(self.known, f)
            os.replace(temporary, self.path)
        except OSError:  # a read-only home, a full disk: the choices are kept for this process only
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)
            self.path = None
