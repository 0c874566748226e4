"""PixNerd: a pixel-space diffusion transformer whose output layer is a patch-wise neural field.

Paper: "PixNerd: Pixel Neural Field Diffusion". Where the paper and the official code
(MCG-NJU/PixNerd @ 6da060bd) differ, this file follows the code, because that is what the released
checkpoints compute, and says so in a comment. Official code is cited by file and class, paper
equations by number.

The network knows nothing of timestep distributions or solvers: `model(x, t, y)` returns the
velocity for noisy pixels x at time t (t = 0 noise, t = 1 data) and condition y (class labels,
or text features for the text-to-image variant).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nerf_head import NerfHead, RMSNorm


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] then an MLP. As the official TimestepEmbedder
    (pixnerd_c2i.py): max_period 10 on the raw t (not DiT's 10000 on 1000 t), cos before sin."""

    def __init__(self, dim, freq_dim=256, max_period=10.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t):  # t: (B,) -> (B, 1, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) *
                          torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))[:, None]


# ---------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# ---------------------------------------------------------------------------------------------

def rope_2d(ht, wt, head_dim, mode="normalized", theta=10000.0, device=None):
    """cos and sin tables, each (ht*wt, head_dim/2), for tokens in row-major order.

    Channel pairs (2j, 2j+1) rotate together; even pairs j rotate by the column position times
    f_{j/2}, odd pairs by the row position times f_{(j-1)/2}, f_k = theta^(-4k/head_dim).
    mode "normalized" (c2i, official precompute_freqs_cis_2d): positions linspace(0, 16, n) at
    every resolution. mode "grid" (official t2i, layers/rope.py: precompute_freqs_cis_ex2d): x on
    linspace(0, ht, wt) and y on linspace(0, wt, ht), the extents swapped as the official code
    does, so that released t2i weights compute the same.
    """
    f32 = dict(dtype=torch.float32, device=device)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4, **f32)[: head_dim // 4] / head_dim)
    if mode == "normalized":
        x_pos, y_pos = torch.linspace(0, 16, wt, **f32), torch.linspace(0, 16, ht, **f32)
    elif mode == "grid":
        x_pos, y_pos = torch.linspace(0, ht, wt, **f32), torch.linspace(0, wt, ht, **f32)
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    ax = torch.outer(x_pos, freqs)[None, :, :].expand(ht, wt, -1)   # (ht, wt, hd/4)
    ay = torch.outer(y_pos, freqs)[:, None, :].expand(ht, wt, -1)
    angles = torch.stack([ax, ay], dim=-1).reshape(ht * wt, head_dim // 2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (a, b) of x (B, N, heads, hd) to (a cos - b sin, a sin + b cos),
    angles from (cos, sin) (N, hd/2); in fp32, rounded once to x's dtype, as the official code."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)            # (B, N, heads, hd/2) each
    cos, sin = cos[:, None], sin[:, None]                          # (N, 1, hd/2)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm and 2-D RoPE, through SDPA (flash attention
    on CUDA). With text set it is the official t2i "one-way joint" attention (pixnerd_t2i.py:
    Attention): image queries attend to [image keys; text keys], text k/v come from the refined
    text and get no RoPE."""

    def __init__(self, dim, num_heads, text=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.kv_text = nn.Linear(dim, 2 * dim, bias=False) if text else None
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)  # shared by image and text keys, as official
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, text=None, mask=None):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, heads, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.attend(q, k, v, text, mask)

    def attend(self, q, k, v, text=None, mask=None):
        """softmax(q k^T / sqrt(hd)) v over the image tokens and, for t2i, the text tokens, then
        the output projection. q, k, v: (B, N, heads, hd); text: (B, L_text, D)."""
        B, N = q.shape[:2]
        if text is not None:
            kt, vt = self.kv_text(text).view(B, -1, 2, self.num_heads, self.head_dim).unbind(2)
            k, v = torch.cat([k, self.k_norm(kt)], dim=1), torch.cat([v, vt], dim=1)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class SwiGLU(nn.Module):
    """W2 (SiLU(W1 x) * W3 x), with W1 and W3 stacked in one Linear fc1 = [W1; W3].

    The official c2i width int(2/3 * 4D) is not a multiple of 8 for every D (L/16: 2730), and
    cuBLAS is slow on rows that are not 16-byte aligned; `weights` zero-pads the hidden units to a
    multiple of 8 (SiLU(0) * 0 = 0 meets zero columns of W2: the same output and gradients), so
    the parameters keep the official shapes."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.pad = -hidden % 8

    def weights(self):
        """fc1's and fc2's weights, (2F', D) and (D, F'), with F' = F zero-padded to a multiple of 8."""
        w1, w2 = self.fc1.weight, self.fc2.weight
        if self.pad:
            w1 = F.pad(w1.unflatten(0, (2, -1)), (0, 0, 0, self.pad)).flatten(0, 1)
            w2 = F.pad(w2, (0, self.pad))
        return w1, w2

    def forward(self, x):
        w1, w2 = self.weights()
        gate, value = F.linear(x, w1).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * value, w2)


