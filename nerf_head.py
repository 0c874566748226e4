"""The patch-wise neural field of PixNerd (paper Sec. 3.2: Eq. 9-11; the encodings of Eq. 7 and 12).

The transformer's last hidden state s of each patch predicts the weights of a small MLP
(Eq. 9). The weights are row-wise normalised, and the MLP maps every pixel's coordinate encoding
(Eq. 12) together with its noisy pixel value to features (Eq. 10), which a shared linear layer
decodes to the pixel's velocity (Eq. 11). All patches are decoded at once with batched matrix
products over (patches, pixels, channels).

A patch can be decoded at P' != 16 pixels per side by sampling the coordinate encoding at P'
points: that is the training-free arbitrary-resolution trick of the paper (Fig. 3).

Imports only torch, so this file can be copied out on its own.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain. The statistics are computed in fp32 and the result is cast
    back to the input dtype before the gain: the official code returns fp32 under bf16 autocast,
    we keep the activation dtype (identical in fp32, faster in bf16)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Coordinate encodings (Eq. 7 and Eq. 12). Each returns (P_h * P_w, 64) for pixels in row-major
# order p = r * P_w + c. A few hundred numbers: recomputed on each call, no cache to go stale.
# ---------------------------------------------------------------------------------------------

def coordinate_encoding(kind, ph, pw, device=None, dtype=torch.float32):
    """Coordinate encoding of a ph x pw patch, shape (ph*pw, 64).

    kind:
      "dct"    paper Eq. 12 as the official c2i code computes it (pixnerd_c2i.py:
               NerfEmbedder.fetch_pos), the released checkpoints' encoding. Coordinates are
               endpoint-inclusive, u = c/(P-1); the 8 frequencies are linspace(0, 8, 8), which
               are not integers; each product is damped by 1/(1 + f_a f_b). Feature k = 8a + b,
               a indexes the column (x) frequency, b the row (y) frequency.
      "dct2"   the textbook orthonormal DCT-II basis, lowest 8x8 frequencies (paper Fig. 6d
               ablation; not what the released checkpoints use).
      "sincos" the NeRF-style sine/cosine encoding of Eq. 7 (paper Fig. 6d ablation): 16
               frequencies, sin and cos, for x and y.
      "cos"    the official text-to-image encoding (pixnerd_t2i.py, from
               layers/rope.py: precompute_freqs_cis_ex2d): separable cosines
               feat[2j] = cos(X w_j), feat[2j+1] = cos(Y w_j), w_j = 1e4^(-j/32), X and Y on
               linspace(0, 16, P). The official code gets it by casting a complex RoPE table to
               real, which drops the sines.
    """
    f32 = dict(dtype=torch.float32, device=device)
    if kind == "dct":  # Eq. 12 as the official code computes it
        u = torch.linspace(0, 1, pw, **f32)                      # column coordinate
        v = torch.linspace(0, 1, ph, **f32)                      # row coordinate
        f = torch.linspace(0, 8, 8, **f32)                       # 8 frequencies
        cx = torch.cos(math.pi * f[None, :] * u[:, None])        # (pw, 8a)
        cy = torch.cos(math.pi * f[None, :] * v[:, None])        # (ph, 8b)
        damp = 1.0 / (1.0 + f[:, None] * f[None, :])             # (8a, 8b)
        phi = cy[:, None, None, :] * cx[None, :, :, None] * damp  # (ph, pw, a, b)
    elif kind == "dct2":
        def basis(n):
            x = torch.arange(n, **f32)
            k = torch.arange(8, **f32)
            b = torch.cos(math.pi * k[None, :] * (x[:, None] + 0.5) / n) * math.sqrt(2.0 / n)
            b[:, 0] /= math.sqrt(2.0)
            return b                                             # (n, 8), orthonormal columns
        phi = basis(ph)[:, None, None, :] * basis(pw)[None, :, :, None]
    elif kind == "sincos":  # Eq. 7
        f = math.pi * torch.arange(1, 17, **f32) / 2             # 16 frequencies, up to 8 cycles
        u = torch.linspace(0, 1, pw, **f32)[:, None] * f          # (pw, 16)
        v = torch.linspace(0, 1, ph, **f32)[:, None] * f          # (ph, 16)
        ex = torch.cat([u.sin(), u.cos()], -1)                    # (pw, 32)
        ey = torch.cat([v.sin(), v.cos()], -1)                    # (ph, 32)
        phi = torch.cat([ex[None].expand(ph, -1, -1), ey[:, None].expand(-1, pw, -1)], -1)
    elif kind == "cos":
        w = 10000.0 ** (-torch.arange(32, **f32) / 32)
        X = torch.linspace(0, 16, pw, **f32)[None, :, None] * w   # (1, pw, 32)
        Y = torch.linspace(0, 16, ph, **f32)[:, None, None] * w   # (ph, 1, 32)
        phi = torch.stack([X.cos().expand(ph, -1, -1), Y.cos().expand(-1, pw, -1)], -1)
    else:
        raise ValueError(f"unknown coordinate encoding {kind!r}: use dct, dct2, sincos or cos")
    return phi.reshape(ph * pw, 64).to(dtype)


# ---------------------------------------------------------------------------------------------
# The neural field
# ---------------------------------------------------------------------------------------------

def no_autocast(x):
    """Autocast off on x's device (meta tensors, used to count FLOPs, have no autocast)."""
    device = x.device.type
    return contextlib.nullcontext() if device == "meta" else torch.autocast(device, enabled=False)


