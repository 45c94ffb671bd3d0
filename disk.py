"""Files: JSON and JSONL written atomically and read with checks, content fingerprints, and locks on the
folders and files a run writes."""
import fcntl
import hashlib
import json
import os


def write_json(path, obj):
    """Write atomically: a crash or a full disk leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    except OSError as e:  # a full disk fails at a write: name the file
        raise OSError(e.errno, e.strerror, path) from None
    os.replace(tmp, path)


def append_jsonl(path, row):
    """Add one row to a JSONL file (answers, reviews, metrics: kept as they come). A last line cut short
    by a crash is ended first, so that the new row stays a line of its own."""
    try:
        with open(path, "a+b") as f:
            cut = f.tell() > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
            f.write(("\n" if cut else "").encode() + json.dumps(row).encode() + b"\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def read_jsonl(path, required=False):
    """The rows of a JSONL file. What a program wrote (answers, reviews): none if it does not exist, and
    a line cut short by a crash is ignored (asked again). An input (required): a line that is not JSON
    stops with its number."""
    if not required and not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's stack
                if required:
                    raise SystemExit(f"{path}, line {number}: not JSON ({e}); fix or remove it") from None
    return rows


def load_json_object(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # missing, a folder, not JSON, not UTF-8
        raise SystemExit(f"{path}: cannot read JSON: {e}") from None
    except RecursionError:  # arrays or objects nested deeper than Python's stack
        raise SystemExit(f"{path}: cannot read JSON: nested too deep (thousands of levels); is it the right file?") from None


def load_json(path):
    """A LLaVA JSON file: a list of samples."""
    samples = load_json_object(path)
    if not isinstance(samples, list):
        raise SystemExit(f"{path}: expected a JSON list of samples")
    return samples


def content_fingerprint(path, whole=64 << 20, blocks=64, block=64 << 10):
    """A file's content as a short string, to tell whether a run's inputs changed at the same path.
    A file up to `whole` bytes (a data file, a small model): the sha256 of all its bytes. A larger one
    (a weight shard of GBs, which takes a minute to read whole): its size and the sha256 of its first
    MiB (a safetensors header: names, dtypes, shapes) and of `blocks` blocks of `block` bytes spread
    evenly over the file. Weights trained again or swapped for another model's differ in nearly every
    block; a change confined to the bytes between the blocks goes unnoticed. Modification times are
    left out: a copy of the same file has other times and the same content."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= whole:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            return f"sha256 {digest.hexdigest()}"
        digest.update(f.read(1 << 20))
        for i in range(blocks):
            f.seek((size - block) * i // (blocks - 1))
            digest.update(f.read(block))
    return f"size {size}, sampled sha256 {digest.hexdigest()}"


_held = {}  # lock file path -> its open file: a lock lasts as long as the process holds its file open


def hold_lock(folder, program):
    """Take `folder`/.lock for the life of this process, or stop with one line: two runs or evaluations
    writing one folder would mix their files. The kernel drops the lock when the process ends, however
    it ends (a crash, SIGKILL), so a stale lock never blocks the next run."""
    os.makedirs(folder, exist_ok=True)
    hold_lock_file(os.path.join(folder, ".lock"), program, folder, "folder")


def hold_lock_file(lock, program, name, what):
    """hold_lock's mechanism for any lock file (e.g. OUT.lock next to an output file OUT): `name` is
    what the one line says is in use, `what` the kind of thing to pass instead. Taking a lock this
    process already holds is a no-op."""
    lock = os.path.abspath(lock)
    if lock in _held:
        return
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"{program}: {name} is in use by {holder}; wait for it to end, or pass another {what}")
    f.truncate(0)
    f.write(f"{program} (pid {os.getpid()})\n")
    f.flush()
    _held[lock] = f
