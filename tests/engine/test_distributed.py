import pytest
import torch

from mcbeit.engine import distributed as d


def test_single_process_without_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    info = d.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert info.device == torch.device("cpu")


def test_cuda_request_without_gpu_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path is for machines without one")
    with pytest.raises(RuntimeError, match="--device cpu"):
        d.resolve_device("cuda")
    assert d.resolve_device(None) == torch.device("cpu")


def test_launcher_environments(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert d._launcher_env(False, -1, "env://") == (3, 4, 1, "env://")
    monkeypatch.delenv("LOCAL_RANK")
    assert d._launcher_env(False, 2, "env://") == (3, 4, 2, "env://")  # torch.distributed.launch --local-rank
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        d._launcher_env(False, -1, "env://")
    assert d._launcher_env(False, -1, "tcp://h:1") == (5, 8, 1, "tcp://h:1")
    with pytest.raises(RuntimeError, match="OMPI_COMM_WORLD_RANK"):
        d._launcher_env(True, -1, "env://")


def test_reductions_are_identity_without_process_group():
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(d.all_reduce_mean(t), t)
    assert torch.equal(d.all_reduce_sum(t), t)


def test_wrap_ddp_broadcasts_buffers_only_for_batch_norm():
    """One process is the model itself; in a (real, one-process gloo) group DDP broadcasts buffers
    before each forward only for models with batch norm (running statistics), not for BEiT."""
    import timm
    import torch.distributed as dist

    import mcbeit.models  # noqa: F401
    from mcbeit.engine.distributed import DistInfo, wrap_ddp
    from mcbeit.models.linear_probe import LinearProbe

    beit = timm.create_model("beit_tiny_patch16_224", depth=1, img_size=32, num_classes=3)
    assert wrap_ddp(beit, DistInfo()) is beit
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        info = DistInfo(world_size=2)  # what the launcher reported; the group itself has one process here
        def syncs(ddp):  # torch >= 2.14 names the setting forward_sync_buffers
            return getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers)

        assert syncs(wrap_ddp(beit, info)) is False
        assert syncs(wrap_ddp(LinearProbe(beit, 3, None, "avg"), info)) is True
    finally:
        dist.destroy_process_group()