class NerfBlock(nn.Module):
    """One residual layer of every patch's MLP, h <- h + SiLU(RMSNorm(h) W1) W2 (no biases), with
    W1 and W2 predicted from the patch's hidden state s (Eq. 9) and row-wise normalised (Eq. 10)."""

    def __init__(self, cond_dim, width, mlp_ratio=2, norm_w2=True):
        super().__init__()
        self.width, self.hidden, self.norm_w2 = width, width * mlp_ratio, norm_w2
        self.generator = nn.Linear(cond_dim, 2 * width * self.hidden)
        self.norm = RMSNorm(width)

    def forward(self, h, s):
        """h: (N, pixels, width) per-pixel features of N patches; s: (N, cond_dim), one per patch."""
        N = h.shape[0]
        w1, w2 = self.generator(s).chunk(2, dim=-1)                        # Eq. 9: theta = W_g s + b_g
        w1 = w1.view(N, self.width, self.hidden)                           # (N, in, out)
        w2 = w2.view(N, self.hidden, self.width)
        # Eq. 10: W / ||W||, each output unit's weights over its inputs to unit L2 norm, in fp32 as
        # the official F.normalize(dim=-2); the official text-to-image head normalises W1 only.
        w1 = F.normalize(w1.float(), dim=1)
        if self.norm_w2:
            w2 = F.normalize(w2.float(), dim=1)
        return h + torch.bmm(F.silu(torch.bmm(self.norm(h), w1)), w2)     # Eq. 10


class NerfHead(nn.Module):
    """Decodes every patch's velocity from its hidden state s and its noisy pixels.

    norm: the paper's Fig. 6a variants. "fc1" normalises W1 only, "fc1_fc2" both, and
    "fc1_fc2_out" (the default, the official c2i head) also RMS-normalises the output features
    before the last Linear. The official text-to-image head is "fc1".
    """

    def __init__(self, cond_dim, width=64, depth=2, mlp_ratio=2, channels=3,
                 encoding="dct", norm="fc1_fc2_out"):
        super().__init__()
        if norm not in ("fc1", "fc1_fc2", "fc1_fc2_out"):
            raise ValueError(f"unknown neural-field norm {norm!r}: use fc1, fc1_fc2 or fc1_fc2_out")
        coordinate_encoding(encoding, 2, 2)  # fail early on a bad encoding name
        self.encoding, self.channels = encoding, channels
        self.embed = nn.Linear(channels + 64, width)  # [RGB, phi_0..phi_63] -> width, shared
        self.blocks = nn.ModuleList(
            NerfBlock(cond_dim, width, mlp_ratio, norm_w2=norm != "fc1") for _ in range(depth))
        self.norm_out = RMSNorm(width) if norm == "fc1_fc2_out" else nn.Identity()
        self.out = nn.Linear(width, channels)  # Eq. 11, zero-initialised as the official code
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, s, pixels, ph, pw):
        """s: (N, cond_dim); pixels: (N, ph*pw, C) noisy pixel values -> (N, ph*pw, C) velocity."""
        phi = coordinate_encoding(self.encoding, ph, pw, pixels.device, pixels.dtype)  # Eq. 12: (ph*pw, 64)
        # The pixel-level Linears run in the pixels' precision (fp32 under autocast): they are few
        # FLOPs, and noisy pixels rounded to bf16 would cost accuracy in the velocity.
        with no_autocast(pixels):
            h = self.embed(torch.cat([pixels, phi.expand(len(pixels), -1, -1)], dim=-1))  # (N, ph*pw, width)
        for block in self.blocks:
            h = block(h, s)
        with no_autocast(pixels):
            return self.out(self.norm_out(h))                                       # Eq. 11
