"""Tests for the drafter recipe's parts that choose and measure it: the general-text prompt mix
(its tasks, its content-keyed held-out split, base/chat framing), hard labels, recorded states
shared by heads of different depths, and the calibration of the head's confidence (the table
``evaluate`` writes, the monotone map the proposer reads, and that a calibrated stop is lossless).
"""
from __future__ import annotations

import pytest
import torch

from mtpspec.drafter import mix
from mtpspec.drafter.data import generate_states
from mtpspec.drafter.train import evaluate, train
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.proposers.mtp import Calibration, MTPProposer, _monotone
from mtpspec.sampling import SamplingParams

from test_drafter import (assert_same_weights, drafter_config, fresh_head, quiet,  # noqa: F401
                          small_run)
from test_drafter import dense, plain_greedy, sequences, target, trained_head  # noqa: F401,F811


def conversations(n: int = 60) -> list[list[tuple[str, str]]]:
    """Synthetic ShareGPT-shaped conversations (the real file is a training-time download)."""
    doc = "\n\n".join(f"Paragraph {j} says that item {j} costs {j * 3} euros and ships in {j} days."
                      * 3 for j in range(6))
    return [[("user", f"Question number {i}: how do I do task {i}?"), ("assistant", doc + f" ({i})"),
             ("user", f"And what about task {i + 1}?")] for i in range(n)]


def test_mix_has_every_task_and_a_content_keyed_held_out_split():
    convs = conversations()
    train_items = mix.build_mix(400, seed=0, conversations=convs, heldout_fraction=0.2)
    held = mix.build_mix(400, seed=5, conversations=convs, heldout_fraction=0.2, split="heldout")
    tasks = {item.task for item in train_items}
    assert {"chat", "multiturn", "summarize", "translate", "context_qa", "extract", "code"} <= tasks
    assert held and not {i.key for i in train_items} & {i.key for i in held}  # never shared
    assert all(mix.heldout(i.key, 0.2) for i in held)
    again = mix.build_mix(400, seed=0, conversations=convs, heldout_fraction=0.2)
    assert [i.messages for i in again] == [i.messages for i in train_items]  # seeded
    multiturn = next(i for i in train_items if i.task == "multiturn")
    assert [m["role"] for m in multiturn.messages] == ["user", "assistant", "user"]
    code = next(i for i in train_items if i.task == "code")
    assert "```python" in code.key or "Complete this function" in code.key


class FakeTokenizer:
    def __init__(self, template: str | None):
        self.chat_template = template

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([1] if add_bos else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_messages_are_framed_by_the_template_or_as_question_answer_turns():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye?"}]
    base = mix.messages_prompt_ids(FakeTokenizer(None), messages)
    assert base[0] == 1 and "".join(map(chr, base[1:])) == (
        "Question: Hi\nAnswer: Hello\nQuestion: Bye?\nAnswer:")
    chat = mix.messages_prompt_ids(FakeTokenizer("t"), messages)
    assert "".join(map(chr, chat)) == "<user>Hi<assistant>Hello<user>Bye?<assistant>"


def test_stdlib_functions_are_source_of_whole_functions():
    functions = mix.stdlib_functions(20, seed=0)
    assert len(functions) == 20
    for source in functions:
        assert source.startswith(("def ", "async def ")) or source.startswith("@")
        compile(source, "<f>", "exec")


def test_hard_labels_equal_soft_labels_over_the_top_token_only(dense, sequences, tmp_path):
    """Top-1 soft targets renormalise to the one-hot argmax: the same training, step for step."""
    hard, soft = fresh_head(dense, sequences), fresh_head(dense, sequences)
    train(hard, dense, sequences, small_run(4, labels="hard"), tmp_path / "h", log=quiet)
    train(soft, dense, sequences, small_run(4, top_k=1), tmp_path / "s", log=quiet)
    assert_same_weights(hard, soft, atol=1e-6)
    other = fresh_head(dense, sequences)
    train(other, dense, sequences, small_run(4), tmp_path / "o", log=quiet)
    with pytest.raises(AssertionError):
        assert_same_weights(other, hard, atol=1e-6)  # top-8 soft targets train differently


def test_recorded_states_hold_each_layer_once_and_serve_any_depth(target, sequences, tmp_path):
    read = drafter_config(target.config, num_layers=3).target_layers  # a layer read twice
    assert len(set(read)) < len(read)
    prompts = [s[:4] for s in sequences[:3]]
    states = generate_states(target, prompts, 12, SamplingParams(), None, read, 8)
    assert all(st.layers == tuple(sorted(set(read))) and st.keys.shape[0] == len(set(read))
               for st in states)
    for layers in (1, 2, 3):  # heads of different depths train from the same recorded states
        head = fresh_head(target, [st.ids for st in states], num_layers=layers)
        start = head.pre_projection.weight.clone()
        train(head, target, states, small_run(2), tmp_path / f"d{layers}", log=quiet)
        assert not torch.equal(head.pre_projection.weight, start)


def test_monotone_pools_violators_by_weight():
    assert _monotone([0.1, 0.5, 0.3, 0.9], [1, 1, 1, 1]) == pytest.approx([0.1, 0.4, 0.4, 0.9])
    assert _monotone([0.5, 0.1], [3, 1]) == pytest.approx([0.4, 0.4])
    assert _monotone([0.2, 0.3], [1, 1]) == [0.2, 0.3]


def test_calibration_interpolates_between_bins_and_is_flat_outside():
    cal = Calibration.from_json({"predicted": [0.2, 0.6, 0.9], "observed": [0.1, 0.5, 0.8],
                                 "count": [5, 5, 5]})
    out = cal(torch.tensor([0.0, 0.2, 0.4, 0.75, 0.9, 1.0]))
    assert out.tolist() == pytest.approx([0.1, 0.1, 0.3, 0.65, 0.8, 0.8])
    assert Calibration.from_json(None) is None and Calibration.from_json({"predicted": []}) is None


def test_evaluate_reports_a_calibration_over_every_verified_draft(target, trained_head):
    starts = [[2], [7], [100]]
    from mtpspec.drafter.data import generate_batch

    held = [s + r for s, r in zip(starts, generate_batch(target, starts, 20, SamplingParams()))]
    result = evaluate(trained_head, target, held, max_k=4)
    table = result["calibration"]
    assert len(table["predicted"]) == len(table["observed"]) == len(table["count"]) > 0
    assert all(0.0 <= p <= 1.0 for p in table["predicted"] + table["observed"])
    # every P starts a draft at position 1, so the count is at least the number of positions
    assert sum(table["count"]) >= sum(len(s) - 1 for s in held)
    assert table["predicted"] == sorted(table["predicted"])


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "python"])
def test_calibrated_stop_is_lossless_and_follows_the_calibration(target, trained_head,
                                                                  plain_greedy, use_fused):
    prompts, expected = plain_greedy
    options = GenerateOptions(max_new_tokens=20, ignore_eos=True, draft_k=6)
    drafted = {}
    for name, observed in (("sure", [1.0, 1.0]), ("never", [0.0, 0.0])):
        trained_head.calibration = {"predicted": [0.0, 1.0], "observed": observed, "count": [1, 1]}
        try:
            proposer = MTPProposer(trained_head, target, "clustered", use_fused=use_fused,
                                   min_confidence=0.5)
        finally:
            trained_head.calibration = None
        results = Engine(target, proposer=proposer).generate(prompts, options)
        assert [r.token_ids for r in results] == expected
        drafted[name] = sum(r.stats.draft_proposed for r in results)
    assert drafted["never"] == 0 and drafted["sure"] > 0
