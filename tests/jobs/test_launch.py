"""Which GPU a rank trains and decodes on, from the environment each launcher sets (no GPU needed: devices are names).

Every rank of a node must train on, and have DALI decode on, its own GPU: a bare "cuda" is GPU 0 for all of them."""

from __future__ import annotations

import pytest
import torch

from jobs.launch import local_rank, rank_device
from pipeline.loader import dali_device_id

LAUNCHERS = {
    # torchrun --nproc_per_node 8, fourth process of the second node
    "torchrun": ({"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
                  "MASTER_ADDR": "node-01", "MASTER_PORT": "29500"}, 3),
    # deepspeed --num_gpus 8 (also appends --local_rank=5 to the command line)
    "deepspeed": ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "LOCAL_SIZE": "8", "CROSS_RANK": "0",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 5),
    # jobs/slurm_pretrain.sh: srun task 14 of 64, RANK/LOCAL_RANK exported from SLURM's variables
    "slurm_pretrain.sh": ({"SLURM_PROCID": "14", "SLURM_LOCALID": "6", "SLURM_NTASKS": "64", "RANK": "14",
                           "WORLD_SIZE": "64", "LOCAL_RANK": "6"}, 6),
    # a bare `srun python ...` with RANK/WORLD_SIZE exported by hand but not LOCAL_RANK
    "srun": ({"SLURM_PROCID": "15", "SLURM_LOCALID": "7", "SLURM_NTASKS": "64", "RANK": "15", "WORLD_SIZE": "64"}, 7),
    "mpirun": ({"OMPI_COMM_WORLD_RANK": "10", "OMPI_COMM_WORLD_LOCAL_RANK": "2", "RANK": "10"}, 2),
    "python": ({}, 0),  # a single process: jobs/launch.py describes a world of one
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_each_rank_trains_and_decodes_on_its_local_gpu(launcher):
    env, expected = LAUNCHERS[launcher]
    assert local_rank(env) == expected
    device = rank_device(local_rank(env), on_cuda=True)
    assert device == torch.device("cuda", expected)
    # data.device auto and cuda: DALI's pipeline on the same GPU; cpu: a CPU pipeline, batches copied to the GPU
    assert dali_device_id("auto", device) == expected and dali_device_id("cuda", device) == expected
    assert dali_device_id("cpu", device) is None
    assert rank_device(local_rank(env), on_cuda=False) == torch.device("cpu")
    assert dali_device_id("auto", torch.device("cpu")) is None
