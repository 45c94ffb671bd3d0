"""Plumbing of llava.py's generation loop: the stop string found on token ids, so that no text is
decoded while an answer is generated."""
import weakref


_pieces = weakref.WeakKeyDictionary()  # tokenizer -> {token id: the bytes its text adds, or None}


def piece(tokenizer, token, first=False):
    """The bytes that `token` adds to a decoded text (a leading space included), or None where it
    cannot be told alone: a byte of a letter written in several, or a tokenizer that cleans up
    spaces across tokens. `first`: the token opens the text, as decode sees it (without the space)."""
    if first:
        text = tokenizer.decode([token])
        return None if "\ufffd" in text else text.encode()
    table = _pieces.setdefault(tokenizer, {})
    if token not in table:
        base = tokenizer.encode("a", add_special_tokens=False)  # a text the piece goes after
        text = tokenizer.decode(base + [token])
        before = tokenizer.decode(base)
        whole = text.startswith(before) and "\ufffd" not in text and not tokenizer.clean_up_tokenization_spaces
        table[token] = text[len(before):].encode() if whole else None
    return table[token]


_byte_tokens = weakref.WeakKeyDictionary()  # tokenizer -> the ids of its byte-fallback tokens


def byte_tokens(tokenizer):
    """The ids of SentencePiece's byte-fallback tokens ("<0x41>"). A run of them decodes together, each
    byte as U+FFFD where the run is not UTF-8: a later byte can change how the earlier ones read."""
    if tokenizer not in _byte_tokens:
        _byte_tokens[tokenizer] = frozenset(i for t, i in tokenizer.get_vocab().items()
                                            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))
    return _byte_tokens[tokenizer]


class StopCheck:
    """Where each row's answer ends: at EOS, or at the token that completes the stop string in the
    answer's text, as tokenizer.decode(answer) would show it. The stop string may come split across
    tokens, or inside one token with more text; each token's piece is found once per tokenizer, and
    only the last few pieces of an answer are looked at. Where a piece cannot be told alone, the
    answer is decoded whole instead (exact, slower)."""

    def __init__(self, tokenizer, stop, rows):
        self.tokenizer, self.stop = tokenizer, stop.encode()
        self.answers = [[] for _ in range(rows)]

    def ends(self, row, token):
        """Adds `token` to the row's answer; whether the answer ends with it."""
        ids = self.answers[row]
        ids.append(token)
        if token == self.tokenizer.eos_token_id:
            return True
        if not self.stop:
            return False
        tail = self.tail(ids)
        return self.stop.decode() in self.tokenizer.decode(ids) if tail is None else self.stop in tail

    def tail(self, ids):
        """The bytes of an answer's last piece and of at least len(stop) - 1 before it (a match that
        is new ends in the last piece), or None where a piece cannot be told alone."""
        tail, need = b"", None
        for k in reversed(range(len(ids))):
            p = piece(self.tokenizer, ids[k], first=k == 0)
            if p is None:
                return None
            tail = p + tail
            need = len(p) + len(self.stop) - 1 if need is None else need
            if len(tail) >= need:
                return tail
        return tail
