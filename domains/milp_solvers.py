"""MILP solver backends (HiGHS via highspy, Gurobi via gurobipy) behind one small interface.

A backend minimises a linear objective over a `MilpModel` (see milp_encoding) and reports the
best primal solution *and* the proven dual bound, so the caller can decide soundly: a dual
bound > 0 proves the minimum positive; a time limit leaves the answer open.

Both backends can stop early: once the dual bound exceeds `stop_above` (proven) or a solution
with objective <= `stop_below` is found (a candidate counterexample).

Gurobi's pip licence refuses models over 2000 variables/constraints (error 10010); `solve`
then falls back to HiGHS and warns once per process.

Ctrl-C and SIGTERM end a solve within a fraction of a second and propagate as
KeyboardInterrupt / Terminated (never as a "timed out" answer): HiGHS runs in a helper thread
while the main thread waits and can react, Gurobi is stopped with `terminate()`.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from verikit.errors import SolverError
from verikit.interrupts import deferred_signals

OPTIMAL, INFEASIBLE, TIME_LIMIT, STOPPED = "optimal", "infeasible", "time_limit", "stopped"


@dataclass
class SolveResult:
    status: str  # optimal | infeasible | time_limit | stopped (early stop) | error
    objective: float  # best primal objective (inf when no solution)
    bound: float  # proven lower bound of the minimum (-inf when nothing proven; inf if infeasible)
    x: Optional[np.ndarray]  # best primal solution (all model variables) or None
    solver: str
    seconds: float


@dataclass
class SolverOptions:
    time_limit: float = 60.0
    threads: int = 1
    deterministic: bool = False


def _with_offset(res: SolveResult, offset: float) -> SolveResult:
    res.objective += offset
    res.bound += offset
    return res


# ---------------------------------------------------------------- HiGHS
_HIGHS_BANNER_DONE = False


def _new_highs():
    """A silent Highs instance. The first one prints a banner straight to file descriptor 1,
    which would pollute the CLI's output, so that one is created with stdout redirected."""
    global _HIGHS_BANNER_DONE
    import highspy

    if _HIGHS_BANNER_DONE:
        h = highspy.Highs()
    else:
        import os
        import sys

        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _HIGHS_BANNER_DONE = True
    h.setOptionValue("output_flag", False)
    return h


_CANCEL_WAIT = 0.5  # seconds to let a cancelled HiGHS solve stop before the interrupt goes on without it


def _run_highs(h) -> None:
    """h.run(), but interruptible: a plain run() holds Ctrl-C until the solve ends (minutes).
    The solve runs in highspy's helper thread while the main thread waits; on KeyboardInterrupt
    (or Terminated) the solve is cancelled and the interrupt re-raised. HiGHS notices the cancel
    only at its next callback, which some MIP phases reach only after seconds, so the (daemon)
    thread is given at most _CANCEL_WAIT seconds and then left to stop on its own."""
    h.HandleUserInterrupt = True
    h.startSolve()
    try:
        while not h.wait(0.05)[0]:
            pass
    except KeyboardInterrupt:
        h.cancelSolve()
        h.wait(_CANCEL_WAIT)
        raise


