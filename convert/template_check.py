"""Prove that every renderer of a converted model's prompts agrees with the checkpoint's own template.

For each conversation of :data:`chat_format.conversations.CONVERSATIONS`, the token ids that
transformers' ``apply_chat_template`` gives with the checkpoint's template are the reference; the
runtime's rendering (``chat_format``), and openvino-genai's rendering of the template stored in
the tokenizer IR (for the same template input, and for the conversation in OpenAI's form, as
OpenVINO Model Server receives it) must give the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat_format import ChatTemplate, encode_prompt
from chat_format.conversations import CONVERSATIONS, openai_form


class TemplateCheckError(Exception):
    """The converted model's prompts would differ from what its checkpoint's template renders."""


@dataclass
class TemplateReport:
    """What the check found: the conversations compared and, per renderer, the first difference."""

    tools_placement: str | None
    conversations: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"tools_placement": self.tools_placement, "conversations": len(self.conversations),
                "identical": len(self.conversations) - len({m.split(":")[0] for m in self.mismatches}),
                "skipped_without_tools": self.skipped, "mismatches": self.mismatches}


def first_difference(tokenizer: Any, name: str, renderer: str, got: list[int], expected: list[int]) -> str | None:
    """One line naming the first differing token of ``got`` against ``expected``, or None when equal."""
    if got == expected:
        return None
    at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))

    def token(ids: list[int]) -> str:
        return repr(tokenizer.convert_ids_to_tokens(ids[at])) if at < len(ids) else "(end)"

    return (f"{name}: {renderer} differs from transformers at token {at} of {len(expected)}: "
            f"{token(got)} instead of {token(expected)}")


def check_templates(tokenizer: Any, template: ChatTemplate, ir_folder: Path) -> TemplateReport:
    """Compare transformers, the runtime and openvino-genai (GLM and OpenAI input) on every conversation."""
    import openvino_genai

    genai = openvino_genai.Tokenizer(str(ir_folder))
    report = TemplateReport(template.tools_placement)

    def hf_encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def genai_ids(messages: list[dict[str, Any]], tools: list[dict] | None) -> list[int]:
        text = genai.apply_chat_template(openvino_genai.ChatHistory(messages), add_generation_prompt=True,
                                         tools=tools)
        return [int(i) for i in genai.encode(text, add_special_tokens=False).input_ids.data[0]]

    for name, messages, tools in CONVERSATIONS:
        if tools and template.tools_placement is None:
            report.skipped.append(name)
            continue
        report.conversations.append(name)
        items, top = template.template_input(messages, tools)
        expected = list(tokenizer.apply_chat_template(items, tools=top, tokenize=True, add_generation_prompt=True,
                                                      return_dict=False))
        ours = encode_prompt(template.parts(messages, tools), hf_encode, tokenizer.convert_tokens_to_ids)
        openai = openai_form(messages, tools)
        renderers = (("openvino-genai", items, top), ("openvino-genai (OpenAI form)", openai["messages"],
                                                      openai.get("tools")))
        problems = [first_difference(tokenizer, name, "the runtime", ours, expected)]
        for renderer, genai_messages, genai_tools in renderers:
            try:
                problems.append(first_difference(tokenizer, name, renderer, genai_ids(genai_messages, genai_tools),
                                                 expected))
            except Exception as error:  # an engine that cannot render the template at all
                problems.append(f"{name}: {renderer} cannot render it: {' '.join(str(error).split())[:200]}")
        report.mismatches += [problem for problem in problems if problem]
    return report
