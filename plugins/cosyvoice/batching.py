"""Batched flow passes: the flow-matching decoders of several streams' passes run as one call.

Upstream's `flow.inference` takes one stream (batch 1) and calls its decoder (`CausalConditionalCFM.forward`), whose
Euler solver runs the estimator on a batch of 2 (the pass and its classifier-free-guidance twin). Here each stream's
thread still runs upstream's own `token2wav` (encoder, decoder call, vocoder with its own caches); only the decoder
call is routed: the members of a batch hand their decoder inputs to the batch, and one of them runs a single Euler
solve over all of them, batch 2N, each stream's input padded to the longest and masked past its own length, with
upstream's estimator (`forward_estimator`, unchanged). The vocoder stays per stream: each has its own mel and source
caches and cross-fade window, and its output length.

The estimator needs its padding masked: its convolutions are causal and its attention takes the mask, so what it
makes for a stream's own frames does not depend on the padding (checked against the pass alone by the tests).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .scheduler import Batch, BatchFailed, Stream

_LOGGER = logging.getLogger(__name__)


@dataclass
class DecoderCall:
    """One stream's call of the flow-matching decoder, as upstream's `flow.inference` makes it."""

    mu: Any
    mask: Any
    spks: Any
    cond: Any
    n_timesteps: int
    temperature: float
    streaming: bool

    def key(self) -> tuple[Any, ...]:
        """Calls that can share one solve: the same steps, temperature, attention and types."""
        return (self.n_timesteps, self.temperature, self.streaming, self.mu.dtype, self.spks.dtype, self.mu.device)


class DecoderRoute:
    """Installed on upstream's flow decoder: a thread whose pass is a member of a batch meets the others there;
    every other call goes to the decoder as before."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.original: Callable[..., Any] = decoder.forward
        self._local = threading.local()
        self.batched_calls = 0
        """Batched decoder calls run (two members or more)."""

    def install(self) -> None:
        self.decoder.forward = self.forward

    def join(self, batch: Optional[Batch], stream: Stream) -> None:
        """This thread's next decoder call belongs to `batch` (None: alone)."""
        self._local.member = None if batch is None else (batch, stream)

    def alone(self) -> None:
        """This thread's next decoder call runs alone (after a failed batch)."""
        self._local.member = None

    def forward(
        self,
        mu: Any,
        mask: Any,
        n_timesteps: int,
        temperature: float = 1.0,
        spks: Any = None,
        cond: Any = None,
        streaming: bool = False,
    ) -> Any:
        member = getattr(self._local, "member", None)
        if member is None or spks is None or cond is None:
            return self.original(mu, mask, n_timesteps, temperature, spks, cond, streaming=streaming)
        batch, stream = member
        self._local.member = None
        call = DecoderCall(mu, mask, spks, cond, n_timesteps, temperature, streaming)
        try:
            return batch.meet(stream, call, self._run)
        except BatchFailed as failed:
            _LOGGER.warning("%s; this stream's pass runs alone", failed)
            return self.original(mu, mask, n_timesteps, temperature, spks, cond, streaming=streaming)

    def _run(self, calls: list[DecoderCall]) -> list[Any]:
        """Each call's (feat, None), the calls that can share a solve solved together."""
        results: list[Any] = [None] * len(calls)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(call.key(), []).append(i)
        for indices in groups.values():
            if len(indices) == 1:
                c = calls[indices[0]]
                results[indices[0]] = self.original(
                    c.mu, c.mask, c.n_timesteps, c.temperature, c.spks, c.cond, streaming=c.streaming
                )
                continue
            feats = solve_batch(self.decoder, [calls[i] for i in indices])
            self.batched_calls += 1
            for i, feat in zip(indices, feats, strict=True):
                results[i] = (feat, None)
        return results


def solve_batch(cfm: Any, calls: list[DecoderCall]) -> list[Any]:
    """The fixed-step Euler solve of upstream's `CausalConditionalCFM` (its noise, its time schedule, its guidance
    rate) for several calls at once: the estimator sees the calls' conditioned inputs, then their unconditioned
    twins, 2N in all, each padded to the longest and masked. Returns each call's mel features (float32,
    [1, mels, its own length])."""
    import torch

    first = calls[0]
    n, lengths = len(calls), [int(c.mu.shape[2]) for c in calls]
    longest, mels, device = max(lengths), int(first.mu.shape[1]), first.mu.device
    dtype, spk_dim = first.spks.dtype, int(first.spks.shape[1])
    with torch.inference_mode():
        x = torch.zeros([n, mels, longest], device=device, dtype=first.mu.dtype)
        x_in = torch.zeros([2 * n, mels, longest], device=device, dtype=dtype)
        mask_in = torch.zeros([2 * n, 1, longest], device=device, dtype=dtype)
        mu_in = torch.zeros([2 * n, mels, longest], device=device, dtype=dtype)
        spks_in = torch.zeros([2 * n, spk_dim], device=device, dtype=dtype)
        cond_in = torch.zeros([2 * n, mels, longest], device=device, dtype=dtype)
        for i, (call, length) in enumerate(zip(calls, lengths, strict=True)):
            noise = cfm.rand_noise[:, :, :length].to(device).to(call.mu.dtype) * call.temperature
            x[i, :, :length] = noise[0]
            mask_in[i, :, :length] = call.mask[0, :, :length]
            mask_in[n + i, :, :length] = call.mask[0, :, :length]
            mu_in[i, :, :length] = call.mu[0]
            spks_in[i] = call.spks[0]
            cond_in[i, :, :length] = call.cond[0]
        t_span = torch.linspace(0, 1, first.n_timesteps + 1, device=device, dtype=first.mu.dtype)
        if cfm.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        t, dt = t_span[0].unsqueeze(dim=0), t_span[1] - t_span[0]
        t_in = torch.zeros([2 * n], device=device, dtype=dtype)
        rate = cfm.inference_cfg_rate
        for step in range(1, len(t_span)):
            x_in[:n] = x
            x_in[n:] = x
            t_in[:] = t.unsqueeze(0)
            dphi = cfm.forward_estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, first.streaming)
            cond_dphi, uncond_dphi = torch.split(dphi, [n, n], dim=0)
            x = x + dt * ((1.0 + rate) * cond_dphi - rate * uncond_dphi)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        out = x.float()
    return [out[i : i + 1, :, :length].clone() for i, length in enumerate(lengths)]


def batchable(decoder: Any) -> Optional[str]:
    """Why the decoder's passes cannot be batched here (None: they can): the estimator must be a PyTorch module
    (a TensorRT plan is built for batch 2) and the solver upstream's fixed-noise Euler one."""
    import torch

    if decoder is None:
        return "the model's flow has no decoder this engine knows"
    estimator = getattr(decoder, "estimator", None)
    if not isinstance(estimator, torch.nn.Module):
        return "the flow estimator is not a PyTorch module (TensorRT plans are built for one pass at a time)"
    for name in ("rand_noise", "forward_estimator", "t_scheduler", "inference_cfg_rate"):
        if not hasattr(decoder, name):
            return f"upstream's flow decoder has no {name}"
    return None
