"""Compare a converted folder with its source: eval exact match, top-1 agreement and KL divergence.

Exact match needs an eval.jsonl (the bundled glm4-tiny has one); agreement and KL work for any
model: both score the same conversations token by token (teacher forcing), the source in FP32
with transformers, the converted IR with optimum-intel on CPU. Both models are loaded one after
the other, so peak memory is that of the larger one (FP32 GLM-4-9B needs ~38 GB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat_format import STOP_TOKENS, ChatTemplate, call_message, parse_reply
from convert.calibration import builtin_conversations, calibration_texts
from convert.verify import genai_replies


def load_eval(path: str | Path) -> list[dict[str, Any]]:
    """Read an eval.jsonl file: one ``{"messages", "tools"?, "expected"}`` object per line."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def strip_answer(reply: str) -> str:
    """A plain GLM-4 answer begins with a newline that is not part of the answer."""
    return parse_reply(reply).text


def transformers_replies(model: Any, tokenizer: Any, items: list[dict[str, Any]],
                         max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy replies (special tokens removed, leading newline kept) with transformers, batched."""
    import torch

    tokenizer.padding_side = "left"
    stops = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    replies: list[str] = []
    template = ChatTemplate.from_tokenizer(tokenizer)
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [template.render(i["messages"], i.get("tools")) for i in chunk]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                              return_token_type_ids=False)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            replies += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, batch["input_ids"].shape[1]:]]
    return replies


def exact_match(items: list[dict[str, Any]], replies: list[str]) -> float:
    return sum(strip_answer(r) == i["expected"] for i, r in zip(items, replies)) / max(len(items), 1)


def source_logits(model: Any, ids: list[list[int]]) -> list[Any]:
    """Next-token log-probabilities of the (transformers) source model for each token sequence."""
    import torch

    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0].float(), -1) for row in ids]


def converted_logits(folder: Path, ids: list[list[int]], ov_config: dict[str, str] | None = None) -> list[Any]:
    """Next-token log-probabilities of the converted IR (optimum-intel, CPU, ``ov_config`` on top) for each
    token sequence."""
    import torch
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(folder, device="CPU", ov_config={"CACHE_DIR": "", **(ov_config or {})})
    out = []
    for row in ids:
        batch = torch.tensor([row])
        out.append(torch.log_softmax(model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[0].float(), -1))
    return out


def perplexity(logits: list[Any], ids: list[list[int]]) -> float:
    """exp of the mean negative log-likelihood of every next token."""
    import math

    import torch

    nll = [-float(lp[:-1].gather(1, torch.tensor(row[1:])[:, None]).sum()) for lp, row in zip(logits, ids)]
    return math.exp(sum(nll) / max(sum(len(row) - 1 for row in ids), 1))


def agreement(reference: list[Any], candidate: list[Any]) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || candidate) in nats) over all positions."""

    same = total = 0
    kl = 0.0
    for ref, cand in zip(reference, candidate):
        vocab = min(ref.shape[-1], cand.shape[-1])
        ref, cand = ref[:, :vocab], cand[:, :vocab]
        same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        kl += float((ref.exp() * (ref - cand)).sum())
        total += ref.shape[0]
    return same / max(total, 1), kl / max(total, 1)


@dataclass
class Reference:
    """What the FP32 source gives once, for comparing any number of converted folders with it."""

    ids: list[list[int]]
    logits: list[Any]
    items: list[dict[str, Any]]
    exact_match: float | None
    agreement_set: str
    perplexity: float


def text_windows(tokenizer: Any, path: str | Path, window: int = 256, count: int = 32) -> list[list[int]]:
    """Up to ``count`` consecutive windows of ``window`` tokens of a plain-text file (UTF-8)."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    return [ids[start:start + window] for start in range(0, len(ids) - window + 1, window)][:count]


def reference(source: str, trust_remote_code: bool = False, text: str | Path | None = None) -> Reference:
    """Score the source: log-probabilities on the agreement set and, with an eval.jsonl, exact match.

    The agreement set is ``text`` (windows of a plain-text file) when given, else the source's eval
    conversations with their expected replies when it has an eval.jsonl (the model's own domain), else the
    built-in GLM-4 chat set.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    eval_file = Path(source) / "eval.jsonl"
    items = load_eval(eval_file) if eval_file.is_file() else []
    if ChatTemplate.from_tokenizer(tokenizer).tools_placement is None:  # the model cannot be given tools
        items = [item for item in items if not item.get("tools")]
    if text is not None:
        ids, agreement_set = text_windows(tokenizer, text), f"text {Path(text).name}"
        if not ids:
            raise ValueError(f"{text} holds fewer than 256 tokens")
    else:
        conversations = [{"tools": i.get("tools"), "messages": i["messages"] + [reply_message(i["expected"])]}
                         for i in items] or builtin_conversations()
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in calibration_texts(tokenizer, conversations)]
        agreement_set = "eval.jsonl" if items else "built-in glm4-chat"
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code).eval()
    logits = source_logits(model, ids)
    exact = exact_match(items, transformers_replies(model, tokenizer, items)) if items else None
    return Reference(ids, logits, items, exact, agreement_set, perplexity(logits, ids))


def compare(source: str, folder: Path, trust_remote_code: bool = False, ref: Reference | None = None,
            ov_config: dict[str, str] | None = None) -> dict[str, Any]:
    """Score the converted ``folder`` against ``source`` (or its precomputed ``ref``)."""
    ref = ref or reference(source, trust_remote_code)
    result: dict[str, Any] = {"agreement_set": ref.agreement_set, "source_perplexity": ref.perplexity}
    logits = converted_logits(folder, ref.ids, ov_config)
    result["top1_agreement"], result["mean_kl"] = agreement(ref.logits, logits)
    result["perplexity"] = perplexity(logits, ref.ids)
    if ref.items:
        import openvino_genai

        pipeline = openvino_genai.LLMPipeline(str(folder), "CPU", **(ov_config or {}))
        result["source_exact_match"] = ref.exact_match
        result["converted_exact_match"] = exact_match(ref.items, genai_replies(pipeline, folder, ref.items))
        result["eval_items"] = len(ref.items)
    return result


def reply_message(expected: str) -> dict[str, Any]:
    """The assistant message that replays an expected reply (a tool call or an answer)."""
    name, _, arguments = expected.partition("\n")
    if arguments.startswith("{") and name.isidentifier():
        return call_message(name, arguments)
    return {"role": "assistant", "content": expected}


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a small text table."""
    rows = [("metric", "source (FP32)", "converted")]
    if "eval_items" in result:
        rows.append((f"eval exact match ({result['eval_items']} items)", f"{result['source_exact_match']:.1%}",
                     f"{result['converted_exact_match']:.1%}"))
    rows.append((f"top-1 token agreement ({result['agreement_set']})", "reference", f"{result['top1_agreement']:.2%}"))
    rows.append(("mean KL divergence (nats)", "0", f"{result['mean_kl']:.5f}"))
    rows.append(("perplexity", f"{result['source_perplexity']:.3f}", f"{result['perplexity']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
