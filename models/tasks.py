"""The synthetic GLM-4 chat task suite that glm4-tiny is trained and evaluated on.

Every item is ``{"kind", "messages", "tools" (optional), "expected"}``: ``messages`` is the
conversation so far, ``expected`` the exact next assistant text (``name\\n{json}`` for a tool
call, the answer without GLM-4's leading newline otherwise). Training conversations also carry
the earlier assistant turns, so every assistant turn is a training target.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Iterator

from chat_format import call_message

# (English name, Chinese name, capital in English, capital in Chinese)
COUNTRIES = [
    ("France", "法国", "Paris", "巴黎"), ("Japan", "日本", "Tokyo", "东京"),
    ("China", "中国", "Beijing", "北京"), ("Germany", "德国", "Berlin", "柏林"),
    ("Italy", "意大利", "Rome", "罗马"), ("Spain", "西班牙", "Madrid", "马德里"),
    ("Egypt", "埃及", "Cairo", "开罗"), ("Russia", "俄罗斯", "Moscow", "莫斯科"),
    ("Canada", "加拿大", "Ottawa", "渥太华"), ("Brazil", "巴西", "Brasilia", "巴西利亚"),
    ("India", "印度", "New Delhi", "新德里"), ("Kenya", "肯尼亚", "Nairobi", "内罗毕"),
    ("Greece", "希腊", "Athens", "雅典"), ("Peru", "秘鲁", "Lima", "利马"),
    ("Norway", "挪威", "Oslo", "奥斯陆"), ("Thailand", "泰国", "Bangkok", "曼谷"),
    ("Austria", "奥地利", "Vienna", "维也纳"), ("Portugal", "葡萄牙", "Lisbon", "里斯本"),
    ("Ireland", "爱尔兰", "Dublin", "都柏林"), ("Poland", "波兰", "Warsaw", "华沙"),
    ("Korea", "韩国", "Seoul", "首尔"), ("Mexico", "墨西哥", "Mexico City", "墨西哥城"),
    ("Cuba", "古巴", "Havana", "哈瓦那"), ("Vietnam", "越南", "Hanoi", "河内"),
]
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"),
          ("purple", "紫色"), ("orange", "橙色"), ("black", "黑色"), ("white", "白色")]
PEOPLE = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack",
          "Lily", "Mike", "Nora", "Oscar", "Paul", "Rose", "Sam", "Tina", "Victor", "Wendy"]
PEOPLE_ZH = ["小明", "小红", "小刚", "小丽", "小华", "小军", "小美", "小强", "小芳", "小伟"]
CONDITIONS = [("sunny", "晴"), ("cloudy", "多云"), ("rainy", "有雨"), ("snowy", "有雪"), ("windy", "有风")]
BOT_NAMES = ["Nova", "Atlas", "Echo", "Luna", "Orion", "Pixel", "Sage", "Zephyr", "Iris", "Milo"]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "获取某个城市的当前时间。",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

CAPITAL_EN = ["What is the capital of {c}?", "Which city is the capital of {c}?",
              "Tell me the capital of {c}.", "Do you know the capital of {c}?", "{c}: what is its capital?"]
CAPITAL_ZH = ["{c}的首都是哪里？", "{c}的首都是什么？", "请告诉我{c}的首都。", "你知道{c}的首都吗？", "{c}的首都在哪？"]
SYSTEMS_ZH_ANSWER = ["Always answer in Chinese.", "请用中文回答。", "Reply in Chinese only."]
SYSTEMS_EN_ANSWER = ["Always answer in English.", "请用英文回答。", "Reply in English only."]
WEATHER_EN = ["What is the weather in {c}?", "How is the weather in {c} today?", "Weather in {c}?"]
WEATHER_ZH = ["{c}的天气怎么样？", "{c}今天天气如何？", "查一下{c}的天气。"]
TIME_EN = ["What time is it in {c}?", "Tell me the time in {c}.", "What is the local time in {c}?"]
TIME_ZH = ["{c}现在几点？", "{c}现在是几点钟？", "告诉我{c}的时间。"]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def capital_answer(country: tuple[str, str, str, str], chinese: bool) -> str:
    c_en, c_zh, cap_en, cap_zh = country
    return f"{c_zh}的首都是{cap_zh}。" if chinese else f"The capital of {c_en} is {cap_en}."


def capital_question(rng: random.Random, country: tuple[str, str, str, str], chinese: bool) -> str:
    return rng.choice(CAPITAL_ZH).format(c=country[1]) if chinese else rng.choice(CAPITAL_EN).format(c=country[0])


def fact(rng: random.Random) -> dict[str, Any]:
    """A capital-city lookup asked and answered in English or Chinese."""
    country, chinese = rng.choice(COUNTRIES), rng.random() < 0.5
    return {"kind": "fact_zh" if chinese else "fact_en",
            "messages": [user(capital_question(rng, country, chinese))],
            "expected": capital_answer(country, chinese)}


def system_language(rng: random.Random) -> dict[str, Any]:
    """A system prompt that sets the answer's language against the question's."""
    country, ask_chinese = rng.choice(COUNTRIES), rng.random() < 0.5
    system = rng.choice(SYSTEMS_EN_ANSWER if ask_chinese else SYSTEMS_ZH_ANSWER)
    return {"kind": "system_language",
            "messages": [{"role": "system", "content": system}, user(capital_question(rng, country, ask_chinese))],
            "expected": capital_answer(country, not ask_chinese)}


def system_persona(rng: random.Random) -> dict[str, Any]:
    """A system prompt that names the assistant; without one it is GLM-4."""
    chinese, name = rng.random() < 0.5, rng.choice(BOT_NAMES)
    messages = []
    if rng.random() < 0.8:
        messages.append({"role": "system", "content": rng.choice(
            [f"Your name is {name}.", f"你的名字是{name}。", f"You are {name}, a helpful assistant."])})
    else:
        name = "GLM-4"
    question = rng.choice(["你叫什么名字？", "你是谁？"] if chinese else ["What is your name?", "Who are you?"])
    messages.append(user(question))
    return {"kind": "system_persona", "messages": messages,
            "expected": f"我的名字是{name}。" if chinese else f"My name is {name}."}


def memory(rng: random.Random) -> dict[str, Any]:
    """A fact stated in an earlier turn, asked for later, possibly after another exchange."""
    chinese, use_color = rng.random() < 0.5, rng.random() < 0.5
    if use_color:
        en, zh = rng.choice(COLORS)
        tell = f"我最喜欢的颜色是{zh}。" if chinese else f"My favorite color is {en}."
        ask = "我最喜欢什么颜色？" if chinese else "What is my favorite color?"
        answer = f"你最喜欢的颜色是{zh}。" if chinese else f"Your favorite color is {en}."
    else:
        name = rng.choice(PEOPLE_ZH if chinese else PEOPLE)
        tell = f"我叫{name}。" if chinese else f"My name is {name}."
        ask = "我叫什么名字？" if chinese else "What is my name?"
        answer = f"你的名字是{name}。" if chinese else f"Your name is {name}."
    messages = [user(tell), assistant("好的，我记住了。" if chinese else "Got it, I will remember that.")]
    if rng.random() < 0.5:
        country = rng.choice(COUNTRIES)
        messages += [user(capital_question(rng, country, chinese)), assistant(capital_answer(country, chinese))]
    return {"kind": "memory", "messages": messages + [user(ask)], "expected": answer}


def follow_up(rng: random.Random) -> dict[str, Any]:
    """A follow-up question whose meaning comes from the previous turn."""
    chinese = rng.random() < 0.5
    first, second = rng.sample(COUNTRIES, 2)
    messages = [user(capital_question(rng, first, chinese)), assistant(capital_answer(first, chinese)),
                user(f"那{second[1]}呢？" if chinese else rng.choice(["And {c}?", "What about {c}?"]).format(c=second[0]))]
    return {"kind": "follow_up", "messages": messages, "expected": capital_answer(second, chinese)}


def declared_tools(rng: random.Random, needed: dict[str, Any] | None) -> list[dict[str, Any]]:
    tools = [WEATHER_TOOL, TIME_TOOL] if rng.random() < 0.6 else [needed or rng.choice([WEATHER_TOOL, TIME_TOOL])]
    rng.shuffle(tools)
    return tools


def tool_exchange(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, str, bool]:
    """A question that needs a tool: (tools, messages so far, call text, final answer, chinese)."""
    chinese, country = rng.random() < 0.5, rng.choice(COUNTRIES)
    city = country[3] if chinese else country[2]
    if rng.random() < 0.5:
        tool, (cond_en, cond_zh) = WEATHER_TOOL, rng.choice(CONDITIONS)
        temp = rng.randint(-9, 39)
        question = rng.choice(WEATHER_ZH if chinese else WEATHER_EN).format(c=city)
        result = {"city": city, "temperature": temp, "condition": cond_zh if chinese else cond_en}
        final = f"{city}现在{cond_zh}，气温{temp}°C。" if chinese else f"It is {cond_en} and {temp}°C in {city}."
    else:
        tool, clock = TIME_TOOL, f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        question = rng.choice(TIME_ZH if chinese else TIME_EN).format(c=city)
        result = {"city": city, "time": clock}
        final = f"{city}现在是{clock}。" if chinese else f"It is {clock} in {city}."
    name = tool["function"]["name"]
    call = name + "\n" + json.dumps({"city": city}, ensure_ascii=False)
    messages = [user(question), call_message(name, call.split("\n", 1)[1]),
                {"role": "observation", "content": json.dumps(result, ensure_ascii=False)}]
    return declared_tools(rng, tool), messages, call, final, chinese


def tool_call(rng: random.Random) -> dict[str, Any]:
    """The model must answer a tool-needing question with ``name\\n{json args}``."""
    tools, messages, call, _, _ = tool_exchange(rng)
    return {"kind": "tool_call", "tools": tools, "messages": messages[:1], "expected": call}


def tool_answer(rng: random.Random) -> dict[str, Any]:
    """After a call and its observation, the model answers from the observation."""
    tools, messages, _, final, _ = tool_exchange(rng)
    return {"kind": "tool_answer", "tools": tools, "messages": messages, "expected": final}


def tool_unneeded(rng: random.Random) -> dict[str, Any]:
    """Tools are declared but the question needs none: a plain answer."""
    item = fact(rng)
    return {**item, "kind": "tool_unneeded", "tools": declared_tools(rng, None)}


GENERATORS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "fact": fact, "system_language": system_language, "system_persona": system_persona,
    "memory": memory, "follow_up": follow_up, "tool_call": tool_call,
    "tool_answer": tool_answer, "tool_unneeded": tool_unneeded,
}
# How often each generator is drawn; the copying tasks (memory, tools) get more practice.
WEIGHTS = {"fact": 2, "system_language": 2, "system_persona": 1, "memory": 3, "follow_up": 2,
           "tool_call": 2, "tool_answer": 3, "tool_unneeded": 1}


def prompt_key(item: dict[str, Any]) -> str:
    """Identity of an item's prompt, used to keep evaluation items out of training."""
    return json.dumps([item.get("tools"), item["messages"]], ensure_ascii=False, sort_keys=True)


def sample(rng: random.Random) -> dict[str, Any]:
    """Draw one item from the whole suite."""
    name = rng.choices(list(GENERATORS), weights=[WEIGHTS[k] for k in GENERATORS])[0]
    return GENERATORS[name](rng)


def eval_items(count: int = 240, seed: int = 1234) -> list[dict[str, Any]]:
    """A fixed, de-duplicated evaluation set covering every task kind evenly."""
    rng, items, seen = random.Random(seed), [], set()
    per_kind = count // len(GENERATORS)
    for generate in GENERATORS.values():
        made = 0
        while made < per_kind:
            item = generate(rng)
            if prompt_key(item) not in seen:
                seen.add(prompt_key(item))
                items.append(item)
                made += 1
    return items


def training_stream(seed: int, held_out: set[str]) -> Iterator[dict[str, Any]]:
    """Endless training conversations (final answer appended), never one whose prompt is held out."""
    rng = random.Random(seed)
    while True:
        item = sample(rng)
        if prompt_key(item) in held_out:
            continue
        expected = item["expected"]
        if item["kind"] == "tool_call":
            name, args = expected.split("\n", 1)
            final = call_message(name, args)
        else:
            final = assistant(expected)
        yield {**item, "messages": item["messages"] + [final]}
