"""Tests for the ``mtpspec`` command: every user error is one line and exit status 2, ``generate``
streams text and a stats line, ``bench`` writes its table, JSON and plot. A tiny random model saved
as a Hugging Face folder stands in for the real one; one smoke test (``real``) uses the default."""
from __future__ import annotations

import io
import json

import pytest

from mtpspec.cli import DEFAULT_DRAFT_K, main

from tiny_hf import write_tiny_hf_model



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "base": write_tiny_hf_model(root / "base"),
        "chat": write_tiny_hf_model(root / "chat", chat_template=True),
        "draft": write_tiny_hf_model(root / "draft", seed=1, num_layers=2),
    }


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch, request):
    if "real" not in request.keywords:
        monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "cache"))


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``mtpspec ARGV``."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error_line(status, err, fragment):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtpspec: error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--model", "/no/such/model.gguf", "hi"], "model path not found"),
    (["generate", "--temperature", "-1", "hi"], "temperature"),
    (["generate", "--top-p", "2", "hi"], "top_p"),
    (["generate", "--weights", "int3", "hi"], "invalid choice"),
    (["generate", "--spec", "medusa", "hi"], "unknown --spec 'medusa'"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["generate", "--draft-k", "99", "hi"], "draft_k"),
    (["generate", "--draft-confidence", "1.5", "hi"], "--draft-confidence"),
    (["bench", "--draft-confidence", "-0.1"], "--draft-confidence"),
    (["generate"], "prompt"),
    ([], "required"),
    (["bench", "--methods", "plain,turbo"], "unknown method 'turbo'"),
    (["bench", "--methods", "draft-model"], "needs --draft-model"),
    (["bench", "--draft-k", "2,x"], "--draft-k"),
    (["bench", "--prompts", "/no/such/prompts.jsonl"], "prompt file not found"),
    (["bench", "--categories", "poetry"], "unknown category poetry"),
    (["bench", "--json", "/no/such/folder/out.json"], "does not exist"),
])
def test_user_errors_are_one_line(argv, fragment, capsys):
    status, _, err = run_cli(argv, capsys)
    assert_one_error_line(status, err, fragment)


def test_generate_streams_text_and_stats(models, capsys):
    status, out, err = run_cli(["generate", "--model", str(models["base"]), "--max-new-tokens", "10",
                                "--spec", "ngram", "--draft-k", "3", "abc abc abc"], capsys)
    assert status == 0 and out.endswith("\n")
    stats = err.strip().splitlines()[-1]
    for part in ("[ngram k=3]", "10 tokens", "decode", "end-to-end", "tok/s", "tau", "acceptance",
                 "prefill", "load"):
        assert part in stats, stats


def test_generate_default_spec_falls_back_to_plain(models, capsys):
    status, _, err = run_cli(["generate", "--model", str(models["base"]), "--max-new-tokens", "4",
                              "hi"], capsys)
    assert status == 0
    assert "mtpspec: note:" in err and "decoding plainly" in err and "--spec ngram" in err
    assert "[plain]" in err


def test_generate_matches_across_specs(models, capsys):
    outputs = {}
    for spec in ("none", "ngram", "draft-model"):
        status, out, _ = run_cli(["generate", "--model", str(models["base"]), "--spec", spec,
                                  "--draft-model", str(models["draft"]), "--max-new-tokens", "12",
                                  "xyz xyz"], capsys)
        assert status == 0
        outputs[spec] = out
    assert outputs["none"] == outputs["ngram"] == outputs["draft-model"]


