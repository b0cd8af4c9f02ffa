"""The chat template this project writes for GLM-4 checkpoints that carry none (and for glm4-tiny).

It renders GLM-4's format: ``[gMASK]<sop>``, then each message as ``<|role|>`` + metadata +
``\\n`` + content (empty content renders nothing), and ``<|assistant|>`` as the generation prompt.
Tools, given top-level or on a message, become a system block: the GLM-4 preamble, ``# 可用工具``,
and each function as ``\\n\\n## name\\n\\n`` + its JSON (indent 4) + the argument hint. (The published
checkpoints put one newline before ``## name``; each model follows its own template.)
"""

from __future__ import annotations

import json

TOOLS_PREAMBLE = ("你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                  "你的任务是针对用户的问题和要求提供适当的答复和支持。")
TOOLS_HEADER = "\n\n# 可用工具"
TOOL_ARGS_HINT = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def _tools_block(variable: str) -> str:
    return ("{{- '<|system|>\\n' + " + json.dumps(TOOLS_PREAMBLE, ensure_ascii=False)
            + " + " + json.dumps(TOOLS_HEADER, ensure_ascii=False) + " -}}"
            "{%- for tool in " + variable + " -%}"
            "{%- if tool.function is defined -%}{%- set function = tool.function -%}"
            "{%- else -%}{%- set function = tool -%}{%- endif -%}"
            "{{- '\\n\\n## ' + function.name + '\\n\\n' -}}"
            "{{- function | tojson(indent=4) -}}"
            "{{- '\\n' + " + json.dumps(TOOL_ARGS_HINT, ensure_ascii=False) + " -}}"
            "{%- endfor -%}")


BUILTIN_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- if tools -%}" + _tools_block("tools") + "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.tools is defined and message.tools -%}" + _tools_block("message.tools") + "{%- endif -%}"
    "{%- if message.content -%}"
    "{{- '<|' + message.role + '|>' -}}"
    "{%- if message.metadata is defined and message.metadata -%}{{- message.metadata -}}{%- endif -%}"
    "{{- '\\n' + message.content -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
