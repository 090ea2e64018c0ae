"""Tokenizers with one interface: a character tokenizer for the tiny models and a wrapper around a local
Hugging Face tokenizer directory (LLaDA, Dream).

Interface (what prompt building, samplers and the trainer use)::

    encode(text) -> list[int]                 # no special tokens added
    decode(ids, skip_special_tokens=False) -> str
    pad_id, mask_id, eos_id, vocab_size       # ints
    apply_chat_template(messages, add_generation_prompt=True) -> str

Nothing is downloaded: :func:`load_tokenizer` reads a local directory only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
    pad_id: int
    mask_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str: ...


class CharTokenizer:
    """One token per character, plus special tokens with their own spelling.

    Args:
      pieces: id -> text. Plain pieces are single characters; special pieces (``specials``) may be longer
        strings (e.g. ``"<|mdm_mask|>"``). Ids need not be contiguous; ``vocab_size`` is ``max id + 1`` unless
        given.
      specials: names of the special pieces: must contain ``"mask"`` and ``"eos"``; ``"pad"`` defaults to
        eos; ``"sep"`` is optional (the compact formats end their prompt with it).
      unk_id: id for characters outside the vocabulary; None makes them an error.
      chat_format: ``"plain"``: the template concatenates the message contents and adds the SEP piece as the
        generation prompt (the compact formats); ``"tagged"``: ``<|role|>\\ncontent\\n`` per message and
        ``<|assistant|>\\n`` as generation prompt (a stand-in for real chat templates, all plain characters).
    """

    def __init__(
        self,
        pieces: Mapping[int, str],
        specials: Mapping[str, int],
        *,
        vocab_size: int | None = None,
        unk_id: int | None = None,
        chat_format: str = "plain",
        name: str = "char",
    ):
        if "mask" not in specials or "eos" not in specials:
            raise ValueError(f"CharTokenizer needs 'mask' and 'eos' special ids, got {dict(specials)}")
        if chat_format not in ("plain", "tagged"):
            raise ValueError(f"chat_format must be 'plain' or 'tagged', got {chat_format!r}")
        self.name = name
        self.pieces = dict(pieces)
        self.special_ids = {k: int(v) for k, v in specials.items()}
        self.special_ids.setdefault("pad", self.special_ids["eos"])
        for key, i in self.special_ids.items():
            if i not in self.pieces:
                raise ValueError(f"special {key!r} id {i} has no piece text")
        self.vocab_size = int(vocab_size if vocab_size is not None else max(self.pieces) + 1)
        if max(self.pieces) >= self.vocab_size:
            raise ValueError(f"piece id {max(self.pieces)} outside vocab_size {self.vocab_size}")
        self.pad_id = self.special_ids["pad"]
        self.mask_id = self.special_ids["mask"]
        self.eos_id = self.special_ids["eos"]
        self.sep_id = self.special_ids.get("sep")
        self.unk_id = unk_id
        self.chat_format = chat_format
        self._special_set = set(self.special_ids.values())
        self._char_to_id: dict[str, int] = {}
        self._multi: list[tuple[str, int]] = []
        for i, text in sorted(self.pieces.items()):
            if len(text) == 1:
                self._char_to_id.setdefault(text, i)
            elif len(text) > 1:
                self._multi.append((text, i))
            else:
                raise ValueError(f"piece {i} has empty text")
        self._multi.sort(key=lambda t: -len(t[0]))  # longest match first

    def encode(self, text: str) -> list[int]:
        ids, i, n = [], 0, len(text)
        while i < n:
            for piece, pid in self._multi:
                if text.startswith(piece, i):
                    ids.append(pid)
                    i += len(piece)
                    break
            else:
                ch = text[i]
                pid = self._char_to_id.get(ch, self.unk_id)
                if pid is None:
                    raise ValueError(f"{self.name} tokenizer: character {ch!r} at position {i} is not in the "
                                     f"vocabulary {''.join(sorted(self._char_to_id))!r}")
                ids.append(pid)
                i += 1
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self._special_set:
                continue
            out.append(self.pieces.get(i, "\ufffd"))
        return "".join(out)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        if self.chat_format == "plain":
            text = "".join(m["content"] for m in messages)
            if add_generation_prompt and self.sep_id is not None:
                text += self.pieces[self.sep_id]
            return text
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")

    def __repr__(self) -> str:
        return (f"CharTokenizer({self.name}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
                f"mask={self.mask_id}, eos={self.eos_id})")


# ---- presets ----

def ascii_tokenizer(*, mask_id: int = 250, eos_id: int = 251, vocab_size: int = 256) -> CharTokenizer:
    """ASCII characters as ids 0..127 plus ``<|mdm_mask|>`` and ``<|eot_id|>`` specials, vocabulary 256.

    Matches the ``tiny_llada`` / ``tiny_dream`` presets (mask 250, eos = pad 251), so the official chat
    prompts of every task can run through the tiny models. Non-ASCII characters become ``?``.
    """
    pieces = {i: chr(i) for i in range(128)}
    pieces[mask_id] = "<|mdm_mask|>"
    pieces[eos_id] = "<|eot_id|>"
    return CharTokenizer(pieces, {"mask": mask_id, "eos": eos_id}, vocab_size=vocab_size, unk_id=ord("?"),
                         chat_format="tagged", name="ascii")


# ---- Hugging Face tokenizers from a local directory ----

#: Mask-token spellings of the supported families (LLaDA, Dream), tried when neither the tokenizer nor the
#: directory's config.json names a mask id.
KNOWN_MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")


class HFTokenizer:
    """The project interface over a ``transformers`` tokenizer.

    ``encode`` adds no special tokens: the chat template already carries BOS/headers, and the official
    trainer tokenises the templated prompt with ``add_special_tokens=False``.
    """

    def __init__(self, tokenizer: Any, *, mask_id: int, path: str = ""):
        self.tokenizer = tokenizer
        self.path = path
        self.mask_id = int(mask_id)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {path!r} has no eos_token_id; set eos_token in its tokenizer_config.json")
        self.eos_id = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        if self.pad_id == self.mask_id:
            raise ValueError(f"tokenizer {path!r}: pad id equals mask id {self.mask_id}; padding would be "
                             "read as masked positions")
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {self.path!r} has no chat_template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja); the official prompts need one")
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
                f"mask={self.mask_id}, eos={self.eos_id})")


def _config_mask_id(directory: Path) -> int | None:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    try:
        value = json.loads(cfg.read_text()).get("mask_token_id")
    except (json.JSONDecodeError, OSError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def _from_pretrained(directory: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer  # lazy: heavy, and only real (non-character) tokenizers need it

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=trust_remote_code)


def load_tokenizer(
    path: str | os.PathLike, *, mask_token_id: int | None = None, trust_remote_code: bool = False
) -> HFTokenizer:
    """Load the tokenizer in a local directory (never the Hub) and resolve its mask id.

    The mask id is, in order: ``mask_token_id``; the tokenizer's ``mask_token_id``; ``mask_token_id`` in the
    directory's ``config.json``; the id of a known mask token (``<|mdm_mask|>`` LLaDA, ``<|mask|>`` Dream).

    LLaDA-8B-Base ships a ``special_tokens_map.json`` that is not valid JSON; if loading fails on it, the
    directory is loaded again from a temporary view without that file (a warning says so).
    ``trust_remote_code`` runs tokenizer code from the directory (Dream's ``tokenization_dream.py``); it is off
    by default.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist (expected a local "
                                "directory with tokenizer.json or vocab files; nothing is downloaded)")
    try:
        tok = _from_pretrained(directory, trust_remote_code)
    except (json.JSONDecodeError, ValueError) as exc:
        stm = directory / "special_tokens_map.json"
        bad_map = False
        if stm.is_file():
            try:
                json.loads(stm.read_text())
            except json.JSONDecodeError:
                bad_map = True
        if not bad_map:
            raise
        log.warning("%s is not valid JSON; loading the tokenizer without it", stm)
        with tempfile.TemporaryDirectory(prefix="gdsd-tok-") as tmp:
            for entry in directory.iterdir():
                if entry.name != "special_tokens_map.json" and entry.is_file():
                    target = Path(tmp) / entry.name
                    try:
                        os.symlink(entry.resolve(), target)
                    except OSError:
                        shutil.copy2(entry, target)
            tok = _from_pretrained(Path(tmp), trust_remote_code)
        del exc
    mask = mask_token_id
    if mask is None and getattr(tok, "mask_token_id", None) is not None:
        mask = tok.mask_token_id
    if mask is None:
        mask = _config_mask_id(directory)
    if mask is None:
        vocab = tok.get_vocab()
        for spelling in KNOWN_MASK_TOKENS:
            if spelling in vocab:
                mask = vocab[spelling]
                break
    if mask is None:
        raise ValueError(f"cannot find the mask token id of tokenizer {str(directory)!r}: pass mask_token_id, set "
                         f"mask_token in the tokenizer, mask_token_id in config.json, or add one of {KNOWN_MASK_TOKENS}")
    return HFTokenizer(tok, mask_id=int(mask), path=str(directory))
