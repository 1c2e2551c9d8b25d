"""Tests for mtpspec.bench: prompt files, the interleaved runner, exactness counting, and the
JSON / table / plot report. Tiny random models and a byte tokenizer; no real model."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from mtpspec.bench import report
from mtpspec.bench.methods import (
    METHODS,
    EngineMethod,
    HFMethod,
    Run,
    build_hf_model,
    build_methods,
    method_problem,
)
from mtpspec.bench.prompts import (
    BUILTIN_PROMPTS,
    BenchPrompt,
    PromptFileError,
    load_prompts,
    parse_prompt_lines,
    prompt_token_ids,
    select_prompts,
)
from mtpspec.bench.runner import BenchConfig, run_bench
from mtpspec.engine import Engine
from mtpspec.models.decoder import random_weights
from mtpspec.proposers.draft_model import DraftModelProposer
from mtpspec.proposers.factory import ProposerRequest
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.runtime import load_target
from mtpspec.sampling import SamplingParams

from conftest import tiny_model
from tiny_hf import ByteTokenizer, write_tiny_hf_model

MT_BENCH = [
    '{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}',
    "",
    '{"question_id": 82, "category": "math", "turns": ["What is 2+2?"]}',
]



# --- prompt files ---------------------------------------------------------------------------------

def test_mt_bench_format_uses_first_turn():
    prompts = parse_prompt_lines(MT_BENCH, "q.jsonl")
    assert prompts == [BenchPrompt(81, "writing", "Write a poem.", verbatim=False),
                       BenchPrompt(82, "math", "What is 2+2?", verbatim=False)]


def test_prompt_field_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a1", "prompt": "Once upon a time", "category": "story"}\n'
                    '{"prompt": "The end"}\n')
    first, second = load_prompts(path)
    assert first == BenchPrompt("a1", "story", "Once upon a time", verbatim=True)
    assert second.id == 2 and second.category == "general" and second.verbatim


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"category": "x"}', "needs a 'prompt' string or a 'turns' list"),
    ('{"turns": []}', "'turns' must be a list"),
    ('{"prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"prompt": "x", "category": 3}', "'category' must be"),
])
def test_malformed_line_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(MT_BENCH[0] + "\n\n" + line + "\n")
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    assert f"{path}:3" in str(err.value) and message in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(tmp_path / "empty.jsonl")


def test_select_categories_and_limit():
    prompts = list(BUILTIN_PROMPTS)
    math = select_prompts(prompts, ["math"])
    assert math and all(p.category == "math" for p in math)
    assert len(select_prompts(prompts, ["math", "qa"], limit=3)) == 3
    with pytest.raises(PromptFileError, match="unknown category poetry"):
        select_prompts(prompts, ["math", "poetry"])


def test_builtin_set_is_well_formed():
    assert len(BUILTIN_PROMPTS) >= 10
    assert len({p.id for p in BUILTIN_PROMPTS}) == len(BUILTIN_PROMPTS)
    assert len({p.category for p in BUILTIN_PROMPTS}) >= 5


def test_prompt_rendering():
    base, chat = ByteTokenizer(), ByteTokenizer(chat_template="yes")
    question = BenchPrompt(1, "qa", "Why?", verbatim=False)
    verbatim = BenchPrompt(2, "qa", "Why?", verbatim=True)
    assert prompt_token_ids(question, base) == base.encode("Question: Why?\nAnswer:")
    assert prompt_token_ids(question, chat) == chat.encode("<user>Why?<model>", add_bos=False)
    assert prompt_token_ids(verbatim, chat) == chat.encode("Why?")


# --- the runner and the report --------------------------------------------------------------------

PROMPTS = [BenchPrompt(i, "rep" if i % 2 else "mix", f"p{i}", verbatim=True) for i in range(4)]


def prompt_ids(count=4):
    # repetitive prompts, so that n-gram lookup finds something to propose
    return [[2] + [10 + i, 11 + i, 12 + i] * 4 for i in range(count)]


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0)


def engine_methods(target, draft, ks=(2, 4)):
    tokenizer = ByteTokenizer()
    methods = [EngineMethod("plain", "plain", Engine(target, tokenizer, None, 256), None)]
    for base, proposer in (("ngram", NgramProposer()), ("draft-model", DraftModelProposer(draft, 256))):
        engine = Engine(target, tokenizer, proposer, 256)
        methods += [EngineMethod(f"{base}@k={k}", base, engine, k) for k in ks]
    return methods


def test_greedy_bench_is_exact_and_documented(target, tiny_drafter_model):
    methods = engine_methods(target, tiny_drafter_model)
    bench = run_bench(methods, PROMPTS, prompt_ids(), BenchConfig(max_new_tokens=12))
    doc = report.summarize(bench, model="tiny", weights="fp32", draft_ks=(2, 4))
    assert doc["methods"] == ["plain", "ngram@k=2", "ngram@k=4", "draft-model@k=2", "draft-model@k=4"]
    for name, result in doc["results"].items():
        assert result["mismatches"] == 0, name
        assert result["tokens_per_s"] > 0 and result["speedup"] > 0 and result["tau"] >= 1.0
        assert result["speedup_median"] > 0
        assert [o["id"] for o in result["outputs"]] == [0, 1, 2, 3]
        assert all(len(o["token_ids"]) == 12 for o in result["outputs"])
        assert set(result["categories"]) == {"rep", "mix"}
    plain, ngram, draft = (doc["results"][n] for n in ("plain", "ngram@k=4", "draft-model@k=2"))
    assert plain["speedup"] == plain["speedup_median"] == 1.0 and plain["tau"] == 1.0
    assert plain["extra_memory_bytes"] == 0 and plain["acceptance_rate"] is None
    assert ngram["draft_n"] > 0 and ngram["tau"] > 1.0 and ngram["extra_memory_bytes"] == 0
    assert ngram["draft_k"] == 4 and ngram["method"] == "ngram"
    assert len(draft["acceptance_per_position"]) == 2
    assert draft["extra_memory_bytes"] > 0  # the draft model's weights and its KV cache
    assert json.loads(json.dumps(doc)) == doc
    table = report.format_table(doc)
    for name in doc["methods"]:
        assert name in table
    assert "acceptance per draft position" in table


class WrongOnFirstPrompt:
    """A fake method: plain's tokens, except one changed token on the first prompt it sees."""

    name = base = "broken"
    draft_k = None
    extra_memory_bytes = None

    def __init__(self, plain):
        self.plain, self.calls = plain, 0

    def run(self, prompts, options):
        runs = self.plain.run(prompts, options)
        self.calls += 1
        if self.calls == 2:  # the first call is the warm-up
            runs[0].token_ids[-1] += 1
        return runs


