"""The ranks of a run: the process group and its collectives, Ctrl-C while files are written, heartbeats and timeouts."""
import contextlib
import datetime
import gc
import math
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import _collective_utils, _redistribute
from torch.distributed.tensor.debug import _clear_sharding_prop_cache

import cli


# ----------------------------------------------------------------------------------------------
# One process or many: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
# ----------------------------------------------------------------------------------------------

def setup(timeout=30):
    """(rank, world_size, device). Under torchrun: a process group (NCCL on GPUs, gloo on CPU) whose
    collectives wait `timeout` minutes for a rank that stalls. A second call returns the same group."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout))
    return dist.get_rank(), dist.get_world_size(), device


def close():
    """Leave the process group once every rank is done, and let go of what holds it: DTensor's caches keep
    FSDP's device mesh, and the mesh its process groups. gloo's threads are then joined here, not torn
    down during interpreter exit, where that can abort a finished run (once in CI). Call it once the
    model and its optimizer are gone."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    _clear_sharding_prop_cache()
    _redistribute.clear_redistribute_planner_cache()
    _redistribute._gen_transform_infos.cache_clear()
    _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()
    gc.collect()  # FSDP's modules and hooks hold one another: a cycle


def all_sum(value):
    """Sum a number over all ranks (itself in one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item()


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def ctrl_c_waits():
    """A Ctrl-C while files are written waits for the writing to end, then stops the run: a checkpoint
    or an export is never left half written (torch's writer would turn the interrupt into its own error)."""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# A rank that goes silent: heartbeats, and the one line a rank left waiting ends with
# ----------------------------------------------------------------------------------------------

def heartbeat(folder, rank, every):
    """Touch `folder`/.heartbeat/rank_N every `every` seconds from a thread of its own, for as long as the
    process lives: it goes on while the rank waits in a collective and stops when the process is
    stopped or gone, so that a rank left waiting can tell which ranks went silent."""
    path = os.path.join(folder, ".heartbeat", f"rank_{rank}")
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def beat():
        while True:
            with open(path, "w") as f:
                f.write(f"{time.time()}\n")
            time.sleep(every)
    threading.Thread(target=beat, daemon=True).start()


def silent_ranks(folder, world_size, for_seconds):
    """The ranks whose heartbeat file is older than `for_seconds` (or missing), as {rank: seconds}."""
    silent = {}
    for rank in range(world_size):
        try:
            age = time.time() - os.path.getmtime(os.path.join(folder, ".heartbeat", f"rank_{rank}"))
        except OSError:
            age = math.inf
        if age > for_seconds:
            silent[rank] = age
    return silent


def timed_out(e):
    """Whether `e` is a collective that waited past the timeout under torchrun: gloo raises it (NCCL's
    watchdog ends the process itself), wrapped by DCP when it happens in a checkpoint."""
    return "RANK" in os.environ and any("timed out" in str(x).lower() for x in cli.causes(e))


def timed_out_message(folder, timeout, kept):
    """The one line of a rank whose collective waited `timeout` minutes: which ranks went silent (their
    heartbeats in `folder`), and what the run keeps (`kept`, a phrase)."""
    silent = silent_ranks(folder, int(os.environ["WORLD_SIZE"]), min(30.0, timeout * 30))
    who = (f"rank {', '.join(map(str, silent))} stopped answering ({max(silent.values()):.0f} s without a "
           f"heartbeat: stopped, killed, or its node is gone)" if silent else
           "another process gave no word (every rank is alive: one hangs, or waits for a slow disk)")
    return (f"rank {os.environ['RANK']}: {who}; the collective waited --timeout {timeout:g} minutes. The run stops, "
            f"and {kept}. Run the same command with --resume, or a larger --timeout if the wait was expected")
