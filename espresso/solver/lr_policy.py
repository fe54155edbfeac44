"""Learning-rate policies, as Caffe's SGDSolver::GetLearningRate computes them.

Each policy is a plain function `(param, iter, current_step, f) -> (rate, current_step)` where
`param` is the SolverParameter and `f` the net's scalar type (np.float32 for Caffe's Dtype
float).  Caffe parity, down to the rounding: where C++ evaluates in float (`Dtype(1) + gamma *
iter`, `pow(float, float)`, `exp(float)`) we evaluate in `f`; where it promotes to double
(`pow(float, int)`) we evaluate in float64 and round the result to `f`.

    fixed      base_lr
    step       base_lr * gamma ^ floor(iter / stepsize)
    exp        base_lr * gamma ^ iter
    inv        base_lr * (1 + gamma * iter) ^ (-power)
    multistep  base_lr * gamma ^ current_step, current_step += 1 when iter reaches the next stepvalue
    poly       base_lr * (1 - iter / max_iter) ^ power
    sigmoid    base_lr / (1 + exp(-gamma * (iter - stepsize)))
"""

import numpy as np

from espresso.errors import EspressoError


def _require(ok, policy, text):
    if not ok:
        raise EspressoError(f"lr_policy '{policy}': {text}")


def _check_gamma(p):
    _require(p.gamma >= 0, p.lr_policy, f"gamma must be >= 0, got {p.gamma}")


def _check_stepsize(p):
    _require(p.stepsize > 0, p.lr_policy, f"stepsize must be > 0, got {p.stepsize}")


def _pow64(base, exponent):
    """C++ pow(float, int): evaluated in double; inf/0 on overflow/underflow as in C."""
    with np.errstate(over="ignore", under="ignore"):
        return np.power(np.float64(base), np.asarray(exponent, np.float64))


def fixed(p, it, step, f):
    return f(p.base_lr), step


def step_policy(p, it, step, f):
    _check_stepsize(p)
    step = it // p.stepsize
    _check_gamma(p)
    return f(p.base_lr * _pow64(p.gamma, step)), step


def exp_policy(p, it, step, f):
    _check_gamma(p)
    return f(p.base_lr * _pow64(p.gamma, it)), step


def inv(p, it, step, f):
    _check_gamma(p)
    with np.errstate(over="ignore", under="ignore"):
        base = f(1) + f(p.gamma) * f(it)
        return f(p.base_lr) * np.power(base, -f(p.power)), step


def multistep(p, it, step, f):
    # Caffe advances at most one step per call, i.e. per iteration.
    if step < len(p.stepvalue) and it >= p.stepvalue[step]:
        step += 1
    _check_gamma(p)
    return f(p.base_lr * _pow64(p.gamma, step)), step


def poly(p, it, step, f):
    _require(p.max_iter > 0, p.lr_policy, f"max_iter must be > 0, got {p.max_iter}")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return f(p.base_lr) * np.power(f(1) - f(it) / f(p.max_iter), f(p.power)), step


def sigmoid(p, it, step, f):
    _check_gamma(p)
    _check_stepsize(p)
    with np.errstate(over="ignore"):
        e = np.exp(-f(p.gamma) * (f(it) - f(p.stepsize)))
        return f(p.base_lr) * (f(1) / (f(1) + e)), step


POLICIES = {"fixed": fixed, "step": step_policy, "exp": exp_policy, "inv": inv,
            "multistep": multistep, "poly": poly, "sigmoid": sigmoid}


def learning_rate(param, it, current_step=0, dtype=np.float32):
    """(rate, new current_step) at iteration `it` for SolverParameter `param`."""
    policy = POLICIES.get(param.lr_policy)
    if policy is None:
        known = ", ".join(POLICIES)
        raise EspressoError(f"unknown lr_policy '{param.lr_policy}' (known: {known})")
    rate, step = policy(param, int(it), int(current_step), np.dtype(dtype).type)
    return np.dtype(dtype).type(rate), step


def learning_rates(param, start, stop, current_step=0, dtype=np.float32):
    """[(rate, current_step)] of iterations start..stop-1, as `learning_rate` gives them one by
    one: computed as arrays (a GPU waits less for the next window of rates), except multistep,
    whose step advances per call."""
    if param.lr_policy not in POLICIES or param.lr_policy == "multistep":
        pairs = []
        for it in range(start, stop):
            rate, current_step = learning_rate(param, it, current_step, dtype)
            pairs.append((rate, current_step))
        return pairs
    f, its = np.dtype(dtype).type, np.arange(start, stop)
    rates, steps = POLICIES[param.lr_policy](param, its, current_step, f)
    rates, steps = np.broadcast_to(f(rates), its.shape), np.broadcast_to(steps, its.shape)
    return list(zip(rates, steps.tolist()))
