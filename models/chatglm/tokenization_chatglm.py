"""A tiktoken tokenizer in the manner of the original glm-4-9b-chat's (remote code), written for glm4-intel.

The original checkpoint ships its tokenizer as Python code over tiktoken: byte-pair ranks in a
base64 text file (``tokenizer.model``: one ``<base64 bytes> <rank>`` line per token), GLM-4's special
tokens after them, and ``[gMASK]<sop>`` put in front of every encoded prompt. This class keeps that
interface (the tiktoken ``Encoding`` in ``self.tokenizer``, ``get_prefix_tokens``), which is what
openvino-tokenizers' tiktoken converter reads, so a test checkpoint made by
``python -m models.chatglm_twin --tokenizer tiktoken`` takes the same conversion path as the real one.
"""

import base64
import os

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

# GPT-2's pre-tokenizer split (also what byte-level BPE tokenizers of the tokenizers library use).
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path):
    """bytes -> rank from a ``<base64> <rank>`` file."""
    ranks = {}
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


class ChatGLM4Tokenizer(PreTrainedTokenizer):
    """Byte-pair tokenizer over tiktoken with GLM-4's special tokens given ids of their own."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, special_ids=None, padding_side="left", clean_up_tokenization_spaces=False,
                 **kwargs):
        self.vocab_file = vocab_file
        self.mergeable_ranks = load_ranks(vocab_file)
        self.special_ids = dict(special_ids or {})
        self.tokenizer = tiktoken.Encoding("glm4-intel-twin", pat_str=SPLIT, mergeable_ranks=self.mergeable_ranks,
                                           special_tokens=self.special_ids)
        self.decoder = {rank: token for token, rank in self.mergeable_ranks.items()}
        self.n_words = max([*self.mergeable_ranks.values(), *self.special_ids.values()]) + 1
        kwargs.setdefault("added_tokens_decoder", {i: AddedToken(name, special=True, normalized=False)
                                                   for name, i in self.special_ids.items()})
        kwargs.setdefault("eos_token", "<|endoftext|>")
        kwargs.setdefault("pad_token", "<|endoftext|>")
        kwargs.setdefault("additional_special_tokens", [name for name in self.special_ids if name != "<|endoftext|>"])
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         special_ids=self.special_ids, **kwargs)

    @property
    def vocab_size(self):
        return self.n_words

    def get_vocab(self):
        vocab = {self.convert_id_to_token(i): i for i in self.decoder}
        vocab.update(self.special_ids)
        return vocab

    def convert_id_to_token(self, index):
        """A rank's bytes as text where they are valid UTF-8, else the bytes themselves."""
        if index in self.decoder:
            token = self.decoder[index]
            try:
                return token.decode("utf-8")
            except UnicodeDecodeError:
                return token
        return next((name for name, i in self.special_ids.items() if i == index), "")

    def convert_tokens_to_string(self, tokens):
        data, text = b"", ""
        for token in tokens:
            if isinstance(token, str) and token in self.special_ids:
                text += data.decode("utf-8", errors="replace") + token
                data = b""
            else:
                data += token.encode("utf-8") if isinstance(token, str) else token
        return text + data.decode("utf-8", errors="replace")

    def _tokenize(self, text, **kwargs):
        return [self.decoder[i] for i in self.tokenizer.encode(text, allowed_special=set(), disallowed_special=())]

    def _convert_token_to_id(self, token):
        if isinstance(token, str) and token in self.special_ids:
            return self.special_ids[token]
        return self.mergeable_ranks[token.encode("utf-8") if isinstance(token, str) else token]

    def _convert_id_to_token(self, index):
        return self.convert_id_to_token(index)

    def get_prefix_tokens(self):
        return [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = self.get_prefix_tokens() + token_ids_0
        return ids + token_ids_1 + [self.special_ids["<eop>"]] if token_ids_1 is not None else ids

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        with open(path, "wb") as handle:
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1]):
                handle.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
        return (path,)
