"""Layers whose tops need no dataset: Input (filled by the user) and DummyData (by fillers)."""

from espresso.filler import fill
from espresso.layer import Layer, register
from espresso.proto import caffe_pb2


def blob_shape(shape_param):
    """A BlobShape message as a tuple of ints."""
    return tuple(int(d) for d in shape_param.dim)


@register
class InputLayer(Layer):
    """Net input blobs of fixed shapes, filled by the user. Honors input_param.shape."""

    type = "Input"
    param = "input_param"
    exact_bottoms = 0
    min_tops = 1

    def setup(self, bottom, top):
        shapes = self.p.shape
        if len(shapes) not in (1, len(top)):
            self.fail(f"input_param.shape must be given once or once per top ({len(top)}), "
                      f"got {len(shapes)}")
        for k, blob in enumerate(top):
            blob.reshape(blob_shape(shapes[0] if len(shapes) == 1 else shapes[k]))

    def reshape(self, bottom, top):
        pass  # the user reshapes input blobs directly

    def forward(self, bottom, top):
        pass


@register
class DummyDataLayer(Layer):
    """Tops filled by fillers (constant by default). Honors dummy_data_param: shape or legacy
    num/channels/height/width, data_filler (once or per top)."""

    type = "DummyData"
    capturable = False  # refills from the host generator
    param = "dummy_data_param"
    legacy = "DUMMY_DATA"
    exact_bottoms = 0
    min_tops = 1

    def setup(self, bottom, top):
        p, n = self.p, len(top)
        legacy = [len(p.num), len(p.channels), len(p.height), len(p.width)]
        if p.shape and any(legacy):
            self.fail("give dummy_data_param.shape or num/channels/height/width, not both")
        counts = [len(p.shape)] if p.shape else legacy
        if any(c not in (1, n) for c in counts) or len(p.data_filler) not in (0, 1, n):
            self.fail(f"each shape field (and data_filler, if any) must be given once or {n} times")
        fillers = list(p.data_filler) or [caffe_pb2.FillerParameter(type="constant", value=0)]
        self.fillers = [fillers[0] if len(fillers) == 1 else fillers[k] for k in range(n)]
        for k, blob in enumerate(top):
            blob.reshape(self._shape(k))
        self._fill(top, constant=True)

    def _shape(self, k):
        p = self.p
        if p.shape:
            return blob_shape(p.shape[0] if len(p.shape) == 1 else p.shape[k])
        pick = lambda field: field[0] if len(field) == 1 else field[k]  # noqa: E731
        return (pick(p.num), pick(p.channels), pick(p.height), pick(p.width))

    def _fill(self, top, constant):
        """As Caffe: a constant top is filled once, at setup; the others at every forward."""
        for blob, filler in zip(top, self.fillers):
            if (filler.type == "constant") == constant:
                fill(blob, filler)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        self._fill(top, constant=False)
