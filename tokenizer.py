"""Tokenizers of Llama-family checkpoints and their chat formats, over tiktoken or sentencepiece.

The shape of llama3's tokenizer.py: the Message and Dialog types, a Tokenizer (encode / decode,
special ids), then ChatFormat with encode_header / encode_message / encode_dialog_prompt; ChatML
(SmolLM2) and Llama2Format follow it. A Tokenizer comes from one of four sources:

    tok = Tokenizer.from_hf_json("SmolLM2/tokenizer.json", config)  # byte-level BPE
    tok = Tokenizer.from_model_file("Llama-3/tokenizer.model")  # tiktoken ranks or sentencepiece
    tok = Tokenizer.from_gguf(fields, "model.gguf")  # a GGUF file's tokenizer.ggml.* values
    tok = Tokenizer.byte_level()  # no file: for random weights (train.py --random-init)
    tok.encode_chat("What is 2+2?", system="Be brief.")  # ends where the reply begins

Byte-level BPE vocabularies become tiktoken ranks (a token's id is its merge priority), so
tiktoken's merging reproduces the merges table without reading it.
"""

import base64
import json
from pathlib import Path
from typing import Literal, Sequence, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]


class LoadError(ValueError):
    """A checkpoint a user handed us (weights, config or tokenizer) is missing, malformed or
    unsupported: one line naming the file. The loaders (loaders.py) raise it too."""


