"""A tiny causal LM and batches in the training loop's interfaces, for the loop's own tests.

`ToyLM` has the real model's surface (`hidden_states(input_ids, layout)`, `lm_head`, blocks in
`model.layers`, listed in `block_lists`) and, like attention, mixes tokens causally
*within* each sample only (a running mean), so packing mistakes change the loss.
`python toy_training.py OUTPUT_DIR [key=value ...]` runs a small training job (used by the
kill/resume/signal tests, which need a separate process).
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import torch
from torch import nn

from packtune.config import TrainConfig
from packtune.data.packing import PackedBatch, PaddedBatch, loss_weights
from packtune.kernels import PackedLayout


class ToyBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.down(nn.functional.silu(self.up(running_mean(x, cu_seqlens))))


def running_mean(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Causal mean over each sample's prefix: [B, L, H] rows, or [T, H] packed by cu_seqlens."""
    if cu_seqlens is None:
        steps = torch.arange(1, x.shape[-2] + 1, dtype=x.dtype, device=x.device).unsqueeze(-1)
        return x.cumsum(-2) / steps
    bounds = cu_seqlens.tolist()
    return torch.cat([running_mean(x[s:e], None) for s, e in zip(bounds[:-1], bounds[1:], strict=False)])


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 37, hidden: int = 16, layers: int = 2, max_pos: int = 64) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.model.embed_positions = nn.Embedding(max_pos, hidden)
        self.model.layers = nn.ModuleList(ToyBlock(hidden) for _ in range(layers))
        self.model.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    @property
    def block_lists(self) -> tuple[nn.ModuleList, ...]:  # the blocks the Trainer shards, as packtune's models
        return (self.model.layers,)

    def hidden_states(self, input_ids, layout):
        x = self.model.embed_tokens(input_ids) + self.model.embed_positions(layout.positions)
        for block in self.model.layers:
            x = block(x, layout.cu_seqlens)
        return self.model.norm(x)


def tiny_llama(*, tied: bool = False, seed: int = 0, vocab: int = 37, **dims):
    """The real packtune Llama at toy size (GQA, optionally tied embeddings), randomly initialised;
    `dims` (hidden_size, intermediate_size, head_dim, ...) replace the toy ones."""
    from packtune.model.config import ModelArgs
    from packtune.model.llama import LlamaForCausalLM

    toy = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    args = ModelArgs(vocab_size=vocab, tie_word_embeddings=tied, **{**toy, **dims})
    model = LlamaForCausalLM(args)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def tiny_gemma(*, seed: int = 0, vocab: int = 37):
    """packtune's model in Gemma 3 shape at toy size (GQA, tied, sandwich norms, GeGLU, q/k norms, a
    sliding window shorter than the samples with its own RoPE base, and Gemma 2's logit softcaps)."""
    from packtune.model.config import ModelArgs
    from packtune.model.llama import LlamaForCausalLM

    args = ModelArgs.from_hf_config(dict(
        model_type="gemma3_text", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=12,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}},
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
    ))
    model = LlamaForCausalLM(args)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def tiny_moe(*, seed: int = 0, vocab: int = 37, **dims):
    """packtune's model in Qwen3-MoE shape at toy size: 6 experts, top 2 renormalised, a dense layer
    between two sparse ones, GQA, per-head q/k norms; the router's load-balancing coefficient large
    enough (0.1) that its gradient shows in the grad norm. `dims` replace the toy config's keys."""
    from packtune.model.config import ModelArgs
    from packtune.model.families import build_model

    toy = dict(
        model_type="qwen3_moe", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_experts=6,
        num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[1],
        router_aux_loss_coef=0.1,
    )
    args = ModelArgs.from_hf_config({**toy, **dims})
    model = build_model(args)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def make_samples(n: int, *, vocab: int = 37, seed: int = 0, min_len: int = 3, max_len: int = 12,
                 turns: int = 1):
    """(ids, labels) pairs: `turns` rounds of a prompt of ignored labels, then a trained response;
    shifted labels (the label at t is token t+1 where that token is trained)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(max(min_len, 2 * turns), max_len + 1, (), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        if turns == 1:
            cuts = [int(torch.randint(1, length, (), generator=g))]
        else:  # prompt, response, prompt, ... boundaries
            cuts = sorted((torch.randperm(length - 1, generator=g)[: 2 * turns - 1] + 1).tolist())
        bounds = [*cuts, length]
        trained = torch.zeros(length, dtype=torch.bool)
        for start, end in zip(bounds[::2], bounds[1::2], strict=True):
            trained[start:end] = True
        labels = torch.full((length,), -100)
        labels[:-1] = torch.where(trained[1:], ids[1:], -100)
        samples.append((ids, labels))
    return samples


def weights_of(labels: torch.Tensor, lengths: list[int], weighting: str):
    """(loss weights or None, num_items) by packtune's host-side computation."""
    weights, count = loss_weights(labels.numpy(), np.array(lengths), weighting)
    return (None if weights is None else torch.from_numpy(weights)), count


