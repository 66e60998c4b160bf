"""Activation offload: what the forward saves for the backward, held in host memory in between.

With activation checkpointing, what a decoder's forward keeps for the backward is, per block, the
block's input (`[tokens x hidden]`: non-reentrant checkpointing saves a block's inputs, and only
them, through autograd's saved-tensor mechanism) plus the few tensors of the root (the final norm's
input, the fused loss's gradients). `ActivationOffload` is a `torch.autograd.graph.saved_tensors_hooks`
context around the forward: each tensor saved outside a checkpointed block is copied to pinned host
memory as it is saved, so the device holds only the block being computed; in the backward each is
copied back when autograd asks for it, and the copy of the one saved before it (the next the
backward needs) starts at once on a side stream, so at most two come back at a time (double
buffering) and the transfer overlaps the backward of the block in between. Inside a checkpointed
block the checkpoint's own hooks take precedence (they keep nothing), so the tiled MLP's and the
attention's recomputed tensors never leave the device.

On CUDA the copies run on a side stream with events; the device memory of a saved tensor is
released once its copy is done (`record_stream`). On the CPU the same hooks run, with plain copies
in place of the transfers: the host copy is a new tensor and the tensor handed back another one,
so the logic (which tensors, in which order, prefetched when) is the one tested here, exactly.
Parameters (FSDP's unsharded ones included) and tensors on another device are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Offloaded:
    """One saved tensor in host memory: its index in saving order and, while prefetched, the
    device copy on its way back (with the event that marks its arrival on CUDA)."""

    index: int
    host: torch.Tensor
    device_copy: torch.Tensor | None = None
    fetched: bool = False
    """Handed back to autograd at least once."""
    ready: torch.cuda.Event | None = field(default=None, repr=False)


class ActivationOffload:
    """`with offload:` around a training forward (see the module docstring). One instance serves
    every forward of a run; each forward's saved tensors are its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.saved: list[_Offloaded] = []
        """This forward's offloaded tensors, in saving order."""
        self.offloaded_bytes = 0
        """Bytes copied to the host by the current (last) forward."""
        self.prefetched: _Offloaded | None = None
        """The one saved tensor on its way back ahead of its use."""
        self._hooks = None

    def __enter__(self) -> ActivationOffload:
        self.saved, self.offloaded_bytes, self.prefetched = [], 0, None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    def _moves(self, tensor: torch.Tensor) -> bool:
        return tensor.device == self.device and not isinstance(tensor, nn.Parameter)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Offloaded:
        if not self._moves(tensor):
            return tensor
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host = torch.empty_like(tensor, device="cpu", pin_memory=True)
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # its memory is reused only after the copy
        else:
            host = tensor.clone()
        entry = _Offloaded(len(self.saved), host)
        self.saved.append(entry)
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        """Start bringing `entry` back to the device (on the side stream on CUDA)."""
        if entry.device_copy is not None:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                entry.device_copy = torch.empty_like(entry.host, device=self.device)
                entry.device_copy.copy_(entry.host, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(self.stream)
        else:
            entry.device_copy = entry.host.clone()

    def unpack(self, entry: torch.Tensor | _Offloaded) -> torch.Tensor:
        if not isinstance(entry, _Offloaded):
            return entry
        self._fetch(entry)
        tensor, entry.device_copy = entry.device_copy, None
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry.ready)
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        entry.fetched = True
        if self.prefetched is None or self.prefetched.fetched:  # one copy on its way at a time
            self.prefetched = next((e for e in reversed(self.saved[: entry.index]) if not e.fetched), None)
            if self.prefetched is not None:  # the newest one saved before: what the backward needs next
                self._fetch(self.prefetched)
        return tensor
