"""GLM-4's chat format, the one place that knows it: prompts (rendered from each checkpoint's own
chat template, with untrusted text kept out of control tokens), stop tokens, and replies (text or a
tool call). Pure Python plus Jinja: the converter, the models and the runtime all use it.
"""

from chat_format.builtin import BUILTIN_TEMPLATE
from chat_format.reply import (Message, Reply, ToolCall, call_message, function_of, parse_reply, tool_call_message,
                               tool_call_prefix)
from chat_format.stream import ReplyDecoder
from chat_format.template import ON_MESSAGE, TOP_LEVEL, ChatTemplate, TemplateError, openai_tool
from chat_format.tokens import SPECIAL_TOKENS, STOP_TOKENS, Part, encode_prompt, split_specials

__all__ = ["BUILTIN_TEMPLATE", "ChatTemplate", "Message", "ON_MESSAGE", "Part", "Reply", "ReplyDecoder",
           "SPECIAL_TOKENS", "STOP_TOKENS", "TOP_LEVEL", "TemplateError", "ToolCall", "call_message", "encode_prompt", "function_of",
           "openai_tool", "parse_reply", "split_specials", "tool_call_message", "tool_call_prefix"]
