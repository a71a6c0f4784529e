"""python tests/signal_at_step.py STEP <minidpo flags>: the CLI, with SIGTERM sent to rank 0 right after step STEP
(what a scheduler's preemption does, at a step chosen by the test)."""

import os
import signal
import sys

from minidpo import dpo
from minidpo.__main__ import main

STEP = int(sys.argv.pop(1))
real_step = dpo.train_step


def step_then_signal(run):
    row = real_step(run)
    if run.step == STEP and run.rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    return row


dpo.train_step = step_then_signal
sys.exit(main(sys.argv[1:]))