def test_generate_reads_stdin(models, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello from stdin\n"))
    status, _, err = run_cli(["generate", "--model", str(models["base"]), "--spec", "none",
                              "--max-new-tokens", "3", "-"], capsys)
    assert status == 0 and "[plain] 3 tokens" in err


def test_chat_needs_a_template(models, capsys):
    status, _, err = run_cli(["generate", "--model", str(models["base"]), "--chat", "hi"], capsys)
    assert_one_error_line(status, err, "no chat template")
    status, _, err = run_cli(["generate", "--model", str(models["chat"]), "--chat", "--spec", "none",
                              "--max-new-tokens", "3", "hi"], capsys)
    assert status == 0 and "tokens" in err


def test_prompt_too_long_for_the_context(models, capsys):
    status, _, err = run_cli(["generate", "--model", str(models["base"]), "--max-len", "32",
                              "--max-new-tokens", "8", "x" * 40], capsys)
    assert_one_error_line(status, err, "context")


def test_spec_mtp_without_a_drafter(models, capsys):
    status, _, err = run_cli(["generate", "--model", str(models["base"]), "--spec", "mtp", "hi"],
                             capsys)
    assert_one_error_line(status, err, "mtp")


def write_tiny_drafter(folder, model_folder, target_hash=None):
    """A random MTP head for the tiny model (the lead's drafter API); skip if it is missing."""
    drafter = pytest.importorskip("mtpspec.drafter")
    from mtpspec.drafter.head import init_weights
    from mtpspec.runtime import load_target

    target = load_target(model_folder, with_tokenizer=False)
    config = drafter.DrafterConfig.for_target(
        target.config, num_layers=1, d_draft=32, intermediate_size=64, head="full",
        num_clusters=8, top_clusters=2,
        target_hash=target.weights_hash if target_hash is None else target_hash)
    head = drafter.MTPHead(config)
    init_weights(head)
    drafter.save_drafter(head, folder)
    return folder


def test_mtp_with_a_drafter(models, tmp_path, capsys):
    folder = write_tiny_drafter(tmp_path / "drafter", models["base"])
    base = ["--model", str(models["base"]), "--max-new-tokens", "6"]
    status, plain_out, _ = run_cli(["generate", *base, "--spec", "none", "abc abc"], capsys)
    assert status == 0
    status, out, err = run_cli(["generate", *base, "--drafter", str(folder), "abc abc"], capsys)
    assert status == 0 and f"[mtp k={DEFAULT_DRAFT_K}]" in err and "note" not in err  # --drafter selects mtp
    assert out == plain_out
    status, out, err = run_cli(["bench", *base, "--drafter", str(folder), "--methods", "plain,mtp",
                                "--limit", "2", "--draft-k", "2"], capsys)
    assert status == 0, err
    mtp = json.loads(out.strip().splitlines()[-1])["results"]["mtp"]
    assert mtp["mismatches"] == 0 and mtp["draft_n"] > 0 and mtp["extra_memory_bytes"] > 0


def test_mtp_refuses_a_drafter_of_another_target(models, tmp_path, capsys):
    folder = write_tiny_drafter(tmp_path / "drafter", models["base"], target_hash="0" * 64)
    status, _, err = run_cli(["generate", "--model", str(models["base"]), "--drafter", str(folder),
                              "hi"], capsys)
    assert_one_error_line(status, err, "does not fit")


def write_prompts(path):
    path.write_text(
        '{"question_id": 81, "category": "writing", "turns": ["ab ab ab ab", "again"]}\n'
        '{"id": "free", "category": "code", "prompt": "x = 1\\nx = 1\\nx ="}\n'
        '{"question_id": 83, "category": "writing", "turns": ["cd cd cd"]}\n')
    return path


def test_bench_end_to_end(models, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    status, out, err = run_cli([
        "bench", "--model", str(models["base"]), "--prompts", str(prompts),
        "--methods", "plain,ngram,draft-model", "--draft-model", str(models["draft"]),
        "--draft-k", "2,3", "--max-new-tokens", "8", "--json", str(out_json), "--plot", str(out_png),
    ], capsys)
    assert status == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc == json.loads(out_json.read_text())
    assert doc["methods"] == ["plain", "ngram@k=2", "ngram@k=3", "draft-model@k=2", "draft-model@k=3"]
    for name, result in doc["results"].items():
        assert result["mismatches"] == 0, name
        assert [o["id"] for o in result["outputs"]] == [81, "free", 83]
        for field in ("tokens_per_s", "speedup", "tau"):
            assert result[field] is not None
    assert doc["prompts"]["categories"] == {"writing": 2, "code": 1}
    assert "speedup" in out and "draft-model@k=3" in out  # the table
    if out_png.exists() or "matplotlib" not in err:
        assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_bench_adds_plain_and_filters(models, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    status, out, err = run_cli([
        "bench", "--model", str(models["base"]), "--prompts", str(prompts), "--methods", "ngram",
        "--categories", "writing", "--limit", "1", "--max-new-tokens", "4",
    ], capsys)
    assert status == 0, err
    assert "adding method plain" in err
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["methods"] == ["plain", "ngram"]
    assert [o["id"] for o in doc["results"]["ngram"]["outputs"]] == [81]


def test_bench_plots_next_to_its_json_unless_told_not_to(models, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["bench", "--model", str(models["base"]), "--prompts", str(prompts), "--methods",
              "plain,ngram", "--limit", "2", "--max-new-tokens", "4", "--quiet"]
    status, _, err = run_cli(common + ["--json", str(tmp_path / "run.json")], capsys)
    assert status == 0, err
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    assert "bench: batch" not in err  # --quiet: no progress lines either
    status, _, err = run_cli(common + ["--json", str(tmp_path / "bare.json"), "--no-plot"], capsys)
    assert status == 0, err
    assert (tmp_path / "bare.json").exists() and not (tmp_path / "bare.png").exists()
    status, _, err = run_cli(common + ["--plot", str(tmp_path / "x.png"), "--no-plot"], capsys)
    assert_one_error_line(status, err, "contradict")


def test_bench_malformed_prompt_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    status, _, err = run_cli(["bench", "--prompts", str(bad)], capsys)
    assert_one_error_line(status, err, f"{bad}:2")


@pytest.mark.real
def test_real_model_generate_smoke(capsys):
    from mtpspec.loading import ModelLoadError, default_model_path

    try:
        default_model_path()
    except ModelLoadError as err:
        pytest.skip(f"default model unavailable: {err}")
    status, out, err = run_cli(["generate", "--max-new-tokens", "8", "--spec", "ngram",
                                "The capital of France is"], capsys)
    assert status == 0, err
    assert out.strip()
    assert "8 tokens" in err or "(stop)" in err
