"""Command-line entry points of the data tools: `packtune data templatize`, `packtune data
self-instruct` and `packtune eval`. Bad input is a one-line message and exit status 2, never a
traceback."""

from __future__ import annotations

import argparse
import sys


def _templatize(args: argparse.Namespace) -> int:
    from packtune.datatools.jsonl_files import write_json, write_jsonl
    from packtune.datatools.self_instruct import report_path
    from packtune.datatools.templatize import format_report, templatize
    from packtune.datatools.templatize_spec import load_spec

    records, report = templatize(load_spec(args.spec), args.seed)
    write_jsonl(args.out, records)
    write_json(args.report or report_path(args.out), report)
    print(format_report(report))
    print(f"wrote {len(records)} records to {args.out}; report: {args.report or report_path(args.out)}")
    return 0


def _generator(args: argparse.Namespace):
    if args.base_url:
        from packtune.datatools.openai_generator import OpenAIChatGenerator

        return OpenAIChatGenerator(args.base_url, args.model, api_key_env=args.api_key_env,
                                   max_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, timeout=args.timeout, retries=args.retries,
                                   concurrency=args.concurrency)
    from packtune.datatools.local_generation import LocalGenerator

    return LocalGenerator(args.model, template=args.template, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device,
                          batch_size=args.batch_size)


def _self_instruct(args: argparse.Namespace) -> int:
    from packtune.datatools.openai_generator import GeneratorError
    from packtune.datatools.seed_tasks import read_seed_tasks
    from packtune.datatools.self_instruct import SelfInstruct, SelfInstructOptions, format_report

    if args.num < 1 or args.batch_size < 1:
        print(f"packtune data self-instruct: {'--num' if args.num < 1 else '--batch-size'} must be >= 1",
              file=sys.stderr)
        return 2
    options = SelfInstructOptions(num=args.num, max_requests=args.max_requests or 10 * args.num + 50,
                                  batch_size=args.batch_size, seed=args.seed)
    try:
        seeds = read_seed_tasks(args.seed_tasks)
        generator = _generator(args)
        report = SelfInstruct(generator, seeds, args.out, options).run()
    except FileNotFoundError as e:
        print(f"packtune data self-instruct: {e}", file=sys.stderr)
        return 2
    except GeneratorError as e:
        print(f"packtune data self-instruct: the generator failed: {e} (the records kept so far are in "
              f"{args.out}; rerun to continue)", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


def _eval(args: argparse.Namespace) -> int:

    from packtune.datatools.evaluate import holds_preference_pairs, run_eval
    from packtune.model.generate import DEFAULT_BATCH_SIZE

    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if batch_size < 1:
        print("packtune eval: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        if holds_preference_pairs(args.data):  # chosen / rejected: the preference accuracy
            from packtune.preference.accuracy import run_preference_eval

            report = run_preference_eval(args.model, args.data, template=args.template, limit=args.limit,
                                         json_out=args.json, device=args.device, dtype=args.dtype)
        else:
            report = run_eval(args.model, args.data, template=args.template, limit=args.limit,
                              max_new_tokens=args.max_new_tokens, json_out=args.json,
                              normalization=args.normalize, device=args.device, dtype=args.dtype,
                              batch_size=batch_size)
    except FileNotFoundError as e:
        print(f"packtune eval: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def add_data_commands(data: argparse._SubParsersAction) -> None:
    """`templatize` and `self-instruct` under `packtune data`."""
    t = data.add_parser("templatize", help="labeled datasets -> instruction records (FLAN-style templates)")
    t.add_argument("spec", help="a templatize spec (TOML): sources, and per task templates, labels, options")
    t.add_argument("--out", required=True, help="the JSONL file of records to write (Alpaca or messages)")
    t.add_argument("--report", help="the JSON report (default: OUT.report.json)")
    t.add_argument("--seed", type=int, default=None, help="override the spec's seed")
    t.set_defaults(func=_templatize)

    s = data.add_parser("self-instruct", help="new instructions from seed tasks with an LLM (Self-Instruct)")
    s.add_argument("--seed-tasks", required=True, help="Self-Instruct seed_tasks.jsonl or Alpaca records")
    s.add_argument("--out", required=True, help="JSONL of kept Alpaca records, appended to: reruns continue")
    s.add_argument("--num", type=int, required=True, help="kept records wanted in OUT (with those there)")
    s.add_argument("--max-requests", type=int, default=0, help="generator requests this run (0: 10 num + 50)")
    s.add_argument("--model", required=True, help="a model directory, or with --base-url the served model")
    s.add_argument("--base-url", help="an OpenAI-compatible server (http://host:port or .../v1)")
    s.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    s.add_argument("--batch-size", type=int, default=4,
                   help="proposal prompts per round; a local model decodes up to this many together")
    s.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight at once")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    s.add_argument("--retries", type=int, default=4, help="retries of a failed request (doubling backoff)")
    s.add_argument("--template", default="auto", help="local model: the prompt template")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None, help="local model: cpu, cuda, ... (default: cpu)")
    s.set_defaults(func=_self_instruct)


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    from packtune.datatools.answer_metrics import NORMALIZERS

    e = sub.add_parser("eval", help="answer instruction records with a model; exact match, ROUGE-L, per task")
    e.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer)")
    e.add_argument("--data", required=True,
                   help="records in any layout training reads; the last answer is the reference (preference "
                        "pairs, prompt / chosen / rejected: the share where the model prefers chosen)")
    e.add_argument("--template", default="auto",
                   help="auto (the model's chat template), or as [data] template: the training template")
    e.add_argument("--limit", type=int, default=0, help="score the first N records (0: all)")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=None,
                   help="prompts decoded together (default 32; greedy answers do not depend on it)")
    e.add_argument("--normalize", default="squad", choices=sorted(NORMALIZERS),
                   help="squad: lowercase, no punctuation or articles; text: spaces and a final period only")
    e.add_argument("--json", help="write the metrics and every prediction to this JSON file")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--device", default=None)
    e.set_defaults(func=_eval)
