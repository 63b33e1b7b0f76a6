"""Running a test body in several processes: spawn, rendezvous through a file, clean teardown.

    def _worker(rank, world_size, workdir, *args): ...     # module level, so spawn can pickle it
    run_processes(_worker, 2, tmp_path, *args)              # gloo on the CPU
    run_processes(_worker, 2, tmp_path, backend="nccl")     # one GPU per rank

Ranks talk through files in `workdir` (inputs.pt in, results out); the rendezvous is a
file there too, so no port can be taken by another test run.
"""
import os

import torch
import torch.distributed as dist


def _entry(rank, worker, world_size, workdir, backend, args):
    # gloo talks over the loopback interface; one thread per rank leaves the cores to the ranks.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(workdir, 'rendezvous')}", rank=rank,
                            world_size=world_size)
    try:
        worker(rank, world_size, workdir, *args)
        dist.barrier()  # leave together: a rank tearing the group down while its peer still works can abort
    finally:
        dist.destroy_process_group()


def run_processes(worker, world_size, workdir, *args, backend="gloo"):
    """Runs worker(rank, world_size, workdir, *args) in `world_size` fresh processes; raises if one fails."""
    torch.multiprocessing.spawn(_entry, args=(worker, world_size, str(workdir), backend, args), nprocs=world_size,
                                join=True)
