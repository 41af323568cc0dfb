"""A layer run shared by the engine and kernel tests: outputs and the gradients of a fixed loss."""

import torch


def run_layer(layer, current, num_steps, engine_name, spikes_only=False, recompute=False, mem_loss=True):
    """Spikes, membrane (None for the spikes-only path) and the gradients of a fixed loss.

    The loss weighs spikes and (with ``mem_loss``) membranes with fixed random weights.
    """
    current = current.clone().requires_grad_()
    if spikes_only:
        spikes, mem = layer.spikes(current, num_steps, recompute=recompute), None
    else:
        spikes, mem = layer(current, num_steps, engine_name)
    weights = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(1)).to(current)
    loss = (spikes * weights).sum()
    if mem is not None and mem_loss:
        loss = loss + 0.1 * (mem * weights.flip(0)).sum()
    inputs = [current, *layer.parameters()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    # snnTorch gives None for a parameter that has no effect; the fused engine gives zeros.
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]
    return spikes.detach(), None if mem is None else mem.detach(), grads


def assert_grads_close(grads, expected):
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
