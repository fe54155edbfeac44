"""Cursors: where a data layer is in its dataset and its random generators, saved with a
snapshot (espresso/solver/resume.py) so that a resumed run reads the batches a straight run
would.  A cursor is plain JSON values; one read back from a file is checked here, field by
field, before a layer takes it."""

import numpy as np

from espresso.errors import ModelFileError


class CursorError(ModelFileError):
    """A saved cursor is malformed (the snapshot file is damaged)."""


def generator_state(rng):
    """A NumPy Generator's state (JSON values), or None for no generator."""
    return None if rng is None else rng.bit_generator.state


def set_generator(rng, state, what="rng"):
    """Give `rng` a state generator_state returned; a malformed one raises CursorError."""
    if rng is None:
        return
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise CursorError(f"{what}: not a saved generator state ({type(e).__name__}: {e})") from None


def mapping(cursor, what="cursor"):
    if not isinstance(cursor, dict):
        raise CursorError(f"{what}: expected a mapping, got {type(cursor).__name__}")
    return cursor


def index(cursor, key, size):
    """cursor[key], a whole number in [0, size)."""
    value = cursor.get(key)
    if type(value) is not int or not 0 <= value < size:
        raise CursorError(f"{key}: expected a whole number in [0, {size}), got {value!r}")
    return value


def permutation(cursor, key, size):
    """cursor[key], an order of range(size), as an int64 array."""
    values = cursor.get(key)
    if (not isinstance(values, list) or len(values) != size or any(type(v) is not int for v in values)
            or sorted(values) != list(range(size))):
        raise CursorError(f"{key}: expected an order of 0..{size - 1}")
    return np.array(values, np.int64)