class HighsBackend:
    name = "highs"

    def __init__(self):
        try:
            import highspy  # noqa: F401
        except ImportError as e:
            raise SolverError("the HiGHS solver needs the 'highspy' package (pip install highspy)") from e

    def _build(self, model, c: np.ndarray, opts: SolverOptions, relax: bool, time_limit: float):
        import highspy

        h = _new_highs()
        h.setOptionValue("time_limit", max(float(time_limit), 1e-3))
        h.setOptionValue("mip_rel_gap", 1e-9)
        h.setOptionValue("mip_abs_gap", 1e-9)
        h.setOptionValue("random_seed", 0)
        if opts.deterministic or opts.threads > 0:
            h.setOptionValue("threads", 1 if opts.deterministic else int(opts.threads))
        lp = highspy.HighsLp()
        A = model.matrix().tocsc()
        lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
        lp.col_cost_ = np.asarray(c, dtype=np.float64)
        lp.col_lower_, lp.col_upper_ = model.lb_array(), model.ub_array()
        lp.row_lower_, lp.row_upper_ = model.row_lo_array(), model.row_hi_array()
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = A.indptr.astype(np.int32)
        lp.a_matrix_.index_ = A.indices.astype(np.int32)
        lp.a_matrix_.value_ = A.data.astype(np.float64)
        if not relax and model.num_integer():
            lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                               for i in model.integer_array()]
        h.passModel(lp)
        return h

    def solve(self, model, c, offset, opts: SolverOptions, relax=False, stop_above=None, stop_below=None,
              time_limit=None) -> SolveResult:
        import highspy

        t0 = time.perf_counter()
        h = self._build(model, c, opts, relax, opts.time_limit if time_limit is None else time_limit)
        is_mip = not relax and model.num_integer() > 0
        if is_mip and (stop_above is not None or stop_below is not None):
            def interrupt(e):
                dual, primal = e.data_out.mip_dual_bound + offset, e.data_out.mip_primal_bound + offset
                if (stop_above is not None and dual > stop_above) or (stop_below is not None and primal <= stop_below):
                    e.interrupt()
            h.cbMipInterrupt.subscribe(interrupt)
        _run_highs(h)
        st = h.getModelStatus()
        info = h.getInfo()
        MS = highspy.HighsModelStatus
        x, obj = None, math.inf
        if info.primal_solution_status == 2:  # kSolutionStatusFeasible
            x = np.array(h.getSolution().col_value, dtype=np.float64)
            obj = float(info.objective_function_value)
        if st == MS.kOptimal:
            status = OPTIMAL
            bound = float(info.mip_dual_bound) if is_mip else obj
        elif st == MS.kInfeasible:
            status, bound = INFEASIBLE, math.inf
        elif st == MS.kInterrupt:
            status, bound = STOPPED, float(info.mip_dual_bound)
        elif st == MS.kTimeLimit:
            status, bound = TIME_LIMIT, float(info.mip_dual_bound) if is_mip else -math.inf
        else:
            status, bound = f"error: {h.modelStatusToString(st)}", -math.inf
        if math.isnan(bound):
            bound = -math.inf
        return _with_offset(SolveResult(status, obj, bound, x, self.name, time.perf_counter() - t0), offset)


    def minimize_many(self, model, objectives, relax: bool, opts: SolverOptions, deadline: float) -> list:
        """Proven lower bounds of min c·v for each c (one warm-started model; -inf once the
        deadline passes or a solve does not finish). Used for per-neuron bound tightening."""
        import highspy

        out = []
        if not objectives:
            return out
        n = model.num_vars()
        h = self._build(model, np.zeros(n), opts, relax, max(deadline - time.perf_counter(), 1e-3))
        idx = np.arange(n, dtype=np.int32)
        is_mip = not relax and model.num_integer() > 0
        for k, c in enumerate(objectives):
            left = deadline - time.perf_counter()
            if left <= 0:
                out.append(-math.inf)
                continue
            # share what is left fairly between the remaining solves
            h.setOptionValue("time_limit", max(left / (len(objectives) - k) if is_mip else left, 1e-3))
            h.changeColsCost(n, idx, np.asarray(c, dtype=np.float64))
            _run_highs(h)
            st, info = h.getModelStatus(), h.getInfo()
            if st == highspy.HighsModelStatus.kOptimal:
                v = float(info.mip_dual_bound) if is_mip else float(info.objective_function_value)
            elif is_mip and st in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kInterrupt):
                v = float(info.mip_dual_bound)
            else:
                v = -math.inf
            # LP optima are exact only up to the solver's feasibility tolerance
            out.append(v - 1e-6 * (1.0 + abs(v)) if math.isfinite(v) else -math.inf)
        return out

# ---------------------------------------------------------------- Gurobi
_GUROBI_ENV = None
_GUROBI_WARNED = False
_GUROBI_REFUSED_SIZE: Optional[int] = None  # smallest model size the licence refused


class LicenceRefused(Exception):
    pass


