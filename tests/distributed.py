"""Running a test body in several processes: spawn, rendezvous through a file, clean teardown.

    def _worker(rank, world_size, workdir, *args): ...     # module level, so spawn can pickle it
    run_processes(_worker, 2, tmp_path, *args)              # gloo on the CPU
    run_processes(_worker, 2, tmp_path, backend="nccl")     # one GPU per rank

Ranks talk through files in `workdir` (inputs.pt in, results out); the rendezvous is a
file there too, so no port can be taken by another test run.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessExitedException


def _finished_marker(workdir, rank):
    return os.path.join(workdir, f"rank{rank}.finished")


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
        open(_finished_marker(workdir, rank), "w").close()
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker threads can still be alive while the
    # C++ statics are destroyed, which aborts the process now and then ("terminate called
    # without an active exception", seen once in CI after the work had finished).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(worker, world_size, workdir, *args, backend="gloo"):
    """Runs worker(rank, world_size, workdir, *args) in `world_size` fresh processes; raises if one fails.

    A rank killed by a signal after it finished its work and the final barrier (its
    marker file exists) died in torch's process-group teardown, not in the code under
    test: that gives a warning, not a failure. Everything else fails the test.
    """
    try:
        torch.multiprocessing.spawn(_entry, args=(worker, world_size, str(workdir), backend, args),
                                    nprocs=world_size, join=True)
    except ProcessExitedException as error:
        finished = all(os.path.exists(_finished_marker(str(workdir), rank)) for rank in range(world_size))
        if not (finished and error.signal_name):
            raise
        warnings.warn(f"tfkernels tests: every rank finished its work, then {error} during process-group teardown")
