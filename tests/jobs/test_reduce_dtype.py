"""deepspeed.reduce_dtype decides the dtype gradients are summed in across ranks (jobs/config.py says when to choose
which): with fp32 a rank's contribution below bf16's resolution next to another rank's is kept; with bf16 (the
default, DeepSpeed's) it is rounded away. Two real ranks (gloo), the engine config jobs/engine.py builds, precision
bf16 at ZeRO 1 (DeepSpeed's BF16_Optimizer) and ZeRO 2, and amp_bf16 at ZeRO 2 (where DeepSpeed marks Linear weights
to be reduced in the autocast dtype unless told otherwise), plain SGD so the fp32 master weight shows the averaged
gradient exactly."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tests.ranks import run_ranks

SMALL = 2.0**-9  # rank 1's gradient: exact in bf16, but 1 + SMALL rounds to 1 in bf16 (its ulp at 1 is 2^-7)
# amp_bf16 last: DeepSpeed's autocast set-up is process-global, and would change how later bf16 engines reduce.
CASES = [(precision, stage, dtype) for precision, stages in (("bf16", (1, 2)), ("amp_bf16", (2,)))
         for stage in stages for dtype in ("fp32", "bf16")]


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from jobs.config import DeepSpeedConfig
    from jobs.derived import derive
    from jobs.engine import deepspeed_config

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    derived = derive(2, 1, 2, 1.0, 256, 400, 0)
    for precision, stage, dtype in CASES:
        model = nn.Linear(8, 1, bias=False)
        nn.init.zeros_(model.weight)
        config = deepspeed_config(DeepSpeedConfig(zero_stage=stage, reduce_dtype=dtype), derived, 0.0, precision)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                               config=config)
        scale = 1.0 if rank == 0 else SMALL  # d(loss)/d(weight) = scale for every weight element
        x = torch.ones(1, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        loss = engine(x).float().sum() * scale
        engine.backward(loss)
        engine.step()
        results[(rank, precision, stage, dtype)] = safe_get_full_fp32_param(engine.module.weight).flatten().tolist()
        engine.destroy()
    torch.distributed.destroy_process_group()


def test_reduce_dtype_fp32_keeps_what_bf16_rounds_away():
    run = run_ranks(_rank, timeout_s=120)  # seconds: a passing run takes ~10
    assert run.exit_codes == [0, 0], run.exit_codes
    results = run.results
    averaged = (1.0 + SMALL) / 2  # what one SGD step at lr 1 subtracts, with the mean gradient kept exactly
    for case in CASES:
        weights = results[(0, *case)]
        assert weights == results[(1, *case)], case
        expected = -averaged if case[2] == "fp32" else -0.5  # bf16: rank 1's SMALL rounded away in the sum
        assert weights == pytest.approx([expected] * 8, abs=0, rel=0), (case, weights)
