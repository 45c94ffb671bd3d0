"""The ranks of a run: heartbeats, so that a rank left waiting can name the one that went silent."""
import math
import os
import time


def heartbeat(folder, rank, every):
    """Touch `folder`/.heartbeat/rank_N every `every` seconds from a thread of its own, for as long as the
    process lives: it goes on while the rank waits in a collective and stops when the process is
    stopped or gone, so that a rank left waiting can tell which ranks went silent."""
    import threading
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