# pre-tokenizer patterns of byte-level BPE vocabularies
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# SmolLM2 ("smollm"): digits split one by one, then GPT-2's pattern on the pieces between. A
# digit ends a piece, so a run of spaces before it stays whole: hence the wider lookahead.
SMOLLM_PATTERN = (r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"""
                  r"""|\s+(?![^\s\p{N}])|\s+""")
PRE_TOKENIZERS = {"gpt2": GPT2_PATTERN, "default": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                  "llama3": LLAMA3_PATTERN, "smollm": SMOLLM_PATTERN}

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # unprintable bytes map to 256, 257, ... in byte order
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """encode / decode, special ids and the model's chat format, over tiktoken or sentencepiece."""

    def __init__(self, backend, specials: dict[str, int], bos_id: int, eos_id: int,
                 pad_id: int | None = None, chat: type | None = None):
        self.backend = backend  # tiktoken.Encoding or sentencepiece.SentencePieceProcessor
        self.specials = specials
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.chat = chat(self) if chat else None  # ChatFormat, ChatML, Llama2Format or none
        self.chat_format = chat.name if chat else None  # "llama3", "chatml", "llama2" or None
        stops = chat.stops if chat else ()
        self.stop_ids = {eos_id} | {specials[s] for s in stops if s in specials}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Plain text to ids; special-token strings in the text are encoded as ordinary text."""
        if hasattr(self.backend, "encode_ordinary"):
            ids = self.backend.encode_ordinary(text)
        else:
            ids = self.backend.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if hasattr(self.backend, "encode_ordinary"):
            return self.backend.decode(ids)
        special = (self.bos_id, self.eos_id, self.pad_id)
        return self.backend.decode([i for i in ids if i not in special])

    def encode_chat(self, user: str, system: str | None = None) -> list[int]:
        """One user turn, ending exactly where the assistant's reply begins."""
        if self.chat is None:
            return self.encode(user, bos=True)
        system_turn = [Message(role="system", content=system)] if system else []
        return self.chat.encode_dialog_prompt(system_turn + [Message(role="user", content=user)])

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_bpe_vocab(cls, tokens: list[str], special_ids: set[int], pattern: str, bos_id: int,
                       eos_id: int, pad_id: int | None = None, name: str = "bpe") -> "Tokenizer":
        """A byte-level BPE vocabulary (GPT-2 characters) as tiktoken ranks: rank = token id.

        Byte-level BPE vocabularies list merged tokens in merge order, so a token's id is its
        merge priority and tiktoken's rank-driven merging reproduces the merges table.
        """
        import tiktoken

        dec = _byte_decoder()
        ranks, specials = {}, {}
        for i, tok in enumerate(tokens):
            if i in special_ids:
                specials[tok] = i
            else:
                ranks[bytes(dec[c] for c in tok)] = i
        enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=specials)
        chat = None
        if "<|im_start|>" in specials:
            chat = ChatML
        elif "<|start_header_id|>" in specials:
            chat = ChatFormat
        return cls(enc, specials, bos_id, eos_id, pad_id, chat)

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """Bytes as tokens (ids 0-255, no merges), then Llama 3's 256 special tokens (vocabulary
        512) and its chat format: a tokenizer that needs no file, for models with random weights
        (train.py --random-init)."""
        import tiktoken

        specials = {s: 256 + i for i, s in enumerate(LLAMA3_SPECIALS)}
        enc = tiktoken.Encoding(name="bytes", pat_str=LLAMA3_PATTERN, special_tokens=specials,
                                mergeable_ranks={bytes([b]): b for b in range(256)})
        bos, eos = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        return cls(enc, specials, bos, eos, None, ChatFormat)

    @classmethod
    def from_tiktoken_file(cls, path: Path) -> "Tokenizer":
        """Llama 3's tokenizer.model: lines of base64(token) rank, then 256 special tokens."""
        import tiktoken

        ranks = {}
        for line in Path(path).read_text().splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
        enc = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                special_tokens=specials)
        bos, eos = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        return cls(enc, specials, bos, eos, None, ChatFormat)

    @classmethod
    def from_sentencepiece(cls, path: Path) -> "Tokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        pad = sp.pad_id() if sp.pad_id() >= 0 else None
        return cls(sp, {}, sp.bos_id(), sp.eos_id(), pad, Llama2Format)

    @classmethod
    def from_model_file(cls, path: Path) -> "Tokenizer":
        """tokenizer.model: a tiktoken rank file (Llama 3) or a sentencepiece protobuf (Llama 2)."""
        head = Path(path).read_bytes()[:256]
        try:
            first = head.decode().split("\n", 1)[0].split()
            if len(first) == 2 and first[1].isdigit():
                base64.b64decode(first[0], validate=True)
                return cls.from_tiktoken_file(path)
        except (UnicodeDecodeError, ValueError):
            pass
        return cls.from_sentencepiece(path)

    @classmethod
    def from_hf_json(cls, path: Path, config: dict) -> "Tokenizer":
        """tokenizer.json of a byte-level BPE model (Llama 3, SmolLM2, GPT-2 style); `config`
        (config.json) may name bos_token_id / eos_token_id / pad_token_id."""
        tj = json.loads(Path(path).read_text())
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise LoadError(f"{path}: tokenizer model type {model.get('type')!r} is not "
                            f"byte-level BPE")
        vocab = dict(model["vocab"])
        for t in tj.get("added_tokens", []):
            vocab[t["content"]] = t["id"]
        tokens = [None] * (max(vocab.values()) + 1)
        for tok, i in vocab.items():
            tokens[i] = tok
        special_ids = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
        pattern = _hf_pre_tokenizer_pattern(tj.get("pre_tokenizer"), path)
        by_name = {tokens[i]: i for i in special_ids}
        bos = config.get("bos_token_id")
        bos = bos if isinstance(bos, int) else by_name.get("<|begin_of_text|>")
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos  # Llama 3 Instruct lists several
        if not isinstance(eos, int):
            eos = by_name.get("<|end_of_text|>", by_name.get("<|endoftext|>"))
        missing = [i for i, t in enumerate(tokens) if t is None]
        if missing:
            raise LoadError(f"{path}: vocabulary has holes (no token for ids such as "
                            f"{missing[:3]})")
        return cls.from_bpe_vocab(tokens, special_ids, pattern, bos, eos,
                                  config.get("pad_token_id"), Path(path).name)

    @classmethod
    def from_gguf(cls, fields: dict, path) -> "Tokenizer":
        """The tokenizer a GGUF file holds: `fields` maps its tokenizer.ggml.* keys to their
        values."""
        f = {k.removeprefix("tokenizer.ggml."): v for k, v in fields.items()}
        if f.get("model") != "gpt2":
            raise LoadError(f"{path}: GGUF tokenizer model {f.get('model')!r} is not supported "
                            f"(only byte-level BPE 'gpt2')")
        pre = f.get("pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise LoadError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                            f"({', '.join(PRE_TOKENIZERS)})")
        types = f.get("token_type", [])
        special_ids = {i for i, t in enumerate(types) if t in (3, 4)}  # CONTROL, USER_DEFINED
        return cls.from_bpe_vocab(f["tokens"], special_ids, PRE_TOKENIZERS[pre],
                                  f.get("bos_token_id"), f.get("eos_token_id"),
                                  f.get("padding_token_id"), Path(path).name)


def _hf_pre_tokenizer_pattern(pre, path) -> str:
    """The regex that a tokenizer.json pre_tokenizer amounts to."""
    steps = [pre] if pre else []
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
    types = [s.get("type") for s in steps]
    for s in steps:
        if s.get("type") == "Split" and "Regex" in s.get("pattern", {}):
            return s["pattern"]["Regex"]
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return SMOLLM_PATTERN
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    raise LoadError(f"{path}: unsupported pre_tokenizer {types}")


# -----------------------------------------------------------------------------
# chat formats


class ChatFormat:
    """Llama 3's, as llama3's tokenizer.py writes it: a header per message, the stripped content,
    <|eot_id|>; after <|begin_of_text|>, the messages, then the assistant's header."""

    name = "llama3"
    stops = ("<|eot_id|>", "<|eom_id|>")  # end of turn, end of a tool call's message

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message: Message) -> list[int]:
        tok, sp = self.tokenizer, self.tokenizer.specials
        role = tok.encode(message["role"])
        return [sp["<|start_header_id|>"]] + role + [sp["<|end_header_id|>"]] + tok.encode("\n\n")

    def encode_message(self, message: Message) -> list[int]:
        content = self.tokenizer.encode(message["content"].strip())
        return self.encode_header(message) + content + [self.tokenizer.specials["<|eot_id|>"]]

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        # the start of an assistant message, for the model to complete
        return tokens + self.encode_header(Message(role="assistant", content=""))


