"""A client for an OpenAI-compatible chat-completions endpoint: the §3 teacher and the §5 judge. Each try
is bounded, waits are capped, replies are capped in size, and no credential is ever shown."""
import http.client
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


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
                    max_tokens=None, max_wait=MAX_WAIT, max_reply=MAX_REPLY):
    """One call to an OpenAI-compatible /chat/completions endpoint with the standard library.
    Each try has `timeout` seconds in all, however the server sends its reply. Timeouts, refused
    connections, 429 and 5xx are retried after backoff x 2^try seconds, or the server's Retry-After,
    at most `max_wait` seconds (so --retries 12 waits at most 1+2+4+8+16+7x30 = 241 s in all between
    tries), each retry said on stderr. Other HTTP errors, a reply over `max_reply` bytes and a reply
    that is not a chat completion raise RuntimeError. The key goes in the Authorization header only,
    never in a message, and never follows a redirect; a user:password@ in the URL is sent as HTTP
    Basic authentication (without a key) and shown as ***@ in every message. The request's body is
    {"model", "messages", "temperature"[, "max_tokens"]} as json.dumps writes it, as the openai 0.x client
    that the authors' scripts call sends it."""
    shown = shown_url(base_url)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, request, fp, code, msg, headers, new_url):
            raise RuntimeError(f"{shown}: redirects to {shown_url(new_url)}; not followed, so that the API key "
                               f"stays with {shown} (pass the new URL if you trust it)")
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                       **({} if max_tokens is None else {"max_tokens": max_tokens})}).encode()
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
