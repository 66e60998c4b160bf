"""PackedCollator: label conventions, no prediction across a sample boundary, input forms, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from packtune.integrations import PackedCollator, pack_samples

SAMPLES = [
    {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]},
    {"input_ids": [9], "loss_mask": [1]},
    {"input_ids": [10, 11, 12], "loss_mask": [1, 1, 1]},
]


def _sample_of(cu: torch.Tensor, t: int) -> int:
    return int(torch.searchsorted(cu[1:].long(), torch.tensor(t), right=True))


def test_batch_layout_and_both_label_conventions():
    b = PackedCollator()(SAMPLES)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 0, 1, 2]]
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"].tolist() == [0, 4, 5, 8]
    assert b["max_seqlen"] == 4 and isinstance(b["max_seqlen"], int)
    # packtune's convention: label at t = token t+1 of the same sample; -100 on each sample's last position
    assert b["shift_labels"].tolist() == [[-100, 7, 8, -100, -100, 11, 12, -100]]
    # Hugging Face's convention: the token itself where trained, -100 on each sample's first token
    assert b["labels"].tolist() == [[-100, -100, 7, 8, -100, -100, 11, 12]]
    # transformers shifts labels inside its loss: that shift gives exactly shift_labels
    hf_shift = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[..., 1:]
    assert torch.equal(hf_shift, b["shift_labels"])
    assert b["num_label_tokens"] == 4 == int((b["shift_labels"] != -100).sum())


def test_no_token_predicts_across_a_sample_boundary():
    gen = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(40):
        n = int(torch.randint(1, 20, (), generator=gen))
        samples.append(
            {
                "input_ids": torch.randint(0, 1000, (n,), generator=gen).tolist(),
                "labels": torch.randint(0, 1000, (n,), generator=gen).tolist(),
            }
        )  # every token trained
    b = PackedCollator(batch_dim=False)(samples)
    ids, shift, cu = b["input_ids"], b["shift_labels"], b["cu_seqlens"]
    assert ids.dim() == 1
    for t in torch.nonzero(shift != -100)[:, 0].tolist():
        assert _sample_of(cu, t) == _sample_of(cu, t + 1), f"position {t} predicts into the next sample"
    ends = cu[1:].long() - 1
    assert (shift[ends] == -100).all()
    # every within-sample target is the sample's own label of the next token
    flat_labels = np.concatenate([s["labels"] for s in samples])
    inside = torch.ones_like(shift, dtype=torch.bool)
    inside[ends] = False
    assert torch.equal(shift[inside], torch.from_numpy(flat_labels)[1:][inside[:-1]])


def test_input_forms_agree():
    by_mask = PackedCollator()(SAMPLES)
    by_labels = PackedCollator()(
        [
            {
                "input_ids": s["input_ids"],
                "labels": [t if m else -100 for t, m in zip(s["input_ids"], s["loss_mask"], strict=True)],
            }
            for s in SAMPLES
        ]
    )
    by_prompt = PackedCollator()(
        [
            {"prompt_ids": [5, 6], "completion_ids": [7, 8]},
            {"prompt_ids": [], "response_ids": [9]},
            {"prompt_ids": [], "completion_ids": torch.tensor([10, 11, 12])},
        ]
    )
    by_trl_mask = PackedCollator()(
        [{"input_ids": s["input_ids"], "completion_mask": s["loss_mask"]} for s in SAMPLES]
    )
    rows = PackedCollator()([SAMPLES[:2], SAMPLES[2:]])  # pre-packed rows are flattened
    for other in (by_labels, by_prompt, by_trl_mask, rows):
        for key in ("input_ids", "labels", "shift_labels", "position_ids", "cu_seqlens"):
            assert torch.equal(other[key], by_mask[key]), key
    unmasked = PackedCollator()([{"input_ids": [1, 2, 3]}])
    assert unmasked["shift_labels"].tolist() == [[2, 3, -100]]


def test_packed_batch_is_packtunes_contract():
    pb = PackedCollator().packed_batch(SAMPLES)
    b = PackedCollator(batch_dim=False)(SAMPLES)
    assert torch.equal(pb.labels, b["shift_labels"]) and torch.equal(pb.input_ids, b["input_ids"])
    assert pb.num_label_tokens == 4 and pb.layout.max_seqlen == 4 and b["packed_layout"].num_label_rows == 4


def test_works_in_a_dataloader():
    loader = torch.utils.data.DataLoader(SAMPLES * 4, batch_size=3, collate_fn=PackedCollator())
    batches = list(loader)
    assert len(batches) == 4
    assert sum(b["num_label_tokens"] for b in batches) == 16


def test_pack_samples_rows():
    gen = torch.Generator().manual_seed(0)
    samples = [{"input_ids": list(range(int(n)))} for n in torch.randint(1, 30, (50,), generator=gen)]
    rows = pack_samples(samples, max_tokens=64)
    assert sorted(id(s) for row in rows for s in row) == sorted(id(s) for s in samples)
    assert all(sum(len(s["input_ids"]) for s in row) <= 64 for row in rows)
    total = sum(len(s["input_ids"]) for s in samples)
    assert len(rows) <= -(-total // 64) + 1  # best-fit decreasing packs these nearly perfectly
    with pytest.raises(ValueError, match="sample 0 has 5 tokens, more than max_tokens=4"):
        pack_samples([{"input_ids": [1] * 5}], max_tokens=4)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"labels": [1, 2]}, "needs input_ids"),
        ({"input_ids": [1, 2], "labels": [1]}, "labels has 1 entries, input_ids 2"),
        ({"input_ids": [1, 2], "loss_mask": [1]}, "loss_mask has 1 entries"),
        ({"input_ids": []}, "no tokens"),
        ({"input_ids": [[1, 2]]}, "flat list of integers"),
        ({"prompt_ids": [1]}, "completion_ids or response_ids"),
        ("text", "expected a dict"),
    ],
)
def test_bad_samples_are_named(bad, message):
    with pytest.raises((ValueError, KeyError, TypeError), match=message):
        PackedCollator()([SAMPLES[0], bad])


def test_max_tokens_is_enforced():
    with pytest.raises(ValueError, match="8 tokens exceed max_tokens=6"):
        PackedCollator(max_tokens=6)(SAMPLES)
