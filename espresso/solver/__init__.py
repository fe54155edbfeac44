"""Caffe's solvers: the training loop, update rules, learning-rate policies and .solverstate files."""

from espresso.solver.lr_policy import POLICIES, learning_rate
from espresso.solver.solver import (
    SOLVER_CLASSES,
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    SignalHandler,
    Solver,
    SolverAction,
    get_solver,
    read_solver_param,
)
from espresso.solver.updates import RULES

__all__ = [
    "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
    "AdamSolver", "SOLVER_CLASSES", "get_solver", "read_solver_param", "SolverAction", "SignalHandler",
    "learning_rate", "POLICIES", "RULES",
]
