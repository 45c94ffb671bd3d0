"""The plumbing every program shares, and no section of the paper is about.

Each program's errors as one line ("train.py: ...") instead of a traceback; JSON and JSONL files
written so that a crash never leaves half of one; model directories by hub id or path, in the
llava-hf layout or the authors'; weight files read one at a time, never a pickle run; and a client
for an OpenAI-compatible chat endpoint (the §3 teacher, the §5 judge).
"""
import argparse
import errno
import fcntl
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import huggingface_hub
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


class SampleError(ValueError):
    """A sample that cannot be used; the message names it."""


# ----------------------------------------------------------------------------------------------
# The command line: one line for each mistake
# ----------------------------------------------------------------------------------------------

def cli(main, program):
    """Run a program's main(): a message that ends it, a file that cannot be read or written (missing,
    a folder, read-only, a full disk) and a bad sample each become one line, "program: ...", exit 1."""
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str) and not e.code.startswith(program):
            raise SystemExit(f"{program}: {e.code}") from None
        raise
    except (OSError, SampleError) as e:
        raise SystemExit(f"{program}: {one_line(e)}") from None
    except KeyboardInterrupt:
        print(f"{program}: stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)


def one_line(e):
    """An error as one line; an OSError names its file, and a full disk says so."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        return text + (" (the disk is full)" if e.errno == errno.ENOSPC else "")
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def number(kind, low, high=math.inf, above=False):
    """An argparse type: a finite int or float from `low` (or above it) to `high`."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            most = f" and at most {high}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"{text}: must be {'above' if above else 'at least'} {low}{most}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


# ----------------------------------------------------------------------------------------------
# JSON and JSONL files
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Model directories: a hub id or a path; the llava-hf layout or the authors'
# ----------------------------------------------------------------------------------------------

AUTHORS_IMAGE_TOKEN_ID = -200  # the authors' IMAGE_TOKEN_INDEX: a position id outside the vocabulary


class RemoteCodeError(PermissionError):
    """A model folder that asks to run Python files of its own: an OSError, so that every program says
    it in one line naming the folder, as it says a missing one."""


REMOTE_CODE_CONFIGS = ["config.json", "preprocessor_config.json", "tokenizer_config.json", "processor_config.json"]


def refuse_remote_code(folder):
    """Stop before transformers reads `folder` if its configs ask to run Python files of their own
    (auto_map): transformers would ask on stdin, and a "y" (or a pipe) would run them. Every
    from_pretrained here also says trust_remote_code=False, for hub ids fetched by transformers."""
    for name in REMOTE_CODE_CONFIGS:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                config = json.loads(f.read())
        except (OSError, ValueError, RecursionError):  # absent or unreadable: transformers says so itself
            continue
        if isinstance(config, dict) and "auto_map" in config:
            raise RemoteCodeError(errno.EPERM, f"its configs ask to run their own code (auto_map); this project "
                                               f"never runs it (see {name})", folder)


def load_tokenizer_and_config(path):
    """What data.py needs to render samples for a saved model, without loading its weights."""
    path = resolve(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if config.get("model_type") == "llava":
        vc = config["vision_config"]
        keep_cls = config.get("vision_feature_select_strategy", "default") == "full"
        return tokenizer, {"template": config.get("llava_template", "llava15"),
                           "image_token_id": config["image_token_index"],
                           "num_image_tokens": count_image_tokens(vc["image_size"], vc["patch_size"], keep_cls)}
    if os.path.isdir(config["mm_vision_tower"]):
        refuse_remote_code(config["mm_vision_tower"])
    vision = transformers.AutoConfig.from_pretrained(config["mm_vision_tower"], trust_remote_code=False)
    vision = getattr(vision, "vision_config", vision)
    return tokenizer, {"template": authors_template(config), "image_token_id": AUTHORS_IMAGE_TOKEN_ID,
                       "num_image_tokens": count_image_tokens(vision.image_size, vision.patch_size)}


def count_image_tokens(image_size, patch_size, keep_cls=False):
    """N_v: one visual token per patch of the grid, and CLS if it is kept."""
    return (image_size // patch_size) ** 2 + int(keep_cls)


def resolve(path):
    """A local directory as it is; otherwise a hub id, fetched (or found in the local cache): the
    configs, the tokenizer, and the weights as safetensors, or pytorch_model*.bin where the repo
    ships only those (the authors' LLaVA releases)."""
    if os.path.isdir(path):
        refuse_remote_code(path)
        return path
    try:
        files = huggingface_hub.list_repo_files(path)
    except Exception:  # offline: whatever the local cache holds
        files = None
    try:
        folder = huggingface_hub.snapshot_download(path, allow_patterns=["*.json", "*.model", "*.txt"] + weight_patterns(files))
    except Exception as e:
        raise FileNotFoundError(f"{path}: not a directory, and the hub cannot give it ({type(e).__name__})")
    refuse_remote_code(folder)
    return folder


def weight_patterns(files):
    """Which weight files to fetch from a repo listing `files` (None: unknown)."""
    if files is not None and not any(f.endswith(".safetensors") for f in files):
        return ["pytorch_model*.bin"]
    return ["*.safetensors"] if files is not None else ["*.safetensors", "pytorch_model*.bin"]


def authors_template(config):
    return "llava15" if config.get("mm_projector_type", "linear") != "linear" else "paper"


# ----------------------------------------------------------------------------------------------
# Weight files: names in each layout, read one file at a time
# ----------------------------------------------------------------------------------------------

def named(path, read):
    """read() from `path`; an error that does not say where names it (a corrupt weight file)."""
    try:
        return read()
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: {one_line(e)}") from None


# Our parameter names -> the names transformers' LlavaForConditionalGeneration writes and reads.
TO_HF = [(r"^projector\.0\.", "multi_modal_projector.linear_1."),
         (r"^projector\.2\.", "multi_modal_projector.linear_2.")]


# Names in checkpoints -> ours. llava-hf on the hub, transformers 5, the authors' code.
FROM_CHECKPOINT = [
    (r"^multi_modal_projector\.linear_1\.", "projector.0."),
    (r"^multi_modal_projector\.linear_2\.", "projector.2."),
    (r"^model\.multi_modal_projector\.linear_1\.", "projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "projector.2."),
    (r"^(model\.)?vision_tower\.vision_model\.", "vision_tower."),  # transformers 4 nests CLIP
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]


# Names in the authors' LlavaLlamaForCausalLM checkpoints -> ours.
FROM_AUTHORS = [(r"^model\.mm_projector\.(weight|bias)$", r"projector.0.\1"),  # linear W: a bare nn.Linear
                (r"^model\.mm_projector\.", "projector."),
                (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
                (r"^model\.", "language_model.model."),
                (r"^lm_head\.", "language_model.lm_head.")]


def rename(key, rules):
    for pattern, replacement in rules:
        new_key, n = re.subn(pattern, replacement, key)
        if n:
            return new_key
    return key


def usual_mode(*paths):
    """safetensors writes its files readable by their owner alone; give them what the user's umask
    gives any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def own_storage(tensor):
    """A tensor that safetensors can write: a copy if it is a view into a larger storage (as the
    full state dict gathered from FSDP shards can hold)."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def checkpoint_files(path):
    """A checkpoint directory's weight files: model*.safetensors (one or shards), else the authors'
    pytorch_model*.bin."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f.startswith("model"))
    files = files or sorted(f for f in os.listdir(path) if re.fullmatch(r"pytorch_model.*\.bin", f))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors or pytorch_model*.bin")
    return [os.path.join(path, f) for f in files]


def read_file(file, device="cpu"):
    """One weight file's tensors: safetensors straight onto `device`; a .bin read with
    weights_only=True (no code from the file is run) and memory-mapped."""
    if file.endswith(".safetensors"):
        return named(file, lambda: load_file(file, device=str(device)))
    try:
        return torch.load(file, map_location=device, weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:  # empty, cut short, or code in it
        if isinstance(e, pickle.UnpicklingError):
            raise ValueError(f"{file}: holds more than tensors; not read, since reading it would run its code") from None
        why = "empty" if os.path.getsize(file) == 0 else "cut short, or not in torch.save's format"
        raise ValueError(f"{file}: not a PyTorch weight file ({why})") from None


def stored_shapes(files):
    """{name: shape} of every tensor in the files, read from their headers, not their data."""
    shapes = {}
    for file in files:
        if file.endswith(".safetensors"):
            with named(file, lambda: safe_open(file, "pt")) as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in read_file(file).items()})
    return shapes


def check_weights(expected, found, tied, source):
    """Raise an error naming the first missing, unexpected or mis-shaped weight ({name: shape} each)."""
    if tied:  # a tied head is the embedding matrix: never stored separately
        expected.pop("language_model.lm_head.weight", None)
        found.pop("language_model.lm_head.weight", None)
    for problem, names in (("missing", sorted(set(expected) - set(found))), ("unexpected", sorted(set(found) - set(expected)))):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ValueError(f"{source}: {problem} weight {names[0]}{more}")
    for k, shape in found.items():
        if shape != expected[k]:
            raise ValueError(f"{source}: weight {k} has shape {shape}, the model expects {expected[k]}")


class quiet_transformers:
    """Silence transformers' load reports inside a `with` block."""
    def __enter__(self):
        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

    def __exit__(self, *exc):
        transformers.logging.set_verbosity(self.level)


# ----------------------------------------------------------------------------------------------
# An OpenAI-compatible chat endpoint
# ----------------------------------------------------------------------------------------------

MAX_REPLY = 10 * 2 ** 20  # bytes: a judge's review or a teacher's answer is a few KB; more is no chat completion
MAX_WAIT = 30.0  # seconds: the longest wait between two tries, a server's Retry-After included


def shown_url(url):
    """`url` as a message may show it: a user:password@ in it becomes ***@."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


class _Deadline:
    """One try's whole time: at `seconds` from now the try's socket is shut, so that a server that trickles
    its reply (a byte a second, each read within the socket's timeout) cannot hold the try longer."""

    def __init__(self, seconds):
        import threading
        self.end, self.expired, self.sockets, self.guard = time.monotonic() + seconds, False, [], threading.Lock()
        self.timer = threading.Timer(seconds, self.expire)
        self.timer.daemon = True
        self.timer.start()

    def left(self):
        return max(self.end - time.monotonic(), 0.001)

    def watch(self, sock):
        with self.guard:
            self.sockets.append(sock)
            if self.expired:
                self.shut(sock)

    def expire(self):
        with self.guard:
            self.expired = True
            for sock in self.sockets:
                self.shut(sock)

    @staticmethod
    def shut(sock):
        import socket
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self):
        self.timer.cancel()


def _opener(deadline, redirect_handler):
    """urllib's opener (proxies from the environment included) whose connections `deadline` can shut."""

    def watched(connection):
        class Watched(connection):
            def connect(self):
                self.timeout = deadline.left()
                super().connect()
                deadline.watch(self.sock)
        return Watched

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)
    return urllib.request.build_opener(HTTP, HTTPS, redirect_handler)


def _retry_after(headers):
    """A Retry-After header's wait in seconds (its seconds form or its date form), or None."""
    value = (headers or {}).get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        import email.utils
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(when.timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


def chat_completion(messages, base_url, model, api_key, timeout=60, retries=5, backoff=1.0, temperature=0.7,
                    max_wait=MAX_WAIT, max_reply=MAX_REPLY):
    """One call to an OpenAI-compatible /chat/completions endpoint with the standard library.
    Each try has `timeout` seconds in all, however the server sends its reply. Timeouts, refused
    connections, 429 and 5xx are retried after backoff x 2^try seconds, or the server's Retry-After,
    at most `max_wait` seconds (so --retries 12 waits at most 1+2+4+8+16+7x30 = 241 s in all between
    tries), each retry said on stderr. Other HTTP errors, a reply over `max_reply` bytes and a reply
    that is not a chat completion raise RuntimeError. The key goes in the Authorization header only,
    never in a message, and never follows a redirect; a user:password@ in the URL is sent as HTTP
    Basic authentication (without a key) and shown as ***@ in every message."""
    shown = shown_url(base_url)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, request, fp, code, msg, headers, new_url):
            raise RuntimeError(f"{shown}: redirects to {shown_url(new_url)}; not followed, so that the API key "
                               f"stays with {shown} (pass the new URL if you trust it)")
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature}).encode()
    headers = {"Content-Type": "application/json"}
    parts = urllib.parse.urlsplit(base_url)
    if "@" in parts.netloc:  # urllib would look the user:password@host up as a host name
        import base64
        user, host = parts.netloc.rsplit("@", 1)
        if api_key:
            raise RuntimeError(f"{shown}: a user:password in the URL and an API key; pass one of them")
        base_url = urllib.parse.urlunsplit(parts._replace(netloc=host))
        headers["Authorization"] = "Basic " + base64.b64encode(urllib.parse.unquote(user).encode()).decode()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        request = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", body, headers)
        deadline, wait = _Deadline(timeout), None
        try:
            with _opener(deadline, NoRedirect()).open(request, timeout=timeout) as response:
                if (response.length or 0) > max_reply:  # its Content-Length, if it has a valid one
                    raise RuntimeError(f"{shown}: the reply is {response.length} bytes, over {max_reply} (a chat "
                                       f"completion is a few KB); not read")
                text = b""
                while chunk := response.read(65536):
                    text += chunk
                    if len(text) > max_reply:
                        raise RuntimeError(f"{shown}: the reply is over {max_reply} bytes (a chat completion is a "
                                           f"few KB); not read further")
            if deadline.expired:  # the socket was shut part way: what came is not the whole reply
                raise TimeoutError("timed out")
            try:
                return json.loads(text)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise RuntimeError(f"{shown}: the reply is not a chat completion ({text[:60]!r})") from None
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise RuntimeError(f"{shown}: HTTP {e.code} {e.reason}") from None
            error, wait = f"HTTP {e.code}", _retry_after(e.headers)
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:  # cut short
            error = "timed out" if deadline.expired else str(getattr(e, "reason", e)) or type(e).__name__
        finally:
            deadline.cancel()
        if attempt == retries:
            raise RuntimeError(f"{shown}: gave up after {retries + 1} tries ({error})")
        delay = min(backoff * 2 ** attempt if wait is None else wait, max_wait)
        said = "" if wait is None else f" (Retry-After {wait:g} s)"
        print(f"{shown}: {error}{said}; try {attempt + 2} of {retries + 1} in {delay:g} s", file=sys.stderr)
        time.sleep(delay)
