"""Which GPU a rank trains and decodes on, from the environment each launcher sets (no GPU needed: devices are names).

Every rank of a node must train on, and have DALI decode on, its own GPU: a bare "cuda" is GPU 0 for all of them."""

from __future__ import annotations

import pytest
import torch

from jobs.launch import local_rank, rank_device, rank_environment
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
    # `srun python ...` with RANK/WORLD_SIZE exported by hand but not LOCAL_RANK
    "srun, RANK by hand": ({"SLURM_PROCID": "15", "SLURM_LOCALID": "7", "SLURM_NTASKS": "64",
                            "SLURM_STEP_NUM_TASKS": "64", "RANK": "15", "WORLD_SIZE": "64"}, 7),
    # a bare `srun python ...`: only SLURM's variables (and MASTER_ADDR/PORT exported by hand)
    "srun": ({"SLURM_PROCID": "15", "SLURM_LOCALID": "7", "SLURM_NTASKS": "64", "SLURM_STEP_NUM_TASKS": "64",
              "MASTER_ADDR": "node-01", "MASTER_PORT": "29500"}, 7),
    "mpirun": ({"OMPI_COMM_WORLD_RANK": "10", "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_SIZE": "16",
                "MASTER_ADDR": "node-01", "MASTER_PORT": "29500"}, 2),
    "python": ({}, 0),  # a single process: jobs/launch.py describes a world of one
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_each_rank_trains_and_decodes_on_its_local_gpu(launcher):
    env, expected = LAUNCHERS[launcher]
    env = {**env, **rank_environment(env)}  # what init_distributed exports before the process group starts
    assert local_rank(env) == expected and env["LOCAL_RANK"] == str(expected)
    device = rank_device(local_rank(env), on_cuda=True, visible=8)
    assert device == torch.device("cuda", expected)
    # data.device auto and cuda: DALI's pipeline on the same GPU; cpu: a CPU pipeline, batches copied to the GPU
    assert dali_device_id("auto", device) == expected and dali_device_id("cuda", device) == expected
    assert dali_device_id("cpu", device) is None
    assert rank_device(local_rank(env), on_cuda=False) == torch.device("cpu")
    assert dali_device_id("auto", torch.device("cpu")) is None


def test_bare_srun_and_mpirun_tasks_join_one_world_and_a_batch_script_is_a_world_of_one():
    """Every task of a bare srun / mpirun gets its own rank of one world (not N worlds of one, all rank 0 on GPU 0,
    writing one output directory); the batch script itself (SLURM_PROCID=0 and SLURM_NTASKS, but no job step) is a
    single process; a multi-task launch without MASTER_ADDR/PORT is refused naming them."""
    env, _ = LAUNCHERS["srun"]
    assert rank_environment(env) == {"RANK": "15", "WORLD_SIZE": "64", "LOCAL_RANK": "7"}
    env, _ = LAUNCHERS["mpirun"]
    assert rank_environment(env) == {"RANK": "10", "WORLD_SIZE": "16", "LOCAL_RANK": "2"}
    assert rank_environment(LAUNCHERS["torchrun"][0]) == {}
    batch_script = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8"}
    single = rank_environment(batch_script)
    assert (single["RANK"], single["WORLD_SIZE"], single["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    no_master = {k: v for k, v in LAUNCHERS["srun"][0].items() if not k.startswith("MASTER_")}
    with pytest.raises(RuntimeError, match="srun as rank 15 of 64 .* without MASTER_ADDR and MASTER_PORT"):
        rank_environment(no_master)


def test_a_task_that_sees_only_its_own_gpu_trains_on_it():
    """srun --gpus-per-task / --gpu-bind: each task sees one GPU, cuda:0, whatever its local rank; a local rank
    beyond the GPUs a task sees is refused naming both."""
    assert rank_device(5, on_cuda=True, visible=1) == torch.device("cuda", 0)
    assert rank_device(5, on_cuda=True, visible=8) == torch.device("cuda", 5)
    with pytest.raises(RuntimeError, match="local rank 8 .* sees 8 GPUs"):
        rank_device(8, on_cuda=True, visible=8)
