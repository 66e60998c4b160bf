"""Activation offload on the CPU, where the hooks run as copies: what moves (every checkpointed block's
input, no parameter), that the backward gets it back bit for bit with the one saved before it
prefetched (at most two copies back at a time), and a Trainer with offload logging exactly the
losses and gradient norms of one without."""

import io
import json

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from toy_training import ListSampler, tiny_llama, toy_steps

from packtune.config import TrainConfig
from packtune.loss import CausalLMLoss
from packtune.offload import ActivationOffload, _Offloaded
from packtune.parallel import init_distributed
from packtune.train import Trainer


def checkpointed_llama(layers: int = 3):
    model = tiny_llama(seed=2, num_hidden_layers=layers)
    for i, block in enumerate(model.decoder_layers):
        model.decoder_layers[i] = checkpoint_wrapper(block)
    return CausalLMLoss(model)


def grads_of(module, batch, offload=None):
    module.zero_grad(set_to_none=True)
    args = (batch.input_ids, batch.labels, batch.layout)
    if offload is None:
        loss = module(*args)
    else:
        with offload:
            loss = module(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def test_offloaded_forward_and_backward_are_exact():
    module = checkpointed_llama()
    batch = toy_steps(1, micro_batches=1, per_micro=5, seed=1)[0][0]
    loss, grads = grads_of(module, batch)

    offload = ActivationOffload(torch.device("cpu"))
    unpacked, prefetched = [], []
    unpack = offload.unpack

    def logged_unpack(entry):
        if isinstance(entry, _Offloaded):
            unpacked.append(entry.index)
            prefetched.append(entry.device_copy is not None)
        out = unpack(entry)
        assert sum(e.device_copy is not None for e in offload.saved) <= 1  # + the one handed back
        return out

    offload.unpack = logged_unpack
    offload_loss, offload_grads = grads_of(module, batch, offload)
    assert torch.equal(offload_loss, loss)
    for name, g in grads.items():
        assert torch.equal(offload_grads[name], g), name

    tokens, hidden = batch.input_ids.numel(), 32
    # saved in order: the token ids, the 3 blocks' inputs, the final norm's input, ..., the loss's gradients
    block_inputs = [e for e in offload.saved if e.host.shape == (tokens, hidden)][:3]
    assert [e.index for e in block_inputs] == [1, 2, 3]
    params = {p.data_ptr() for p in module.parameters()}
    assert all(e.host.data_ptr() not in params for e in offload.saved)
    assert offload.offloaded_bytes >= 3 * tokens * hidden * 4
    assert sorted(unpacked) == list(range(len(offload.saved)))  # each came back once
    # the backward finds each block's input already on its way back (all but the first it needs)
    assert all(prefetched[unpacked.index(e.index)] for e in block_inputs[:-1])


def run(output_dir, **overrides):
    cfg = TrainConfig(output_dir=str(output_dir), max_steps=3, lr=1e-2, warmup=1,
                      activation_checkpointing=True, **overrides)
    torch.manual_seed(0)
    trainer = Trainer(cfg, tiny_llama(seed=3), ListSampler(toy_steps(3, seed=4)), init_distributed("cpu"),
                      log_stream=io.StringIO())
    trainer.fit()
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, lines)], trainer


def test_trainer_with_offload_equals_without(tmp_path):
    plain, _ = run(tmp_path / "plain")
    offloaded, trainer = run(tmp_path / "offload", offload_activations=True)
    assert trainer.offload is not None and trainer.offload.offloaded_bytes > 0
    assert offloaded == plain