def modulate(x, shift, scale):
    """adaLN: x (B, N, D) scaled and shifted per image, shift and scale (B, 1, D)."""
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-norm transformer block with a per-block adaLN of 6 chunks (official FlattenDiTBlock).
    The official adaLN keeps PyTorch's default init (it is not DiT's adaLN-Zero) and has no
    SiLU: c is already SiLU'd."""

    def __init__(self, dim, num_heads, mlp_hidden, text=False):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, text)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.adaLN = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, rope=None, text=None, mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope, text, mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class LinearHead(nn.Module):
    """The paper's Baseline output layer (Eq. 6): a DiT-style adaLN LayerNorm and a
    zero-initialised linear projection of each token to its patch's pixels."""

    def __init__(self, dim, patch_pixels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_pixels)
        for w in (self.adaLN.weight, self.adaLN.bias, self.linear.weight, self.linear.bias):
            nn.init.zeros_(w)

    def forward(self, h, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(self.norm(h) * (1 + scale) + shift)


def patchify(x, ph, pw):
    """(B, C, H, W) -> (B, L, ph*pw, C): patches in row-major order, pixels row-major inside (Eq. 5)."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // ph) * (W // pw), ph * pw, C)


def unpatchify(x, ht, wt, ph, pw):
    """(B, L, ph*pw, C) -> (B, C, ht*ph, wt*pw), the inverse of patchify."""
    B, C = x.shape[0], x.shape[-1]
    x = x.view(B, ht, wt, ph, pw, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, ht * ph, wt * pw)


class PixNerd(nn.Module):
    """The PixNerd diffusion transformer, class-conditional or (text_dim set) text-conditional.

    head="nerf" is PixNerd; head="linear" is the paper's Baseline of the same size: the
    neural-field blocks' count goes to the transformer and a linear layer outputs the pixels.
    """

    def __init__(self, hidden_size, depth, num_heads, nerf_depth=2, patch_size=16, in_channels=3,
                 num_classes=1000, head="nerf", nerf_width=64, nerf_mlp_ratio=2, encoding="dct",
                 nerf_norm="fc1_fc2_out", mlp_hidden=None, rope="normalized", align_layer=8,
                 text_dim=None, text_len=128, text_depth=4):
        super().__init__()
        if head not in ("nerf", "linear"):
            raise ValueError(f"unknown head {head!r}: use nerf or linear")
        if head == "linear":
            depth, nerf_depth = depth + nerf_depth, 0
        D = hidden_size
        mlp_hidden = mlp_hidden or int(2 * int(4 * D) / 3)  # official c2i width; the t2i uses 4D
        self.patch_size, self.in_channels, self.num_heads = patch_size, in_channels, num_heads
        self.num_classes, self.text_dim, self.rope_mode = num_classes, text_dim, rope
        self.head_type, self.align_layer = head, align_layer

        self.patch_embed = nn.Linear(in_channels * patch_size ** 2, D)  # no position embedding
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        self.t_embedder = TimestepEmbedder(D)
        if text_dim is None:
            self.y_embedder = nn.Embedding(num_classes + 1, D)  # row num_classes: null class (CFG)
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        else:  # official pixnerd_t2i.py: y = RMSNorm(Linear(txt)) + learned positions, then TextRefineBlocks
            self.text_embed = nn.Linear(text_dim, D)
            self.text_norm = RMSNorm(D)
            self.text_pos = nn.Parameter(torch.randn(1, text_len, D))
            self.text_blocks = nn.ModuleList(Block(D, num_heads, mlp_hidden) for _ in range(text_depth))
        self.blocks = nn.ModuleList(
            Block(D, num_heads, mlp_hidden, text=text_dim is not None) for _ in range(depth))
        if head == "nerf":
            self.head = NerfHead(D, nerf_width, nerf_depth, nerf_mlp_ratio, in_channels, encoding, nerf_norm)
        else:
            self.head = LinearHead(D, in_channels * patch_size ** 2)

    def forward(self, x, t, y, text_mask=None, size=None, return_align=False):
        """x: (B, C, H, W) noisy pixels; t: (B,); y: (B,) labels or (B, L_text, text_dim).

        size=(H0, W0): arbitrary-resolution sampling (paper Fig. 3; official
        pixnerd_t2i_heavydecoder.py). The transformer sees x resized (nearest) to H0 x W0, the
        token grid it was trained on; the neural field decodes each token at (H/H0)*p x (W/W0)*p
        pixels of the full-resolution x.
        text_mask: (B, L_text) bool, True for real tokens. The official code attends padded text
        tokens; None keeps that behaviour. A caption with no token at all (GPT-style tokenisers
        encode "" so) attends to every position rather than to none.
        return_align: also return the hidden state after block `align_layer` (REPA).
        """
        B, C, H, W = x.shape
        p = self.patch_size
        H0, W0 = size or (H, W)
        if H0 % p or W0 % p or H % (H0 // p) or W % (W0 // p):
            raise ValueError(f"image {H}x{W} (transformer size {H0}x{W0}) does not split into {p}px patches")
        ht, wt = H0 // p, W0 // p
        x0 = x if (H0, W0) == (H, W) else F.interpolate(x, size=(H0, W0), mode="nearest")
        tokens = patchify(x0, p, p).transpose(2, 3).flatten(2)  # (B, L, C*p*p), (c, ky, kx) order
        # The residual stream keeps the higher of the input's and the parameters' precision (fp32
        # under autocast, as in nanoGPT): a bf16 stream would round at every block.
        h = self.patch_embed(tokens).to(torch.promote_types(x.dtype, self.patch_embed.weight.dtype))  # (B, L, D)
        t_emb = self.t_embedder(t)                                # (B, 1, D)

        text, mask = None, None
        if self.text_dim is None:
            c = F.silu(t_emb + self.y_embedder(y)[:, None])       # c = SiLU(t_emb + y_emb)
        else:
            c = F.silu(t_emb)                                     # t2i: no text in adaLN
            text = self.text_norm(self.text_embed(y)) + self.text_pos[:, : y.shape[1]]
            if text_mask is not None:  # (B, 1, 1, keys)
                text_mask = text_mask.bool() | ~text_mask.bool().any(1, keepdim=True)
                mask = text_mask[:, None, None, :]
            for block in self.text_blocks:
                text = block(text, c, mask=mask)
            if mask is not None:  # image blocks: image keys always on, then the text keys
                mask = F.pad(mask, (h.shape[1], 0), value=True)

        rope = rope_2d(ht, wt, h.shape[-1] // self.num_heads, self.rope_mode, device=x.device)
        h_align = None
        for i, block in enumerate(self.blocks):
            h = block(h, c, rope, text, mask)
            if i + 1 == self.align_layer:
                h_align = h

        if self.head_type == "linear":
            if (H0, W0) != (H, W):
                raise ValueError("arbitrary resolution needs the neural-field head (head='nerf')")
            out = self.head(h, c).unflatten(-1, (C, p * p)).transpose(2, 3)  # (B, L, p*p, C)
            v = unpatchify(out, ht, wt, p, p)
        else:
            ph, pw = H // ht, W // wt
            s = F.silu(t_emb + h)  # official hand-off: no final norm, label not re-added
            out = self.head(s.flatten(0, 1), patchify(x, ph, pw).flatten(0, 1), ph, pw)
            v = unpatchify(out.view(B, ht * wt, ph * pw, C), ht, wt, ph, pw)
        if return_align and h_align is None:
            raise ValueError(f"align_layer {self.align_layer} is not one of the {len(self.blocks)} blocks")
        return (v, h_align) if return_align else v


# ---------------------------------------------------------------------------------------------
# Configs (DiT-style factories; MODELS is used directly as argparse choices)
# ---------------------------------------------------------------------------------------------

def PixNerd_XS(**kw):  # for tests and CPU runs
    return PixNerd(**{"hidden_size": 128, "depth": 4, "num_heads": 4, "nerf_depth": 2, "nerf_width": 32,
                      "align_layer": 2, **kw})

def PixNerd_S(**kw):
    return PixNerd(**{"hidden_size": 384, "depth": 10, "num_heads": 6, "nerf_depth": 2, "align_layer": 4, **kw})

def PixNerd_B(**kw):
    return PixNerd(**{"hidden_size": 768, "depth": 10, "num_heads": 12, "nerf_depth": 2, "align_layer": 4, **kw})

def PixNerd_L(**kw):  # 452,113,795 parameters, as the official L/16
    return PixNerd(**{"hidden_size": 1024, "depth": 22, "num_heads": 16, "nerf_depth": 2, **kw})

def PixNerd_XL(**kw):  # 700,589,219 parameters; the official tag says 24 blocks, the config 26
    return PixNerd(**{"hidden_size": 1152, "depth": 26, "num_heads": 16, "nerf_depth": 4, **kw})

def PixNerd_T2I(hidden_size, **kw):
    """Official t2i settings (configs_t2i, pixnerd_t2i.py): SwiGLU 4D, grid RoPE, cosine encoding, W1-only norm."""
    return PixNerd(**{"hidden_size": hidden_size, "mlp_hidden": 4 * hidden_size, "rope": "grid", "encoding": "cos",
                      "nerf_norm": "fc1", "text_dim": 2048, "text_len": 128, "text_depth": 4,
                      "align_layer": 6, **kw})

def PixNerd_T2I_XS(**kw):  # for tests and CPU runs
    return PixNerd_T2I(**{"hidden_size": 128, "depth": 4, "num_heads": 4, "nerf_depth": 2, "nerf_width": 32,
                          "align_layer": 2, "text_depth": 1, **kw})

def PixNerd_T2I_S(**kw):
    return PixNerd_T2I(**{"hidden_size": 384, "depth": 10, "num_heads": 6, "nerf_depth": 2,
                          "align_layer": 4, "text_depth": 2, **kw})

def PixNerd_XXL(**kw):  # 1,171,518,019 parameters, as the official XXL/16 text-to-image model
    return PixNerd_T2I(**{"hidden_size": 1536, "depth": 16, "num_heads": 24, "nerf_depth": 2, **kw})


MODELS = {
    "XS/16": PixNerd_XS, "XS/8": lambda **kw: PixNerd_XS(**{"patch_size": 8, **kw}),
    "S/16": PixNerd_S, "S/8": lambda **kw: PixNerd_S(**{"patch_size": 8, **kw}),
    "S/4": lambda **kw: PixNerd_S(**{"patch_size": 4, **kw}),
    "B/16": PixNerd_B, "B/8": lambda **kw: PixNerd_B(**{"patch_size": 8, **kw}),
    "L/16": PixNerd_L, "XL/16": PixNerd_XL,
    "T2I-XS/16": PixNerd_T2I_XS, "T2I-S/16": PixNerd_T2I_S, "T2I-S/8": lambda **kw: PixNerd_T2I_S(**{"patch_size": 8, **kw}),
    "XXL/16": PixNerd_XXL,
}
