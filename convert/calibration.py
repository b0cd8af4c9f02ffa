"""Calibration conversations for data-aware compression (AWQ, scale estimation, GPTQ) and checks.

The built-in set ``glm4-chat`` holds short English and Chinese chats in GLM-4's format, with a
system prompt, several turns and a tool call with its observation; ``--dataset FILE.jsonl``
reads one ``{"messages": [...], "tools": [...]}`` object per line instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chat_format import ChatTemplate, call_message

BUILTIN = "glm4-chat"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}

_QUESTIONS = [
    ("Explain in two sentences why the sky is blue.", "Sunlight scatters off air molecules, and blue light scatters most."),
    ("Write a haiku about autumn rain.", "Cold rain on the roof,\nleaves drift in the gutter's stream,\nthe lamp burns all night."),
    ("What is the difference between a list and a tuple in Python?", "A list is mutable; a tuple is immutable."),
    ("Give me three tips for a job interview.", "Research the company, prepare examples, and ask questions."),
    ("How many minutes are there in a day?", "There are 1,440 minutes in a day."),
    ("Translate 'good morning' into French and German.", "Bonjour, and Guten Morgen."),
    ("请用一句话介绍长城。", "长城是中国古代修建的军事防御工程，绵延万里。"),
    ("如何提高睡眠质量？", "保持规律作息，睡前少看手机，卧室保持安静和黑暗。"),
    ("解释一下什么是机器学习。", "机器学习是让计算机从数据中学习规律并做出预测的方法。"),
    ("写一首关于春天的四行诗。", "春风拂面柳丝长，\n桃花含笑映山岗。\n燕子归来寻旧垒，\n田间处处稻秧香。"),
    ("北京和上海哪个城市人口更多？", "上海的常住人口略多于北京。"),
    ("Summarise the plot of Romeo and Juliet.", "Two young lovers from feuding families marry in secret and die tragically."),
]


def builtin_conversations() -> list[dict[str, Any]]:
    """The built-in calibration set: plain, system, multi-turn and tool conversations, both languages."""
    conversations: list[dict[str, Any]] = []
    for index, (question, answer) in enumerate(_QUESTIONS):
        messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
        if index % 3 == 1:
            messages.insert(0, {"role": "system", "content": "You are a concise assistant. 请简洁地回答。"})
        conversations.append({"messages": messages + [{"role": "assistant", "content": answer}]})
        if index % 2 == 0:
            follow = "Can you say more?" if question.isascii() else "能再详细一点吗？"
            conversations.append({"messages": messages + [{"role": "assistant", "content": answer},
                                                          {"role": "user", "content": follow}]})
    for city, result in (("Paris", '{"temperature": 18, "condition": "cloudy"}'),
                         ("杭州", '{"temperature": 26, "condition": "小雨"}')):
        question = f"What's the weather in {city}?" if city.isascii() else f"{city}今天天气怎么样？"
        conversations.append({"tools": [WEATHER], "messages": [
            {"role": "user", "content": question},
            call_message("get_weather", json.dumps({"city": city}, ensure_ascii=False)),
            {"role": "observation", "content": result}]})
    return conversations


def load_conversations(dataset: str) -> list[dict[str, Any]]:
    """The conversations of ``dataset``: the built-in name or a JSONL file path."""
    if dataset == BUILTIN:
        return builtin_conversations()
    path = Path(dataset)
    if not path.is_file():
        raise ValueError(f"--dataset must be {BUILTIN!r} or a JSONL file of conversations; {dataset} not found")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(item, dict) or not isinstance(item.get("messages"), list) or not item["messages"]:
            raise ValueError(f"{path}:{number} needs a non-empty \"messages\" list")
        conversations.append(item)
    if not conversations:
        raise ValueError(f"{path} holds no conversations")
    return conversations


def calibration_texts(tokenizer: Any, conversations: list[dict[str, Any]]) -> list[str]:
    """Render conversations to prompt text with the source model's own chat template (tools where it
    reads them; without tools when it declares none)."""
    template = ChatTemplate.from_tokenizer(tokenizer)
    return [template.render(c["messages"], c.get("tools") if template.tools_placement else None,
                            add_generation_prompt=c["messages"][-1]["role"] != "assistant")
            for c in conversations]
