"""The data report: what was read, kept, dropped or truncated (with reasons), and how well it packs.

`packtune prepare` prints it and writes it as JSON; training prints the same report before step 1.
"""

from __future__ import annotations

from typing import Any


def data_report(dataset, rows, world_size: int = 1, micro_batches: int = 1,
                split: str = "all samples", context_parallel: int = 1) -> dict[str, Any]:
    """The tokenization report of `dataset` (all the data read) plus packing figures for `rows`
    (packed or padded) of the split named by `split` (e.g. the training split when some samples
    are held out). `world_size` counts the ranks that get rows of their own (the dp ranks); with
    `context_parallel` > 1 the report adds how the rows split into chunks."""
    from packtune.context_parallel import chunk_layouts
    from packtune.data.packing import PackedRows, PaddedRows

    group = world_size * micro_batches
    rows = rows.with_row_multiple(group)
    report = {k: v for k, v in dataset.report.items()}
    report.update(
        {
            "packing": "padded" if isinstance(rows, PaddedRows) else "packed",  # pairs: packed too
            "packed_rows": len(rows),
            "packing_efficiency": rows.efficiency,
            "steps_per_epoch": len(rows) // group,
            "world_size": world_size,
            "micro_batches": micro_batches,
            "split": split,
        }
    )
    if hasattr(rows, "side_efficiency"):  # pairs: each side's packing (data/pair_rows.py)
        inputs, targets = rows.side_efficiency()
        report.update(packing_efficiency_inputs=inputs, packing_efficiency_targets=targets,
                      max_target_tokens=rows.max_target_tokens)
    if context_parallel > 1 and isinstance(rows, PackedRows):
        report["context_parallel"] = context_parallel
        report["chunk_layouts"] = chunk_layouts(rows, context_parallel)
    return report


def format_report(report: dict[str, Any]) -> str:
    tokens, labels = report["tokens"], report["label_tokens"]
    dropped = sum(report["dropped"].values())
    truncated = sum(report["truncated"].values())
    sources = report.get("sources", [])
    weighted = " after source weights" if any(s["weight"] != 1 for s in sources) else ""
    kept = f"{report['pairs']} pairs kept" if "pairs" in report else f"{report['kept']} kept"
    lines = [
        f"data: {report['rows']} records read{weighted} ({report.get('format', '?')} format, "
        f"{report.get('template', '?')} template), {kept}, {dropped} dropped, "
        f"{truncated} truncated",
    ]
    if len(sources) > 1 or weighted:
        lines += [
            f"  source {s['path']} ({s['format']}, weight {s['weight']:g}): {s['read']} records in the file, "
            f"{s['rows']} after weighting, {s['kept']} kept"
            for s in sources
        ]
    lines += [f"  dropped  {n:>8}  {reason}" for reason, n in report["dropped"].items()]
    lines += [f"  truncated{n:>8}  {reason}" for reason, n in report["truncated"].items()]
    lines += [f"  skipped: {e}" for e in report.get("errors", [])]
    lines.append(f"  tokens {tokens}, label tokens {labels} ({100 * labels / max(tokens, 1):.1f}% trained)")
    if "bos_id" in report:
        lines.append(
            f"  special tokens: BOS {report['bos_id']}, EOS {report['eos_id']}, "
            f"end of turn {report['end_of_turn_ids']}; {report['rows_with_straddling_tokens']} samples "
            "have a token across a prompt/answer boundary (trained: it holds answer characters); "
            f"{report['rows_checked_against_reference']} samples checked against the reference"
        )
    if "packing_efficiency" in report:
        lines.append(
            f"  {report.get('split', 'all samples')}: {report['packing']} rows {report['packed_rows']} "
            f"of max {report['max_tokens']} tokens: "
            f"efficiency {100 * report['packing_efficiency']:.2f}% real tokens per slot, "
            f"{report['steps_per_epoch']} steps per epoch ({report['world_size']} rank(s) x "
            f"{report['micro_batches']} micro-batch(es))"
        )
    if "packing_efficiency_targets" in report:
        lines.append(
            f"  pairs: each row holds at most {report['max_tokens']} input and "
            f"{report['max_target_tokens']} target tokens; efficiency "
            f"{100 * report['packing_efficiency_inputs']:.2f}% of the inputs' slots (encoder), "
            f"{100 * report['packing_efficiency_targets']:.2f}% of the targets' (decoder)"
        )
    if "chunk_layouts" in report:
        n = report["context_parallel"]
        spans = ", ".join(f"{count} with a sample over {k} chunks" if k > 1 else f"{count} with none"
                          for k, count in sorted(report["chunk_layouts"].items()))
        chunk = report["max_tokens"] // n
        lines.append(f"  context parallel: each row split into {n} chunks of up to {chunk} tokens; rows by "
                     f"samples crossing a chunk boundary: {spans}")
    if "pairs" in report:
        saved, unshared = report.get("shared_prompt_tokens_saved", 0), report.get("unshared_tokens", 0)
        line = f"  preference pairs {report['pairs']} (each a chosen and a rejected sample)"
        if saved:
            line += (f"; shared prompts: {saved} tokens saved, {100 * saved / max(unshared, 1):.1f}% of the "
                     "tokens unshared rows would hold")
        lines.append(line)
    if report.get("cache"):
        seconds = report.get("load_seconds", report.get("tokenize_seconds", 0.0))
        lines.append(f"  cache {report['cache']} ({seconds:.2f} s)")
    return "\n".join(lines)