def test_mismatches_are_counted(target):
    plain = engine_methods(target, target)[0]
    bench = run_bench([plain, WrongOnFirstPrompt(plain)], PROMPTS, prompt_ids(),
                      BenchConfig(max_new_tokens=6))
    doc = report.summarize(bench)
    broken = doc["results"]["broken"]
    assert broken["mismatches"] == 1 and broken["mismatched_ids"] == [0]
    assert broken["categories"]["mix"]["mismatches"] == 1
    assert broken["categories"]["rep"]["mismatches"] == 0
    assert "-" in report.format_table(doc)  # unknown extra memory


def test_sampling_reports_no_mismatches(target):
    plain = engine_methods(target, target)[0]
    config = BenchConfig(max_new_tokens=6, sampling=SamplingParams(temperature=1.0, seed=3))
    doc = report.summarize(run_bench([plain], PROMPTS[:2], prompt_ids(2), config))
    assert doc["results"]["plain"]["mismatches"] is None
    assert doc["settings"]["greedy"] is False and doc["settings"]["seed"] == 3


class Recorder:
    """A fake method that records the order of calls and generates nothing."""

    draft_k = None
    extra_memory_bytes = 0

    def __init__(self, name, log):
        self.name = self.base = name
        self.log = log

    def run(self, prompts, options):
        self.log.append((self.name, len(prompts), options.max_new_tokens))
        return [Run([5, 6], "", 0.01, 0.01, 1, None, 1) for _ in prompts]


