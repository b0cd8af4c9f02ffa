"""A checkpoint's chat template rewritten for openvino-genai's template engine (and OpenVINO Model Server).

GenAI's engine renders most GLM-4 templates as transformers does, with two gaps seen here
(openvino-genai 2026.4): its ``tojson`` refuses ``ensure_ascii=...`` and writes an empty object
or list under ``indent`` as ``{\\n   \\n}`` instead of ``{}``. Each ``{{ X | tojson(indent=N, ...) }}``
is therefore replaced by a macro that writes Python's ``json.dumps(X, indent=N, ensure_ascii=False)``.

Two adapters in front let GenAI's and OVMS's OpenAI-style input reach a GLM-4 template: top-level
``tools`` become the first system item's ``tools`` when the template reads them there, and (for
templates that do not read ``tool_calls`` themselves) role ``tool`` becomes ``observation`` and an
assistant's ``tool_calls`` become replayed calls (``metadata`` = name, ``content`` = arguments).
Input already in GLM-4's form passes through both unchanged.
"""

from __future__ import annotations

import re
from typing import Any

from chat_format.template import ON_MESSAGE
from chat_format.tokens import SPECIAL_TOKENS

TOJSON_CALL = re.compile(r"\{\{(-?)\s*([^{}|]+?)\s*\|\s*tojson\s*\(([^()]*)\)\s*(-?)\}\}")
INDENT = re.compile(r"^\s*indent\s*=\s*(\d+)\s*$")
ENSURE_ASCII_FALSE = re.compile(r"^\s*ensure_ascii\s*=\s*False\s*$")

JSON_MACRO = """{%- macro glm4_intel_json(value, depth, width) -%}
{%- if value is mapping -%}
{%- if value | length == 0 -%}{{- '{}' -}}{%- else -%}
{{- '{' -}}
{%- for key, item in value.items() -%}
{{- '\\n' + ' ' * (width * (depth + 1)) + (key | tojson) + ': ' -}}{{- glm4_intel_json(item, depth + 1, width) -}}
{%- if not loop.last -%}{{- ',' -}}{%- endif -%}
{%- endfor -%}
{{- '\\n' + ' ' * (width * depth) + '}' -}}
{%- endif -%}
{%- elif value is string -%}{{- value | tojson -}}
{%- elif value is iterable -%}
{%- if value | length == 0 -%}{{- '[]' -}}{%- else -%}
{{- '[' -}}
{%- for item in value -%}
{{- '\\n' + ' ' * (width * (depth + 1)) -}}{{- glm4_intel_json(item, depth + 1, width) -}}
{%- if not loop.last -%}{{- ',' -}}{%- endif -%}
{%- endfor -%}
{{- '\\n' + ' ' * (width * depth) + ']' -}}
{%- endif -%}
{%- else -%}{{- value | tojson -}}
{%- endif -%}
{%- endmacro -%}
"""

OPENAI_MESSAGES = """{%- set glm4_intel = namespace(items=[]) -%}
{%- for message in messages -%}
{%- if message.role == 'tool' -%}
{%- set glm4_intel.items = glm4_intel.items + [{'role': 'observation', 'content': message.content}] -%}
{%- elif message.role == 'assistant' and message.tool_calls is defined and message.tool_calls -%}
{%- if message.content -%}
{%- set glm4_intel.items = glm4_intel.items + [{'role': 'assistant', 'content': message.content}] -%}
{%- endif -%}
{%- for call in message.tool_calls -%}
{%- set arguments = call.function.arguments -%}
{%- set arguments = arguments if arguments is string else arguments | tojson -%}
{%- set glm4_intel.items = glm4_intel.items + [{'role': 'assistant', 'metadata': call.function.name,
                                                 'content': arguments}] -%}
{%- endfor -%}
{%- else -%}
{%- set glm4_intel.items = glm4_intel.items + [message] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = glm4_intel.items -%}
"""

TOOLS_ON_MESSAGE = """{%- if tools -%}
{%- set messages = [{'role': 'system', 'content': '', 'tools': tools}] + messages -%}
{%- endif -%}
"""


def _json_call(match: re.Match) -> str:
    left, expression, arguments, right = match.groups()
    indent, rest = None, []
    for argument in filter(str.strip, arguments.split(",")):
        if (found := INDENT.match(argument)) is not None:
            indent = int(found.group(1))
        elif not ENSURE_ASCII_FALSE.match(argument):
            rest.append(argument)
    if rest:  # arguments the macro does not imitate (sort_keys, separators...): left to the check
        return match.group(0)
    if indent is None:
        return f"{{{{{left} {expression} | tojson {right}}}}}"
    return f"{{{{{left} glm4_intel_json({expression}, 0, {indent}) {right}}}}}"


def genai_template(source: str, tools_placement: str | None) -> str:
    """``source`` rewritten so that openvino-genai renders it as transformers renders ``source``."""
    body = TOJSON_CALL.sub(_json_call, source)
    head = JSON_MACRO if "glm4_intel_json(" in body else ""
    if "tool_calls" not in source:
        head = OPENAI_MESSAGES + head
    if tools_placement == ON_MESSAGE:
        head += TOOLS_ON_MESSAGE
    return head + body


class GenAIEncoder:
    """Prompt ids with an ``openvino_genai.Tokenizer``: ordinary text without special tokens, control tokens by id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special: dict[str, int] = {}
        # Keys are bytes in some releases, str in others; openvino-tokenizers writes a tiktoken tokenizer's
        # <sop> as " <sop> " (the original glm-4-9b-chat's detokenizer spacing), so spaces are ignored.
        for key, index in tokenizer.get_vocab().items():
            spelled = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
            token = spelled.strip()
            if token in SPECIAL_TOKENS and (spelled == token or token not in self.special):
                self.special[token] = int(index)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]]

    def token_id(self, token: str) -> int:
        """Id of a special token; KeyError when the tokenizer lacks it (not a GLM-4 model)."""
        return self.special[token]
