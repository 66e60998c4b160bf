"""`packtune eval`: answer held-out instruction records with a model and score the answers.

Records are in any layout training reads (Alpaca, messages, ShareGPT, prompt/completion): the last
assistant turn is the reference, everything before it the prompt, asked in the training template
(or the model's chat template: `auto`). A record's `task` adds a per-task line, its `options` (a
list, as `packtune data templatize` writes) option accuracy. Answers come from batched greedy
generation (`generate_answers`), which gives the same answers whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from packtune.data.formats import DEFAULT_FIELDS, Message, detect_format, to_conversation
from packtune.data.prompt import PromptEncoder
from packtune.datatools.jsonl_files import read_records, write_json
from packtune.datatools.local_generation import generate_answers
from packtune.datatools.scoring import EvalReport, score_predictions
from packtune.errors import DataError
from packtune.model.families import encoder_decoder
from packtune.model.generate import DEFAULT_BATCH_SIZE

if TYPE_CHECKING:
    from packtune.parallel import DistContext


def eval_records(path: str | Path, limit: int = 0) -> tuple[list[list[Message]], list[dict[str, Any]]]:
    """(prompt conversation, record with `output` = the reference) of the first `limit` records (0: all)."""
    conversations, records = [], []
    for where, record in read_records(path):
        if limit and len(records) == limit:
            break
        conv = to_conversation(record, detect_format(record, DEFAULT_FIELDS, where), DEFAULT_FIELDS, where)
        messages = list(conv.messages)
        if len(messages) < 2 or messages[-1].role != "assistant":
            raise DataError(f"{where}: an eval record ends with the answer (an assistant turn) after a "
                            "prompt", "wrong_type")
        conversations.append(messages[:-1])
        kept = ("task", "options", "instruction", "input")
        records.append({**{k: v for k, v in record.items() if k in kept},
                        "prompt": messages[-2].content, "output": messages[-1].content})
    if not records:
        raise DataError(f"{path}: no records to evaluate", "empty_file")
    return conversations, records


def holds_preference_pairs(path: str | Path) -> bool:
    """Whether the first record of `path` is a preference pair (chosen / rejected)."""
    for where, record in read_records(path):
        return detect_format(record, DEFAULT_FIELDS, where) == "preference"
    return False


def evaluate_model(model: torch.nn.Module, prompts: PromptEncoder, conversations: Sequence[Sequence[Message]],
                   records: Sequence[dict[str, Any]], max_new_tokens: int,
                   normalization: str = "squad", batch_size: int = DEFAULT_BATCH_SIZE) -> EvalReport:
    """Greedy answers to `conversations` (batched generation), scored against `records`."""
    predictions = generate_answers(model, prompts, conversations, max_new_tokens, batch_size=batch_size)
    return score_predictions(records, predictions, normalization)


def run_eval(model_dir: str | Path, data: str | Path, *, template: str = "auto", limit: int = 0,
             max_new_tokens: int = 128, json_out: str | Path | None = None, normalization: str = "squad",
             device: str | None = None, dtype: str = "auto",
             batch_size: int = DEFAULT_BATCH_SIZE) -> EvalReport:
    """Load `model_dir`, answer and score `data`; with `json_out`, write every prediction there."""
    from packtune.model.loading import load_for_inference

    conversations, records = eval_records(data, limit)
    model = load_for_inference(model_dir, dtype, device)
    prompts = PromptEncoder(model_dir, template, encoder_decoder(model))
    report = evaluate_model(model, prompts, conversations, records, max_new_tokens, normalization, batch_size)
    if json_out:
        write_json(json_out, {"model": str(model_dir), "data": str(data), "template": template,
                              "normalization": normalization, **report.to_dict(with_predictions=True)})
    return report


class TrainingEval:
    """`[train] eval_data`: the records loaded once, scored with the model being trained; answers may
    run a few tokens past the longest reference. With several ranks, rank r answers records r, r + n,
    ...; the answers are gathered and every rank scores all records, as one process would."""

    def __init__(self, data: str | Path, tokenizer_path: str | Path, template: str,
                 encoder_decoder: bool = False) -> None:
        self.conversations, self.records = eval_records(data)
        self.prompts = PromptEncoder(tokenizer_path, template, encoder_decoder)
        longest = max(len(self.prompts.tokenizer.encode_text(r["output"])) for r in self.records)
        self.max_new_tokens = longest + 8

    def __call__(self, model: torch.nn.Module, dist_ctx: DistContext | None = None) -> dict[str, Any]:
        """The scores of `model`'s answers; under FSDP, call it inside `gathered_parameters`."""
        rank, world = (0, 1) if dist_ctx is None else (dist_ctx.rank, dist_ctx.world_size)
        mine = generate_answers(model, self.prompts, self.conversations[rank::world], self.max_new_tokens)
        by_rank = [mine] if dist_ctx is None else dist_ctx.all_gather_texts(mine)
        predictions = [by_rank[i % world][i // world] for i in range(len(self.records))]
        return score_predictions(self.records, predictions).to_dict()