class GurobiBackend:
    name = "gurobi"

    def __init__(self):
        try:
            import gurobipy  # noqa: F401
        except ImportError as e:
            raise SolverError("the Gurobi solver needs the 'gurobipy' package (pip install gurobipy)") from e

    @staticmethod
    def _env():
        global _GUROBI_ENV
        if _GUROBI_ENV is None:
            import gurobipy as gp

            env = gp.Env(empty=True)
            env.setParam("OutputFlag", 0)
            env.start()
            _GUROBI_ENV = env
        return _GUROBI_ENV

    def solve(self, model, c, offset, opts: SolverOptions, relax=False, stop_above=None, stop_below=None,
              time_limit=None) -> SolveResult:
        import gurobipy as gp
        from gurobipy import GRB

        size = max(model.num_vars(), model.num_rows())
        if _GUROBI_REFUSED_SIZE is not None and size >= _GUROBI_REFUSED_SIZE:
            raise LicenceRefused()
        t0 = time.perf_counter()
        m = gp.Model(env=self._env())
        try:
            m.Params.TimeLimit = max(float(opts.time_limit if time_limit is None else time_limit), 1e-3)
            m.Params.Threads = 1 if opts.deterministic else max(0, int(opts.threads))
            m.Params.Seed = 0
            m.Params.MIPGap = 1e-9
            m.Params.MIPGapAbs = 1e-9
            is_mip = not relax and model.num_integer() > 0
            vtype = np.where(model.integer_array(), GRB.INTEGER, GRB.CONTINUOUS) if is_mip else GRB.CONTINUOUS
            x = m.addMVar(model.num_vars(), lb=model.lb_array(), ub=model.ub_array(), vtype=vtype)
            A = model.matrix().tocsr()
            lo, hi = model.row_lo_array(), model.row_hi_array()
            eq = lo == hi
            for sel, sense, rhs in ((eq, "=", lo), (~eq & np.isfinite(lo), ">", lo), (~eq & np.isfinite(hi), "<", hi)):
                if sel.any():
                    m.addMConstr(A[sel], x, sense, rhs[sel])
            m.setObjective(x @ np.asarray(c, dtype=np.float64))
            if is_mip:
                if stop_above is not None:
                    m.Params.BestBdStop = stop_above - offset
                if stop_below is not None:
                    m.Params.BestObjStop = stop_below - offset
            try:
                _optimize_interruptible(m)
            except gp.GurobiError as e:
                if e.errno == 10010:
                    _note_refusal(size)
                    raise LicenceRefused() from e
                raise SolverError(f"gurobi failed: {e}") from e
            st = m.Status
            if st == GRB.INTERRUPTED:  # Gurobi's own Ctrl-C handler ended the solve
                raise KeyboardInterrupt()
            sol, obj = None, math.inf
            if m.SolCount > 0:
                sol, obj = np.array(x.X, dtype=np.float64), float(m.ObjVal)
            if st == GRB.OPTIMAL:
                status, bound = OPTIMAL, float(m.ObjBound) if is_mip else obj
            elif st in (GRB.INFEASIBLE, GRB.INF_OR_UNBD):
                status, bound = INFEASIBLE, math.inf
            elif st == GRB.USER_OBJ_LIMIT:
                status, bound = STOPPED, float(m.ObjBound) if is_mip else -math.inf
            elif st == GRB.TIME_LIMIT:
                status, bound = TIME_LIMIT, float(m.ObjBound) if is_mip else -math.inf
            else:
                status, bound = f"error: gurobi status {st}", -math.inf
            if math.isnan(bound):
                bound = -math.inf
            return _with_offset(SolveResult(status, obj, bound, sol, self.name, time.perf_counter() - t0), offset)
        finally:
            m.dispose()


def _optimize_interruptible(m) -> None:
    """m.optimize() that ends promptly on SIGINT/SIGTERM. Gurobi catches Ctrl-C itself (the
    status becomes INTERRUPTED) and prints a notice on file descriptor 1, which would land in
    the CLI's results, so stdout is pointed at /dev/null for the call. SIGTERM reaches Python
    only while Python code runs, hence the (empty) callback; the handler then terminates the
    solve and `deferred_signals` raises once it has returned."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        with deferred_signals(m.terminate):
            m.optimize(_no_op_callback)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _no_op_callback(model, where) -> None:
    pass


def _note_refusal(size: int) -> None:
    global _GUROBI_REFUSED_SIZE, _GUROBI_WARNED
    _GUROBI_REFUSED_SIZE = size if _GUROBI_REFUSED_SIZE is None else min(size, _GUROBI_REFUSED_SIZE)
    if not _GUROBI_WARNED:
        _GUROBI_WARNED = True
        warnings.warn("gurobi refused the model (size-limited licence, error 10010); falling back to HiGHS "
                      "for models this large", RuntimeWarning, stacklevel=3)


def gurobi_available() -> bool:
    try:
        import gurobipy  # noqa: F401
        return True
    except ImportError:
        return False


class Solver:
    """The solver the user asked for: 'highs', 'gurobi', or 'auto' (Gurobi when importable,
    else HiGHS). Gurobi licence refusals fall back to HiGHS."""

    def __init__(self, which: str = "auto", options: Optional[SolverOptions] = None):
        if which not in ("auto", "highs", "gurobi"):
            raise SolverError(f"unknown MILP solver {which!r}; choose auto, highs or gurobi")
        self.options = options or SolverOptions()
        self.primary = None
        if which == "gurobi" or (which == "auto" and gurobi_available()):
            self.primary = GurobiBackend()
        self._highs = HighsBackend() if self.primary is None else None  # else created on fallback

    def solve(self, model, c, offset=0.0, relax=False, stop_above=None, stop_below=None, time_limit=None) -> SolveResult:
        if self.primary is not None:
            try:
                return self.primary.solve(model, c, offset, self.options, relax, stop_above, stop_below, time_limit)
            except LicenceRefused:
                if self._highs is None:
                    self._highs = HighsBackend()
        return self._highs.solve(model, c, offset, self.options, relax, stop_above, stop_below, time_limit)
