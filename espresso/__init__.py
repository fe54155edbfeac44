"""Espresso: Caffe's nets, layers and files in Python, on the CPU and NVIDIA GPUs.

`import espresso as caffe` runs ordinary pycaffe code.
"""

from espresso import (
    compress,  # registers its model files with Net.copy_from
    coord_map,
    draw,
    io,
    layers,  # also pycaffe's NetSpec `L` (see espresso/layers/__init__.py)
    net_spec,
    parallel,  # data-parallel training over MPI ranks
)
from espresso.blob import Blob
from espresso.classifier import Classifier
from espresso.detector import Detector
from espresso.errors import (
    BackendError,
    EspressoError,
    LayerParamError,
    ModelFileError,
    NetError,
    PrototxtError,
    ShapeError,
)
from espresso.glog import init_log, log
from espresso.graphs import set_cuda_graphs
from espresso.layer import Layer, known_types, register
from espresso.net import TEST, TRAIN, Net
from espresso.net_spec import NetSpec, params, to_proto
from espresso.runtime import (
    NCCL,
    Timer,
    has_nccl,
    set_device,
    set_memory_limit,
    set_mode_cpu,
    set_mode_gpu,
    set_multiprocess,
    set_num_threads,
    set_random_seed,
    set_solver_count,
    set_solver_rank,
    solver_count,
    solver_rank,
)
from espresso.solver import (
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    Solver,
    get_solver,
)

__version__ = "0.1.0"

__all__ = [
    "Blob", "Net", "Layer", "register", "TRAIN", "TEST", "compress", "NetSpec", "layers", "params", "to_proto",
    "Solver", "get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
    "AdaDeltaSolver", "AdamSolver",
    "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "set_cuda_graphs", "set_num_threads",
    "set_memory_limit", "solver_count", "set_solver_count", "solver_rank", "set_solver_rank", "set_multiprocess",
    "has_nccl", "NCCL", "Timer", "layer_type_list", "init_log", "log", "Classifier", "Detector",
    "io", "draw", "net_spec", "coord_map", "parallel",
    "EspressoError", "PrototxtError", "NetError", "LayerParamError", "ShapeError",
    "ModelFileError", "BackendError",
]


def layer_type_list():
    """pycaffe's layer_type_list: the registered layer types, sorted (Caffe's registry is a map)."""
    return sorted(known_types())
