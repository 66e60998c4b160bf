"""The `packtune` command line: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import argparse
import sys

from packtune.config import load_config
from packtune.datatools.commands import add_data_commands, add_eval_command
from packtune.errors import PacktuneError


def _env(args: argparse.Namespace) -> int:
    from packtune.env import report

    print(report())
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import json

    from packtune.config import load_config
    from packtune.data import data_report, format_report
    from packtune.data.rows import build_rows, tokenized_data

    cfg = load_config(args.config, args.set)
    dataset = tokenized_data(cfg)
    rows = build_rows(cfg, dataset)
    cp = cfg.train.context_parallel
    report = data_report(dataset, rows, max(args.world_size // cp, 1), cfg.train.micro_batches,
                         context_parallel=cp)
    print(format_report(report))
    if args.report_json:
        from packtune.atomic_write import write_atomic

        write_atomic(args.report_json, json.dumps(report, indent=1))
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from packtune.data.inspect import inspect_records

    if args.rows is not None:
        print("packtune data inspect: --rows is now called --records; the old name will stop working in a "
              "later release", file=sys.stderr)
    cfg = load_config(args.config, args.set)
    inspect_records(cfg, args.records if args.rows is None else args.rows)
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        from packtune.plot import plot_runs

        print(plot_runs(args.runs, args.out))
    except ImportError:
        print('packtune plot needs matplotlib (pip install "packtune[demo]")', file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"packtune plot: {e}", file=sys.stderr)
        return 2
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    subject = args.subject.replace("-", "_")
    try:
        module = importlib.import_module(f"packtune.bench.{subject}")
    except ModuleNotFoundError as e:
        if e.name != f"packtune.bench.{subject}":
            raise
        print(f"packtune bench: unknown subject {args.subject!r}", file=sys.stderr)
        return 2
    module.main(args.bench_args)
    return 0


def _generate(args: argparse.Namespace) -> int:

    from packtune.model.generate import generate_text

    template = args.template or ("auto" if args.chat else "raw")
    if args.chat and template == "raw":
        print("packtune generate: --chat needs a chat template, not --template raw", file=sys.stderr)
        return 2
    try:
        text = generate_text(
            args.model,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            dtype=args.dtype,
            device=args.device,
            template=template,
            adapter=args.adapter,
        )
    except FileNotFoundError as e:
        print(f"packtune generate: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _merge(args: argparse.Namespace) -> int:
    import torch

    from packtune.lora import merge_adapter

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    out = merge_adapter(args.base, args.adapter, args.out, dtype)
    print(f"merged model: {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from packtune.run import run

    cfg = load_config(args.config, args.set)
    cfg.train.overwrite |= args.overwrite
    if args.quiet:
        cfg.train.progress = "none"
    run(cfg)
    return 0


def _check_checkpoint(args: argparse.Namespace) -> int:
    from packtune.checkpoint import check_checkpoints

    lines, ok = check_checkpoints(args.path)
    print("\n".join(lines))
    return 0 if ok else 1


def _check(args: argparse.Namespace) -> int:
    from packtune.check import run_check

    cfg = load_config(args.config, args.set)
    return 0 if run_check(cfg, full=args.full) else 1


def _demo(args: argparse.Namespace) -> int:
    from packtune.demo.run import run_demo

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_demo(args.out, quick=args.quick, seed=args.seed, model=args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="show versions, the C++ extension, and which backend each op uses")
    env.set_defaults(func=_env)
    prepare = sub.add_parser("prepare", help="tokenize (cached) and pack the data; print the data report")
    prepare.add_argument("config", help="a TOML run config")
    prepare.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value (repeatable)")
    prepare.add_argument("--report-json", metavar="FILE", help="also write the report as JSON")
    prepare.add_argument("--world-size", type=int, default=1, help="ranks the steps are counted for")
    prepare.set_defaults(func=_prepare)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    inspect = data.add_parser("inspect", help="the first records token by token, trained tokens marked")
    inspect.add_argument("config", help="a TOML run config")
    inspect.add_argument("--records", type=int, default=3, help="how many records of the first source")
    inspect.add_argument("--rows", type=int, help=argparse.SUPPRESS)  # the old name of --records
    inspect.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value (repeatable)")
    inspect.set_defaults(func=_data_inspect)
    plot = sub.add_parser("plot", help="loss, eval loss, lr and tokens/s curves of runs, overlaid")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (holding metrics.jsonl)")
    plot.add_argument("--out", required=True, metavar="FILE.png")
    plot.set_defaults(func=_plot)
    add_data_commands(data)
    add_eval_command(sub)
    bench = sub.add_parser("bench", help="side-by-side benchmarks (ce, linear-ce, pack, rope, ...)")
    bench.add_argument("subject")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the subject's own options (--help)")
    bench.set_defaults(func=_bench)
    gen = sub.add_parser("generate", help="continue a prompt with a Hugging Face model directory")
    gen.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true",
                     help="ask the prompt as a user turn in the model's own chat template (template auto)")
    gen.add_argument("--template", default=None,
                     help="raw (default: the prompt as given), auto, or a template as in [data] template; "
                          "rendered and tokenized exactly as in training")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    gen.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply to the model")
    gen.set_defaults(func=_generate)
    merge = sub.add_parser("merge",
                           help="merge a PEFT LoRA adapter into its base: a Hugging Face model directory")
    merge.add_argument("base", help="the base model directory")
    merge.add_argument("adapter",
                       help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("out", help="the merged model directory to write (atomically)")
    merge.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: the base checkpoint's dtype")
    merge.set_defaults(func=_merge)
    train = sub.add_parser(
        "train", help="fine-tune a model (also under torchrun --nproc_per_node N -m packtune train ...)"
    )
    train.add_argument("config", help="a TOML run configuration")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (TOML literal), repeatable")
    train.add_argument("--overwrite", action="store_true",
                       help="start a new run even if output_dir holds one: its contents are moved aside to "
                            "<output_dir>.replaced-<time> (never deleted); = train.overwrite")
    train.add_argument("--quiet", action="store_true", help="no progress output (= train.progress none)")
    train.set_defaults(func=_train)
    check = sub.add_parser("check", help="verify the loss on your model and data: packed == unpacked, "
                                         "k micro-batches == 1 batch, N ranks == 1 process (torchrun)")
    check.add_argument("config", help="a TOML run configuration")
    check.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (TOML literal), repeatable")
    check.add_argument("--full", action="store_true",
                       help="train the model itself (default: a shrunken copy of its config)")
    check.set_defaults(func=_check)
    check_ckpt = sub.add_parser(
        "check-checkpoint", help="verify a run's checkpoints against their manifests, without loading them")
    check_ckpt.add_argument("path", help="a run's output_dir, its checkpoints/ folder, or one checkpoint")
    check_ckpt.set_defaults(func=_check_checkpoint)
    demo = sub.add_parser("demo", help="train a tiny Llama (or T5) on generated tasks, report accuracy")
    demo.add_argument("--model", default="llama", choices=["llama", "t5"],
                      help="llama (a decoder) or t5 (an encoder-decoder trained on packed (prompt, answer) "
                           "pairs)")
    demo.add_argument("--out", default="runs/demo", help="folder for the data, tokenizer, run and model")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test run (accuracy not a goal)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0,
                      help="torch CPU threads (0: torch's default, one per core)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PacktuneError as e:  # one line; any other exception is a bug and keeps its traceback
        print(f"packtune {args.command}: {e.kind} error: {e}", file=sys.stderr)
        return e.exit_code
