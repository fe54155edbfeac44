"""The Net: build.py builds it from a NetParameter (Caffe's Net::Init), core.py runs it (the
engine and the parameter arena), pycaffe.py gives pycaffe's surface over it, files.py reads and
writes its weights."""

from espresso.net.build import TEST, TRAIN, load_net_param
from espresso.net.core import Net

__all__ = ["Net", "TRAIN", "TEST", "load_net_param"]