def packed(samples, weighting: str = "token") -> PackedBatch:
    ids = torch.cat([s[0] for s in samples])
    labels = torch.cat([s[1] for s in samples])
    lengths = [len(s[0]) for s in samples]
    weights, count = weights_of(labels, lengths, weighting)
    return PackedBatch(ids, labels, PackedLayout.packed(lengths, labels), count, weights)


def padded(samples, weighting: str = "token") -> PaddedBatch:
    width = max(len(s[0]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    weights = None if weighting == "token" else torch.zeros(len(samples), width)
    count = 0
    for row, (i, lab) in enumerate(samples):
        ids[row, : len(i)] = i
        labels[row, : len(i)] = lab
        w, n = weights_of(lab, [len(i)], weighting)
        count += n
        if weights is not None:
            weights[row, : len(i)] = w
    layout = PackedLayout.padded([len(s[0]) for s in samples], labels)
    return PaddedBatch(ids, labels, layout, count, weights)


class ListSampler:
    """Resumable sampler over fixed steps (a list of micro-batch lists), reshuffled per epoch."""

    def __init__(self, steps: list[list[PackedBatch]], *, shuffle: bool = False, seed: int = 0) -> None:
        self.steps, self.shuffle, self.seed = steps, shuffle, seed
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return len(self.steps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = epoch, 0

    def __iter__(self):
        order = list(range(len(self.steps)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        while self.index < len(order):
            self.index += 1
            yield self.steps[order[self.index - 1]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def toy_steps(n_steps: int, micro_batches: int = 2, per_micro: int = 3, seed: int = 0,
              weighting: str = "token", turns: int = 1):
    samples = make_samples(n_steps * micro_batches * per_micro, seed=seed, turns=turns)
    rows = [packed(samples[i : i + per_micro], weighting) for i in range(0, len(samples), per_micro)]
    return [rows[i : i + micro_batches] for i in range(0, len(rows), micro_batches)]


def install_kill_hooks(kill_at: int = 0, kill_during_save: int = 0, pause_at: int = 0, kill_rank: int = -1
                       ) -> None:
    """SIGKILL this process once step `kill_at`'s metrics are written (only rank `kill_rank` when
    given), or after the checkpoint files of step `kill_during_save` are written but before its
    directory is renamed; or, once step `pause_at`'s metrics are written, create
    `<output_dir>.paused` and wait until it is deleted."""
    import time
    from pathlib import Path

    import packtune.checkpoint as ckpt
    from packtune.train import Trainer

    flush, dcp_save = Trainer._flush, ckpt.dcp.save
    paused = []

    def flush_then_die(self) -> None:
        flush(self)
        if self.step == kill_at and kill_rank in (-1, self.dist_ctx.rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step == pause_at and self.dist_ctx.is_main and not paused:
            paused.append(True)
            flag = Path(f"{self.output_dir}.paused")
            flag.touch()
            while flag.exists():
                time.sleep(0.05)

    def save_then_die(state, **kwargs):
        dcp_save(state, **kwargs)
        if int(os.path.basename(kwargs["checkpoint_id"]).split("_")[1].split(".")[0]) == kill_during_save:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._flush, ckpt.dcp.save = flush_then_die, save_then_die


def run_toy(output_dir: str, overrides: dict) -> int:
    """A toy run in this process: 3 epochs of 4 steps, checkpoints every 2 steps."""
    from packtune.parallel import init_distributed
    from packtune.train import Trainer

    cfg = TrainConfig(output_dir=output_dir, epochs=3, lr=1e-2, warmup=2, save_every=2, seed=0)
    for key, value in overrides.items():
        setattr(cfg, key, type(getattr(cfg, key))(value))
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, ToyLM(), ListSampler(toy_steps(4), shuffle=True), init_distributed("cpu"))
    resumed = trainer.resume()
    print(f"resumed from {resumed.name if resumed else None}", flush=True)
    trainer.fit()
    return 0


def main(argv: list[str]) -> int:
    """`toy_training.py [kill_at=N [kill_rank=R]] [kill_during_save=N] [pause_at=N] (OUTPUT_DIR
    [key=value ...] | cli ARGS...)`."""
    hooks = {}
    while argv and argv[0].startswith(("kill_", "pause_")):
        key, value = argv.pop(0).split("=")
        hooks[key] = int(value)
    install_kill_hooks(**hooks)
    if argv[0] == "cli":
        from packtune.cli import main as cli_main

        return cli_main(argv[1:])
    return run_toy(argv[0], dict(arg.split("=", 1) for arg in argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
