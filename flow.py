"""The rectified-flow training objective of PixNerd (paper Sec. 3.1 and Sec. 4;
official src/diffusion/flow_matching/training_repa.py: REPATrainer), with REPA alignment to DINOv2
features.

Convention (the official code's, opposite to the paper's notation): t = 0 is pure noise,
t = 1 is data, x_t = t x + (1 - t) eps, and the network predicts v = x - eps.
Imports only torch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def time_shift(t, shift):
    """t / (t + (1 - t) shift): shift > 1 moves t towards the noise end (t = 0)."""
    return t / (t + (1 - t) * shift)


def sample_t(n, mean=0.0, std=1.0, shift=1.0, device=None, generator=None):
    """Lognorm timesteps t = sigmoid(N(mean, std)) (SD3), drawn in fp32, then time-shifted.
    c2i uses shift 1; the official t2i uses 2 at 256 px and 4 at 512 px."""
    z = torch.randn(n, device=device, generator=generator) * std + mean
    return time_shift(torch.sigmoid(z), shift)


def drop_condition(y, null, p, generator=None):
    """Replace each sample's condition by the null one with probability p (CFG training).
    y: (B,) labels with null the null-class index, or a tuple (text features (B, L, d), mask
    (B, L)) with null the empty prompt's (1, L, d) and (1, L): one draw serves every member."""
    if not isinstance(y, tuple):
        return drop_condition((y,), (null,), p, generator)[0]
    drop = torch.rand(y[0].shape[0], device=y[0].device, generator=generator) < p
    return tuple(torch.where(drop.view(-1, *[1] * (v.dim() - 1)), n, v)
                 for v, n in zip(y, null))


class REPAProjector(nn.Sequential):
    """Maps transformer hidden states to the DINOv2 feature width: Linear-SiLU-Linear-SiLU-Linear."""

    def __init__(self, dim, feature_dim=768):
        super().__init__(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(),
                         nn.Linear(dim, feature_dim))


def repa_loss(h, target):
    """1 - cos(h, target) per token, averaged over batch and tokens. h: (B, N, d), target (B, N', d);
    extra denoiser tokens are dropped when the counts differ, as the official code does."""
    h = h[:, : target.shape[1]]
    return (1 - F.cosine_similarity(h.float(), target.float(), dim=-1)).mean()


def training_losses(model, x, y, null=None, p_uncond=0.1, t=None, noise=None, t_mean=0.0,
                    t_std=1.0, t_shift=1.0, projector=None, repa_target=None, repa_weight=0.5,
                    generator=None, **model_kwargs):
    """The loss terms for one batch of clean images x in [-1, 1] with conditions y (labels, or a
    tuple (text features, text mask) passed to the model as its third and fourth arguments).

    Returns a dict: "fm" (the flow-matching MSE), "repa" (when repa_target is given) and
    "loss" = fm + repa_weight * repa. t and noise may be given (tests); otherwise they are drawn.
    """
    if null is not None and p_uncond > 0:
        y = drop_condition(y, null, p_uncond, generator)
    if t is None:
        t = sample_t(x.shape[0], t_mean, t_std, t_shift, x.device, generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    tb = t.view(-1, 1, 1, 1)  # not rounded to a 16-bit x's dtype: the model gets this t
    x_t = (tb * x + (1 - tb) * noise).to(x.dtype)  # Eq. 1 with alpha_t = t, sigma_t = 1 - t
    target = x - noise                             # its velocity dx_t/dt
    cond = y if isinstance(y, tuple) else (y,)  # labels, or (text features, text mask)
    out = model(x_t, t, *cond, return_align=repa_target is not None, **model_kwargs)
    v, h = out if repa_target is not None else (out, None)
    losses = {"fm": F.mse_loss(v.float(), target.float())}
    losses["loss"] = losses["fm"]
    if repa_target is not None:
        losses["repa"] = repa_loss(projector(h), repa_target)
        losses["loss"] = losses["fm"] + repa_weight * losses["repa"]
    return losses


class Objective(nn.Module):
    """The model and the REPA projector under one module, so DDP syncs both: forward = training_losses."""

    def __init__(self, model, projector=None):
        super().__init__()
        self.model, self.projector = model, projector

    def forward(self, x, y, **kw):
        return training_losses(self.model, x, y, projector=self.projector, **kw)
