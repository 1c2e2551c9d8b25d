"""The ``mtpspec`` command: ``generate`` (stream one completion), ``bench`` (compare methods),
``train`` (retrofit a drafter) and ``serve`` (an OpenAI-compatible server, ``mtpspec.server``).

Only argument handling and wiring live here: models load through ``runtime``, proposers come
from ``proposers.factory``, decoding is the ``engine``'s, and the benchmark is ``bench``'s.
Every user error (a bad flag value, a missing file, a prompt that does not fit) ends in ONE line
``mtpspec: error: ...`` on stderr and exit status 2, never a traceback. Long waits (a first
start's packing, the benchmark) show progress bars on a terminal; ``--quiet`` hides them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mtpspec.bench.methods import METHODS, MethodError, method_problem
from mtpspec.bench.prompts import PromptFileError
from mtpspec.kv_cache import CacheFullError
from mtpspec.loading import ModelLoadError
from mtpspec.ops import FORMATS
from mtpspec.proposers.factory import DEFAULT_DRAFT_CONFIDENCE, SPECS, SpecError
from mtpspec.runtime import BACKENDS, DEFAULT_WEIGHTS
from mtpspec.tokenizer import NoChatTemplateError, UnsupportedTokenizerError

DEFAULT_DRAFT_K = 6  # the longest draft; the confidence stop usually ends it sooner
DEFAULT_MAX_LEN = 4096


class UsageError(Exception):
    """A user error found by the CLI itself; printed as one line."""


USER_ERRORS = (UsageError, ModelLoadError, CacheFullError, NoChatTemplateError,
               UnsupportedTokenizerError, PromptFileError, SpecError, MethodError,
               FileNotFoundError)  # e.g. a model folder without tokenizer.json


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors become one ``mtpspec: error:`` line like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF file, Hugging Face folder, or an embedded model: gemma3 "
                             "(Gemma 3 270M base, the default) or smollm2 (SmolLM2-135M-Instruct)")
    parser.add_argument("--backend", choices=BACKENDS, default="native",
                        help="native (Llama, Mistral, Qwen2/3, Gemma 2/3, Gemma 4 text from HF "
                             "folders; the default) or hf: any Hugging Face folder through "
                             "transformers")
    parser.add_argument("--weights", "--dtype", dest="weights", choices=FORMATS,
                        default=DEFAULT_WEIGHTS,
                        help="weight format the target runs in (default %(default)s)")
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                        help="context size: prompt plus new tokens (default %(default)s)")
    parser.add_argument("--drafter", type=Path, default=None, help="MTP drafter checkpoint")
    parser.add_argument("--draft-model", type=Path, default=None,
                        help="separate draft model (GGUF file or HF folder) for draft-model")
    parser.add_argument("--draft-confidence", type=float, default=DEFAULT_DRAFT_CONFIDENCE,
                        help="mtp: stop a draft once the head's estimate that all of it is "
                             "accepted falls below this; --draft-k is then the longest draft "
                             "(default %(default)s; 0: always draft --draft-k tokens)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars (they are drawn only when stderr is a terminal)")


def _add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 turns it off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 turns it off")
    parser.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtpspec", description="Lossless speculative decoding on CPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="stream a completion of one prompt")
    generate.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    _add_model_flags(generate)
    _add_sampling_flags(generate, max_new_tokens=128)
    generate.add_argument("--chat", action="store_true",
                          help="apply the model's chat template to the prompt (a user message)")
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--spec", default=None,
                          help=f"speculative method: {', '.join(SPECS)} (default: mtp when a "
                               "drafter ships for the target, else ngram)")
    generate.add_argument("--draft-k", type=int, default=DEFAULT_DRAFT_K,
                          help="draft tokens per step (default %(default)s)")
    generate.add_argument("--adaptive-k", action="store_true",
                          help="adapt the draft length to recent acceptance, up to --draft-k")
    generate.set_defaults(handler=cmd_generate)

    bench = commands.add_parser("bench", help="compare decoding methods on a prompt set")
    bench.add_argument("--prompts", type=Path, default=None,
                       help="JSONL prompts (MT-bench/Spec-Bench 'turns' or 'prompt'; default: built-in)")
    bench.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    bench.add_argument("--categories", default=None, help="comma-separated categories to keep")
    bench.add_argument("--methods", default=None,
                       help=f"comma-separated, from {', '.join(METHODS)} (default: plain,ngram "
                            "and mtp when a drafter ships for the target)")
    bench.add_argument("--draft-k", default=str(DEFAULT_DRAFT_K),
                       help="draft length(s), comma-separated: each speculative method runs per k")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    bench.add_argument("--plot", type=Path, default=None,
                       help="write the PNG plot (speedup and tau per method and category, "
                            "acceptance per draft position) here (default: next to --json, "
                            "same name with .png)")
    bench.add_argument("--no-plot", action="store_true", help="write no plot")
    _add_model_flags(bench)
    _add_sampling_flags(bench, max_new_tokens=64)
    bench.set_defaults(handler=cmd_bench)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with batched decoding")
    _add_model_flags(serve)
    serve.add_argument("--spec", default=None,
                       help=f"speculative method: {', '.join(SERVE_SPECS)} (default: mtp when a "
                            "drafter ships for the target, else ngram)")
    serve.add_argument("--draft-k", type=int, default=DEFAULT_DRAFT_K,
                       help="draft tokens per step (default %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=8080, help="port (default %(default)s; 0: any)")
    serve.add_argument("--max-batch-size", type=int, default=8,
                       help="sequences decoded together; more wait for a row (default %(default)s)")
    serve.add_argument("--max-verify-rows", type=int, default=6,
                       help="cap rows x (drafts + 1) per verification pass, so drafting shrinks "
                            "as the batch fills and stops at 4+ sequences: on 2 CPU cores a pass "
                            "costs the same for 3-6 rows and ~1.6x that for 7-8 "
                            "(docs/serve-bench-rows6.txt; default %(default)s; 0: no cap)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: the "
                            "MTPSPEC_API_KEY environment variable; unset: no key)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests waiting for a batch row; past it a 503 (default %(default)s)")
    serve.add_argument("--max-connections", type=int, default=512,
                       help="open connections; past it a 503 (default %(default)s)")
    serve.add_argument("--log-requests", action="store_true", help="log every request on stderr")
    serve.set_defaults(handler=cmd_serve)

    from mtpspec.drafter.recipe import add_arguments as add_train_arguments

    train = commands.add_parser("train", help="retrofit an MTP drafter onto a frozen target")
    add_train_arguments(train)
    train.set_defaults(handler=cmd_train)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from mtpspec.drafter import distributed
    from mtpspec.drafter.checkpoint import DrafterMismatchError
    from mtpspec.drafter.recipe import run

    for source in args.prompts:
        if source not in ("sharegpt", "mix") and not Path(source).exists():
            raise UsageError(f"prompt file or dataset folder not found: {source}")
    if args.prompt_ids is not None and not args.prompt_ids.is_file():
        raise UsageError(f"prompt-ids file not found: {args.prompt_ids}")
    if args.nproc > 1 and not distributed.launched():  # the same command as N torchrun ranks
        after = args.argv[args.argv.index("train") + 1:]
        return distributed.relaunch(distributed.without_option(after, "--nproc"), args.nproc)
    try:
        run(args, log=lambda line: print(line, file=sys.stderr, flush=True))
    except DrafterMismatchError as err:  # e.g. --layout gemma4-assistant on another target
        raise UsageError(str(err)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtpspec`` console script."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # train --nproc reruns them
        return args.handler(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mtpspec: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None


# --- shared pieces --------------------------------------------------------------------------------

def _sampling(args: argparse.Namespace):
    from mtpspec.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _check_model_flags(args: argparse.Namespace) -> None:
    """The flags of ``_add_model_flags`` that argparse cannot check itself."""
    if args.max_len < 2:
        raise UsageError(f"--max-len must be >= 2, got {args.max_len}")
    if not 0.0 <= args.draft_confidence < 1.0:
        raise UsageError(f"--draft-confidence must be in [0, 1), got {args.draft_confidence}")


def _check_common(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _check_model_flags(args)


def _proposer_request(args: argparse.Namespace):
    from mtpspec.proposers.factory import ProposerRequest

    return ProposerRequest(drafter_path=args.drafter, draft_model_path=args.draft_model,
                           weights=args.weights, max_len=args.max_len,
                           min_confidence=args.draft_confidence or None)


def _note(message: str) -> None:
    print(f"mtpspec: note: {message}", file=sys.stderr)


# --- generate -------------------------------------------------------------------------------------

def _read_prompt(prompt: str) -> str:
    text = sys.stdin.read().rstrip("\n") if prompt == "-" else prompt
    if not text:
        raise UsageError("empty prompt")
    return text


def _encode(target, text: str, chat: bool) -> list[int]:
    tokenizer = target.tokenizer
    if not chat:
        return tokenizer.encode(text)
    if tokenizer.chat_template is None:
        raise NoChatTemplateError(f"--chat: model {target.name} has no chat template (a base "
                                  "model?); drop --chat to use the prompt as plain text")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return tokenizer.encode(rendered, add_bos=False)  # the template writes the bos token


def stats_line(result, load_s: float, spec: str, draft_k: int) -> str:
    """The one stderr line after a generation."""
    stats = result.stats
    tokens = len(result.token_ids)
    decode = (tokens - 1) / stats.decode_s if stats.decode_s > 0 and tokens > 1 else 0.0
    total_s = stats.prefill_s + stats.decode_s
    end_to_end = tokens / total_s if total_s > 0 else 0.0
    method = "plain" if spec == "none" else f"{spec} k={draft_k}"
    return (f"[{method}] {tokens} tokens ({result.finish_reason}) | decode {decode:.2f} tok/s | "
            f"end-to-end {end_to_end:.2f} tok/s | tau {stats.tau:.2f} | acceptance "
            f"{stats.acceptance_rate:.1%} ({stats.draft_accepted}/{stats.draft_proposed} drafts "
            f"accepted) | prefill {stats.prefill_s:.3f} s ({stats.prompt_tokens} tokens) | "
            f"load {load_s:.2f} s")


def cmd_generate(args: argparse.Namespace) -> int:
    from mtpspec.engine import Engine, GenerateOptions
    from mtpspec.proposers.factory import make_proposer
    from mtpspec.runtime import configure_threads, load_target

    _check_common(args)
    if args.spec is not None and args.spec not in SPECS:
        raise UsageError(f"unknown --spec {args.spec!r}; choose one of {', '.join(SPECS)}")
    try:
        options = GenerateOptions(max_new_tokens=args.max_new_tokens, sampling=_sampling(args),
                                  stop=tuple(args.stop), draft_k=args.draft_k,
                                  adaptive_k=args.adaptive_k)
    except ValueError as err:
        raise UsageError(str(err)) from None
    text = _read_prompt(args.prompt)
    configure_threads()
    target = load_target(args.model, args.weights, backend=args.backend, quiet=args.quiet)
    ids = _encode(target, text, args.chat)
    built = make_proposer(args.spec, target, _proposer_request(args))
    engine = Engine(target.model, target.tokenizer, built.proposer, max_len=args.max_len)
    results = []
    last, note = "\n", built.note
    for event in engine.stream([ids], options, results):
        if note:  # once generation has started: an error (e.g. a full cache) stays one line
            _note(note)
            note = None
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
            last = event.text
    if not last.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    print(stats_line(results[0], target.load_s, built.spec, options.draft_k), file=sys.stderr)
    return 0


# --- bench ----------------------------------------------------------------------------------------

def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _draft_ks(value: str) -> tuple[int, ...]:
    parts = _split(value) or []
    try:
        ks = tuple(dict.fromkeys(int(part) for part in parts))
    except ValueError:
        raise UsageError(f"--draft-k takes integers like 4 or 2,4,8; got {value!r}") from None
    if not ks or any(not 1 <= k <= 32 for k in ks):
        raise UsageError(f"--draft-k values must be in 1..32, got {value!r}")
    return ks


def _bench_methods(args: argparse.Namespace) -> list[str] | None:
    """Method names from --methods, checked before any model loads (None: decide after loading)."""
    names = _split(args.methods)
    if names is None:
        return None
    if not names:
        raise UsageError("--methods is empty")
    for name in names:
        problem = method_problem(name)
        if problem is not None:
            raise UsageError(problem)
    if "draft-model" in names and args.draft_model is None:
        raise UsageError("method draft-model needs --draft-model PATH (a smaller GGUF or HF folder)")
    names = list(dict.fromkeys(names))
    if "plain" not in names:
        _note("adding method plain: speedups and exactness are measured against it")
        names.insert(0, "plain")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    from mtpspec.bench import report
    from mtpspec.bench.methods import build_methods
    from mtpspec.bench.prompts import BUILTIN_PROMPTS, load_prompts, prompt_token_ids, select_prompts
    from mtpspec.bench.runner import BenchConfig, run_bench
    from mtpspec.proposers.factory import default_spec
    from mtpspec.runtime import configure_threads, load_target

    _check_common(args)
    names = _bench_methods(args)
    draft_ks = _draft_ks(args.draft_k)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.plot is not None and args.no_plot:
        raise UsageError("--plot and --no-plot contradict each other")
    plot_path = args.plot
    if plot_path is None and args.json is not None and not args.no_plot:
        plot_path = args.json.with_suffix(".png")
    for flag, path in (("--json", args.json), ("--plot", plot_path)):
        if path is not None and not path.resolve().parent.is_dir():
            raise UsageError(f"{flag}: folder {path.resolve().parent} does not exist")
    config = BenchConfig(max_new_tokens=args.max_new_tokens, sampling=_sampling(args),
                         batch_size=args.batch_size)
    prompts = load_prompts(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
    prompts = select_prompts(prompts, _split(args.categories), args.limit)

    configure_threads()
    target = load_target(args.model, args.weights, backend=args.backend, quiet=args.quiet)
    if names is None:
        names = ["plain", "ngram"]
        if default_spec(target, args.drafter)[0] == "mtp":
            names.append("mtp")
    prompt_ids = [prompt_token_ids(p, target.tokenizer) for p in prompts]
    methods = build_methods(names, draft_ks, target, _proposer_request(args), args.max_len)
    print(f"mtpspec: bench: {len(prompts)} prompts x {len(methods)} methods "
          f"({', '.join(m.name for m in methods)}); model loaded in {target.load_s:.1f} s",
          file=sys.stderr)
    bench = run_bench(methods, prompts, prompt_ids, config, log=_bench_log(args.quiet),
                      quiet=args.quiet)
    doc = report.summarize(bench, model=target.name, weights=target.weight_format,
                           source=str(args.prompts) if args.prompts else "builtin",
                           draft_ks=draft_ks)
    print(report.format_table(doc))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        except OSError as err:
            raise UsageError(f"cannot write {args.json}: {err.strerror}") from None
    if plot_path is not None:
        note = report.plot(doc, str(plot_path))
        if note:
            _note(note)
    print(json.dumps(doc, ensure_ascii=False))
    return 0


def _bench_log(quiet: bool):
    """Where the benchmark's progress lines go: stderr when no bar shows them (e.g. a log file);
    nowhere with --quiet or when bars are drawn."""
    from mtpspec import progress

    if quiet or progress.shown():
        return lambda message: None
    return lambda message: print(f"mtpspec: bench: {message}", file=sys.stderr)


# --- serve ----------------------------------------------------------------------------------------

SERVE_SPECS = ("mtp", "mtp-only", "ngram", "none")  # draft-model keeps per-row state: no joins


def cmd_serve(args: argparse.Namespace) -> int:
    from mtpspec.engine import Engine
    from mtpspec.proposers.factory import make_proposer
    from mtpspec.runtime import configure_threads, load_target
    from mtpspec.server import ServeConfig, start

    _check_model_flags(args)
    if args.spec is not None and args.spec not in SERVE_SPECS:
        raise UsageError(f"serve: unknown --spec {args.spec!r}; choose one of {', '.join(SERVE_SPECS)}")
    if not 1 <= args.draft_k <= 32:
        raise UsageError(f"--draft-k must be in 1..32, got {args.draft_k}")
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_verify_rows < 0:
        raise UsageError(f"--max-verify-rows must be >= 0, got {args.max_verify_rows}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_waiting < 0 or args.max_connections < 1:
        raise UsageError("--max-waiting must be >= 0 and --max-connections >= 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get("MTPSPEC_API_KEY")
    if api_key is not None and not api_key.strip():
        raise UsageError("the API key must not be empty")
    configure_threads()
    target = load_target(args.model, args.weights, backend=args.backend, quiet=args.quiet)
    built = make_proposer(args.spec, target, _proposer_request(args))
    if built.note:
        _note(built.note)
    engine = Engine(target.model, target.tokenizer, built.proposer, max_len=args.max_len)
    config = ServeConfig(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                         draft_k=args.draft_k if built.proposer is not None else 0,
                         max_verify_rows=args.max_verify_rows or None,
                         spec=built.spec, log_requests=args.log_requests, api_key=api_key,
                         max_waiting=args.max_waiting, max_connections=args.max_connections)
    try:
        server = start(engine, target.name, config)
    except OSError as err:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    method = "plain" if built.proposer is None else f"{built.spec} k={config.draft_k}"
    print(f"mtpspec: serving {target.name} ({target.weight_format}, {method}, up to "
          f"{config.max_batch_size} sequences at once) on {server.url}/v1; playground at "
          f"{server.url}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("mtpspec: serve: shutting down", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
