"""Benchmark prompts: reading prompt files, the built-in set, and turning a prompt into token ids.

Two file formats, one JSON object per line (blank lines are skipped):

* MT-bench / Spec-Bench: ``{"question_id": 81, "category": "writing", "turns": ["...", ...]}``.
  Only the first turn is used. It is rendered with the model's chat template when the model has
  one, else as a completion prompt ``Question: ...\\nAnswer:`` (base models ship no template);
* plain JSONL (e.g. HumanEval): ``{"prompt": "...", "id": ..., "category": ...}`` (id and
  category optional; ``task_id`` is not read). A
  ``prompt`` is used verbatim: no template, no ``Question:`` wrapper.

The built-in set (``BUILTIN_PROMPTS``, written for this project) is the default, so the benchmark
runs with no files. It covers the task kinds of Spec-Bench on a small scale: some prompts carry a
context that the answer should reuse (summarization, extraction), which favours prompt lookup.
This module knows nothing about models or timing.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mtpspec.tokenizer import user_prompt_ids

DEFAULT_CATEGORY = "general"


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class BenchPrompt:
    id: int | str     # the file's ``id`` or ``question_id`` (else the 1-based line number)
    category: str
    text: str         # the first turn, or the verbatim prompt
    verbatim: bool    # True for a ``prompt`` field: encoded as is


def parse_prompt(record: object, where: str, fallback_id: int | str) -> BenchPrompt:
    """One prompt from a decoded JSON line; ``where`` (``file:line``) prefixes every error."""
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt_id = record.get("id", record.get("question_id", fallback_id))
    if not isinstance(prompt_id, (int, str)) or isinstance(prompt_id, bool):
        raise PromptFileError(f"{where}: 'id' must be a string or an integer")
    category = record.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category:
        raise PromptFileError(f"{where}: 'category' must be a non-empty string")
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text:
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
        return BenchPrompt(prompt_id, category, text, verbatim=True)
    turns = record.get("turns")
    if turns is None:
        raise PromptFileError(f"{where}: needs a 'prompt' string or a 'turns' list")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0]:
        raise PromptFileError(f"{where}: 'turns' must be a list whose first item is a non-empty string")
    return BenchPrompt(prompt_id, category, turns[0], verbatim=False)


def parse_prompt_lines(lines: Iterable[str], name: str) -> list[BenchPrompt]:
    """Prompts from JSONL text; ``name`` is used in error messages."""
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{where}: not valid JSON ({err.msg})") from err
        prompts.append(parse_prompt(record, where, fallback_id=number))
    if not prompts:
        raise PromptFileError(f"{name}: no prompts in the file")
    return prompts


def load_prompts(path: str | Path) -> list[BenchPrompt]:
    """Prompts of a JSONL file, or a gzipped one (``.gz``; see the module docstring for formats)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    except FileNotFoundError as err:
        raise PromptFileError(f"prompt file not found: {path}") from err
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise PromptFileError(f"{path}: cannot read prompt file ({err})") from err
    return parse_prompt_lines(text.splitlines(), str(path))


def select_prompts(prompts: list[BenchPrompt], categories: Iterable[str] | None = None,
                   limit: int | None = None) -> list[BenchPrompt]:
    """Keep the given categories (all when None), then the first ``limit`` prompts."""
    if categories is not None:
        wanted = list(dict.fromkeys(categories))
        known = list(dict.fromkeys(p.category for p in prompts))
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise PromptFileError(
                f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                f"the prompts have: {', '.join(known)}"
            )
        prompts = [p for p in prompts if p.category in wanted]
    if limit is not None:
        if limit < 1:
            raise PromptFileError(f"--limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    return prompts


def prompt_token_ids(prompt: BenchPrompt, tokenizer) -> list[int]:
    """Token ids of one prompt: verbatim, chat-templated, or ``Question: ...\\nAnswer:``."""
    if prompt.verbatim:
        return tokenizer.encode(prompt.text)
    return user_prompt_ids(tokenizer, prompt.text)


def _builtin(question_id: int, category: str, question: str) -> BenchPrompt:
    return BenchPrompt(question_id, category, question, verbatim=False)


BUILTIN_PROMPTS: tuple[BenchPrompt, ...] = (
    _builtin(1, "writing", "Write a short story about a lighthouse keeper who finds a message in a "
             "bottle. Keep it under two hundred words."),
    _builtin(2, "writing", "Write a friendly email to a neighbour asking them to water your plants "
             "while you are away for a week."),
    _builtin(3, "qa", "Why is the sky blue during the day and red at sunset?"),
    _builtin(4, "qa", "What is the difference between a virus and a bacterium?"),
    _builtin(5, "summarization", "Summarize the following text in two sentences.\n\nThe town council "
             "met on Tuesday to discuss the new bicycle lanes on Main Street. Supporters said the "
             "lanes had made cycling safer and brought more customers to local shops. Opponents said "
             "the lanes had removed forty parking spaces and made deliveries harder for shop owners. "
             "After two hours of debate, the council voted to keep the bicycle lanes and to add a "
             "loading zone for deliveries at the end of Main Street."),
    _builtin(6, "summarization", "Summarize the following text in one paragraph.\n\nHoney bees live "
             "in colonies of up to sixty thousand bees. Each colony has one queen, who lays all of the "
             "eggs. Worker bees are female; they clean the hive, feed the young, build wax comb and "
             "collect nectar and pollen. Drones are male bees whose only task is to mate with a queen "
             "from another colony. In winter, the worker bees cluster around the queen and shiver "
             "their muscles to keep the hive warm."),
    _builtin(7, "math", "A shop sells pencils at 3 dollars for a pack of 4. How much do 20 pencils "
             "cost? Explain each step."),
    _builtin(8, "math", "Tom is twice as old as his sister Anna. In five years, the sum of their ages "
             "will be 40. How old is Anna now? Show your reasoning."),
    _builtin(9, "coding", "Write a Python function that returns the n-th Fibonacci number, then "
             "explain how it works."),
    _builtin(10, "coding", "Here is a Python function:\n\ndef mean(values):\n    total = 0\n    for "
             "value in values:\n        total += value\n    return total / len(values)\n\nRewrite it "
             "so that it returns None for an empty list, and add a docstring."),
    _builtin(11, "extraction", "From the order below, list every product with its quantity and "
             "price.\n\nOrder 1042: 3 notebooks at 2.50 dollars each, 1 stapler at 7.00 dollars, "
             "12 pens at 0.80 dollars each, 2 packs of paper at 4.25 dollars each. Shipping to "
             "14 Elm Road, Springfield."),
    _builtin(12, "extraction", "Read the passage and answer: which planets does the passage call "
             "gas giants?\n\nThe solar system has eight planets. Mercury, Venus, Earth and Mars are "
             "rocky planets. Jupiter and Saturn are gas giants, made mostly of hydrogen and helium. "
             "Uranus and Neptune are ice giants, which contain more water, ammonia and methane."),
)
