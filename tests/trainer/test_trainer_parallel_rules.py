"""Which tensor-parallel layouts the trainer accepts, and the 2-D mesh it builds."""

from __future__ import annotations

import pytest

from phalanx_trainer.model import ModelConfig
from phalanx_trainer.parallel import check_tensor_parallel, data_parallel_position, mesh_shape
from phalanx_trainer.termination import InvalidConfig

NANO = ModelConfig.preset("nano")  # 4 heads, 2 kv heads, ffn 384


@pytest.mark.parametrize(
    ("tp", "world", "parallelism", "local_world", "error"),
    [
        (1, 3, "ddp", 3, None),
        (2, 4, "fsdp", 4, None),
        (2, 8, "fsdp", 2, None),
        (2, 4, "ddp", 4, "use --parallelism fsdp"),
        (2, 3, "fsdp", 3, "does not divide the 3 processes"),
        (4, 8, "fsdp", 8, "n_kv_heads 2"),
        (2, 4, "fsdp", 1, "must stay on one host"),
    ],
    ids=["off", "2x2", "tp-per-host", "ddp", "uneven-world", "kv-heads", "spans-hosts"],
)
def test_tensor_parallel_rules(
    tp: int, world: int, parallelism: str, local_world: int, error: str | None
) -> None:
    if error is None:
        check_tensor_parallel(NANO, tp, world, parallelism, local_world)
    else:
        with pytest.raises(InvalidConfig, match=error):
            check_tensor_parallel(NANO, tp, world, parallelism, local_world)


def test_tp_groups_are_consecutive_ranks_reading_one_batch() -> None:
    assert mesh_shape(8, 2) == (4, 2)
    # ranks 0,1 | 2,3 | ... form TP groups; each group is one data-parallel rank.
    assert [data_parallel_position(r, 8, 2) for r in range(4)] == [(0, 4), (0, 4), (1, 4), (1, 4)]
