"""Sweeps: the paper's grid (``grid``), the executors that run it (``executor``) and the analysis of its results
(``analysis``: tables over seeds, correlations, plots)."""
from kdjax.sweep import grid  # noqa: F401
from kdjax.sweep.executor import Outcome, SweepFailed, build_config, command_line, execute  # noqa: F401
from kdjax.configs.sweep import PAPER_PAIRS, sweep_config  # noqa: F401
from kdjax.sweep.grid import ALL, Run, plan  # noqa: F401
