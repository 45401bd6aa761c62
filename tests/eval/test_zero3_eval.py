"""Fine-tuning's final evaluation under ZeRO-3 when the ranks hold different numbers of validation batches (one
holds none: fewer validation shards than readers). Every ZeRO-3 forward gathers each layer's weights from all
ranks, so without lockstep the rank that has finished meets the others' gathers with its count all-reduce: a hang
(NCCL) or a size error (gloo). Two real ranks (gloo), a real ZeRO-3 engine, batches handed in as lists."""

from __future__ import annotations

import os

import torch
from torch import nn

from tests.ranks import run_ranks

IMG = 4


class TinyClassifier(nn.Module):
    """The fine-tune model's eval protocol (logits of a float32 image batch) around two Linear layers."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMG * IMG, 8), nn.GELU(), nn.Linear(8, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.net[1].weight.dtype))


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    import deepspeed

    from jobs.eval.finetune_loop import evaluate

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = TinyClassifier()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}})
    g = torch.Generator().manual_seed(1)
    batches = [{"view1": torch.randn(2, 3, IMG, IMG, generator=g), "labels": torch.tensor([0, 2])} for _ in range(3)]
    results[rank] = evaluate(engine, batches if rank == 0 else [], torch.device("cpu"), IMG)
    torch.distributed.destroy_process_group()


def test_zero3_evaluation_with_a_rank_that_holds_no_batch_finishes_and_counts_every_sample():
    run = run_ranks(_rank, timeout_s=90)  # seconds: a passing run takes ~15
    assert not run.hung, "a rank hung in the evaluation"
    assert run.exit_codes == [0, 0], run.exit_codes
    assert run.results[0] == run.results[1] and run.results[0]["num_val"] == 6, run.results