class ChatML(ChatFormat):
    """<|im_start|>role\\ncontent<|im_end|>\\n per message, no BOS (SmolLM2's chat template)."""

    name = "chatml"
    stops = ("<|im_end|>",)

    def encode_header(self, message: Message) -> list[int]:
        role = self.tokenizer.encode(f"{message['role']}\n")
        return [self.tokenizer.specials["<|im_start|>"]] + role

    def encode_message(self, message: Message) -> list[int]:
        # role and content as one text, as the template renders them ("\n" may merge otherwise)
        tok, sp = self.tokenizer, self.tokenizer.specials
        text = f"{message['role']}\n{message['content']}"
        return [sp["<|im_start|>"]] + tok.encode(text) + [sp["<|im_end|>"]] + tok.encode("\n")

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        tokens = []
        for message in dialog:
            tokens.extend(self.encode_message(message))
        return tokens + self.encode_header(Message(role="assistant", content=""))


class Llama2Format:
    """Llama 2's [INST] format for one user turn, with an optional <<SYS>> block before it."""

    name = "llama2"
    stops = ()

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        *system, user = dialog
        content = user["content"]
        if system:
            content = f"<<SYS>>\n{system[0]['content']}\n<</SYS>>\n\n{content}"
        return self.tokenizer.encode(f"[INST] {content.strip()} [/INST]", bos=True)