def test_warm_up_then_interleaved_per_batch():
    log = []
    methods = [Recorder(name, log) for name in ("plain", "a", "b")]
    run_bench(methods, PROMPTS, prompt_ids(), BenchConfig(max_new_tokens=32, batch_size=2))
    warm, batches = log[:3], log[3:]
    assert warm == [("plain", 1, 16), ("a", 1, 16), ("b", 1, 16)]
    # two batches of two prompts; the method order rotates per batch
    assert batches == [("plain", 2, 32), ("a", 2, 32), ("b", 2, 32),
                       ("a", 2, 32), ("b", 2, 32), ("plain", 2, 32)]


def test_batched_engine_runs_match_batch_of_one(target):
    methods = engine_methods(target, target, ks=(3,))[:2]
    single = report.summarize(run_bench(methods, PROMPTS, prompt_ids(), BenchConfig(max_new_tokens=8)))
    batched = report.summarize(run_bench(methods, PROMPTS, prompt_ids(),
                                         BenchConfig(max_new_tokens=8, batch_size=3)))
    for name in ("plain", "ngram@k=3"):
        assert batched["results"][name]["mismatches"] == 0
        assert ([o["token_ids"] for o in batched["results"][name]["outputs"]]
                == [o["token_ids"] for o in single["results"][name]["outputs"]])


def test_plot_writes_png_or_explains(tmp_path, target, monkeypatch):
    methods = engine_methods(target, target, ks=(2,))[:2]
    doc = report.summarize(run_bench(methods, PROMPTS[:2], prompt_ids(2), BenchConfig(max_new_tokens=6)))
    pytest.importorskip("matplotlib")
    assert report.plot(doc, str(tmp_path / "out.png")) is None
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = report.plot(doc, str(tmp_path / "none.png"))
    assert "matplotlib" in note and not (tmp_path / "none.png").exists()


@pytest.mark.hf
def test_hf_methods_match_plain_on_the_same_weights(target):
    pytest.importorskip("transformers")
    config = target.config
    hf_model = build_hf_model(config, random_weights(config, seed=0))
    tokenizer = ByteTokenizer()
    methods = [EngineMethod("plain", "plain", Engine(target, tokenizer, None, 256), None),
               HFMethod("hf", hf_model, config.eos_token_ids, config.pad_token_id),
               HFMethod("hf-lookup", hf_model, config.eos_token_ids, config.pad_token_id, 10,
                        tokenizer.decode)]
    doc = report.summarize(run_bench(methods, PROMPTS, prompt_ids(), BenchConfig(max_new_tokens=10)))
    for name in ("hf", "hf-lookup"):
        result = doc["results"][name]
        assert result["mismatches"] == 0, name
        assert result["tau"] >= 1.0 and result["acceptance_rate"] is None
        assert result["extra_memory_bytes"] > 0


@pytest.mark.hf
def test_hf_methods_are_built_by_name_in_their_dtype(tmp_path):
    pytest.importorskip("transformers")
    assert "hf-bf16" in METHODS and method_problem("hf-bf16") is None
    target = load_target(write_tiny_hf_model(tmp_path / "tiny"), "fp32")
    fp32, bf16 = build_methods(["hf", "hf-bf16"], (2,), target, ProposerRequest())
    assert (fp32.name, bf16.name) == ("hf", "hf-bf16") and bf16.base == "hf-bf16"
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert 2 * bf16.extra_memory_bytes == fp32.extra_memory_bytes
    doc = report.summarize(run_bench([EngineMethod("plain", "plain", Engine(target.model), None),
                                      fp32, bf16], PROMPTS, prompt_ids(),
                                     BenchConfig(max_new_tokens=8)))
    assert doc["results"]["hf"]["mismatches"] == 0
    outputs = doc["results"]["hf-bf16"]["outputs"]
    assert all(o["token_ids"] and o["decode_s"] > 0 for o in outputs)
