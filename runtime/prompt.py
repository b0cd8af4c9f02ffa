"""Print the exact prompt the runtime sends for a conversation: text, or token ids.

    python -m runtime.prompt --model build/glm4-tiny-int4 --messages conversation.json [--tools tools.json] [--ids]

The conversation is what the OpenAI-compatible server accepts: a JSON object with ``messages``
(roles system, developer, user, assistant with ``tool_calls``, tool) and optional ``tools``, or a
bare list of messages. ``--model`` is a converted folder, or a Hugging Face checkpoint folder (the
``--backend ipex`` path, tokenized with transformers). The prompt is rendered from the model's own
chat template; text that spells a control token is printed as it is but encoded as ordinary tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from chat_format import ChatTemplate, Message, TemplateError, encode_prompt
from runtime.engine import EngineError, ModelLoadError
from runtime.openai_api import ApiError, parse_messages, parse_tools
from runtime.textio import use_utf8_output


def read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {what} from {path}: {' '.join(str(error).split())}") from None


def read_conversation(messages_path: str, tools_path: str | None) -> tuple[list[Message], list[dict] | None]:
    """GLM-4 messages and tools from OpenAI-style JSON files (one-line ValueError when malformed)."""
    body = read_json(messages_path, "messages")
    if isinstance(body, list):
        body = {"messages": body}
    if not isinstance(body, dict):
        raise ValueError(f"{messages_path} must hold a list of messages or an object with \"messages\"")
    if tools_path:
        body["tools"] = read_json(tools_path, "tools")
    try:
        return parse_messages(body.get("messages")), parse_tools(body.get("tools")) or None
    except ApiError as error:
        raise ValueError(f"{messages_path}: {error.message}") from None


def tokenizer_functions(folder: Path, trust_remote_code: bool
                        ) -> tuple[Callable[[str], list[int]], Callable[[str], int]]:
    """``encode(text)`` and ``token_id(special)`` of a converted folder (openvino-genai) or a checkpoint
    (transformers)."""
    if (folder / "openvino_tokenizer.xml").is_file():
        import openvino_genai

        from chat_format.genai import GenAIEncoder
        from runtime.openvino_engine import special_token_id

        encoder = GenAIEncoder(openvino_genai.Tokenizer(str(folder)))
        return encoder.encode, lambda token: special_token_id(encoder, token)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is neither a converted model nor a Hugging Face checkpoint folder")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelLoadError(f"{folder} is a checkpoint folder: reading its tokenizer needs transformers "
                             "(the main or the Xeon environment)") from None
    hf = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)

    def token_id(token: str) -> int:
        found = hf.convert_tokens_to_ids(token)
        if not isinstance(found, int) or found == hf.unk_token_id:
            raise ModelLoadError(f"the tokenizer has no {token} token: not a GLM-4 model")
        return found

    return (lambda text: hf.encode(text, add_special_tokens=False)), token_id


def prompt(model: str | Path, messages: list[Message], tools: list[dict] | None = None,
           trust_remote_code: bool = False) -> tuple[str, list[int]]:
    """The prompt text and token ids the runtime sends for ``messages`` to ``model``."""
    folder = Path(model)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    template = ChatTemplate.from_folder(folder)
    parts = template.parts(messages, tools)
    encode, token_id = tokenizer_functions(folder, trust_remote_code)
    return "".join(text for text, _ in parts), encode_prompt(parts, encode, token_id)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.prompt",
                                     description="Print the exact prompt (text or token ids) the runtime sends for an "
                                                 "OpenAI-style conversation, rendered from the model's own template.")
    parser.add_argument("--model", required=True,
                        help="folder written by python -m convert, or a Hugging Face checkpoint folder")
    parser.add_argument("--messages", required=True,
                        help="JSON file: {\"messages\": [...], \"tools\": [...]} as the server takes, or a list")
    parser.add_argument("--tools",
                        help="JSON file with a list of OpenAI-style tools (instead of the one in --messages)")
    parser.add_argument("--ids", action="store_true", help="print the token ids (a JSON list) instead of the text")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="a checkpoint whose tokenizer is its own Python code (the original glm-4-9b-chat)")
    return parser


def main(argv: list[str] | None = None) -> int:
    use_utf8_output()
    args = setup_arg_parser().parse_args(argv)
    try:
        messages, tools = read_conversation(args.messages, args.tools)
        text, ids = prompt(args.model, messages, tools, args.trust_remote_code)
    except (EngineError, TemplateError, ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    if args.ids:
        print(json.dumps(ids))
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
