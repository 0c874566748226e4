"""PixNerd: a pixel-space diffusion transformer whose output layer is a patch-wise neural field.

Paper: "PixNerd: Pixel Neural Field Diffusion". Where the paper and the official code
(MCG-NJU/PixNerd @ 6da060bd) differ, this file follows the code, because that is what the released
checkpoints compute, and says so in a comment. Spec sections (Sec. x.y) refer to the official
implementation notes.

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
    """Sinusoidal features of t in [0, 1] then an MLP. The official code uses max_period 10 on
    the raw t (not DiT's 10000 on 1000 t), with cos before sin (Sec. 2.2.3)."""

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
    mode "normalized" (c2i): positions linspace(0, 16, n) at every resolution (Sec. 2.2.8).
    mode "grid" (official t2i): x on linspace(0, ht, wt) and y on linspace(0, wt, ht): the
    official code swaps the extents; kept so released t2i weights compute the same.
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
    """Rotate interleaved pairs (a, b) of x (B, N, heads, hd) to (a cos - b sin, a sin + b cos),
    angles from (cos, sin) (N, hd/2). Written as x * (c, c) + (b, a) * (-s, s): Inductor turns
    the pair swap into one load per element, a third faster than building (-b, a) with a stack
    (and the form that stacked both rotated halves took 30% of an L/16 batch-128 forward).
    The official code rotates in fp32 and rounds once (spec Sec. 2.2); here the rotation runs in
    x's dtype, so under bf16 autocast the products round too: on bf16 q of 64- or 72-channel heads
    the error against fp64 is 2.8e-3 against 2.3e-3. In fp32 the two are the same computation."""
    cos = cos.repeat_interleave(2, -1)[:, None].to(x.dtype)                   # (N, 1, hd): c, c
    sin = torch.stack([-sin, sin], -1).flatten(-2)[:, None].to(x.dtype)        # -s, s
    return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin


# ---------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------

def norm_rope(x, norm, rope):
    """q or k (B, N, heads, hd): RMSNorm over each head's channels, then 2-D RoPE (rope: (cos, sin))."""
    x = norm(x)
    return x if rope is None else apply_rope(x, *rope)


def qk_norm_rope(qkv, q_norm, k_norm, rope):
    """q, k, v from the qkv projection's output (B, N, 3, heads, hd): q and k through norm_rope,
    each with its own norm, v as it is. One function for the three so that block_kernel's version
    can write all three gradients into one tensor of qkv's layout."""
    q, k, v = qkv.unbind(2)
    return norm_rope(q, q_norm, rope), norm_rope(k, k_norm, rope), v


class Attention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm and 2-D RoPE, through SDPA (flash attention
    on CUDA). With text_dim set it is the official t2i "one-way joint" attention: image queries
    attend to [image keys; text keys], text k/v come from the refined text (Sec. 7.3)."""

    def __init__(self, dim, num_heads, text=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.kv_text = nn.Linear(dim, 2 * dim, bias=False) if text else None
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)  # shared by image and text keys, as official
        self.proj = nn.Linear(dim, dim)

    qk_norm_rope = staticmethod(qk_norm_rope)  # block_kernel.enable() puts a fused kernel on the instance

    def forward(self, x, rope=None, text=None, mask=None):
        B, N, D = x.shape
        # q, k, v stay in the (B, N, heads, hd) layout the projections produce and consume; SDPA
        # reads them through transposed views. Permuting to (B, heads, N, hd) first made the
        # fused norm/RoPE kernels and their backward copies 10% of an L/16 training step.
        q, k, v = self.qk_norm_rope(self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim), self.q_norm,
                                    self.k_norm, rope)
        if text is not None:  # text tokens: keys and values only, no RoPE
            kt, vt = self.kv_text(text).view(B, -1, 2, self.num_heads, self.head_dim).unbind(2)
            k, v = torch.cat([k, self.k_norm(kt)], dim=1), torch.cat([v, vt], dim=1)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def silu_gate(h):
    """SiLU(gate) * value for h = [gate, value] (..., 2F), the fc1 output of SwiGLU."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


def swiglu_hidden(x, w1):
    """SiLU(x W1) * x W3, the hidden layer of SwiGLU, for fc1's weight w1 = [W1; W3] (2F, D)."""
    return silu_gate(F.linear(x, w1))


class SwiGLU(nn.Module):
    """fc2(SiLU(x W1) * x W3), with W1 and W3 fused in one matmul (fc1 = [W1; W3]).

    The official c2i width 2/3 * 4D is not a multiple of 8 for every D (L/16: 2730): rows of
    2730 bf16 values are not 16-byte aligned and cuBLAS falls back to slower kernels (one such
    matmul was 8% of an L/16 training step on an H100). The weights are zero-padded on the fly
    to a multiple of 8 hidden units: the padded units are SiLU(0) * 0 = 0 and meet zero columns
    of W2, so the output and the real weights' gradients are unchanged, and the parameters keep
    the official shapes."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.pad = -hidden % 8

    hidden = staticmethod(swiglu_hidden)  # block_kernel.enable() puts fused kernels on the instance

    def forward(self, x):
        w1, w2 = self.fc1.weight, self.fc2.weight                      # (2F, D), (D, F)
        if self.pad:
            w1 = F.pad(w1.unflatten(0, (2, -1)), (0, 0, 0, self.pad)).flatten(0, 1)
            w2 = F.pad(w2, (0, self.pad))
        return F.linear(self.hidden(x, w1), w2)


def modulate(x, norm, shift, scale):
    """adaLN: the normalised x (B, N, D) shifted and scaled per image, shift and scale (B, 1, D)."""
    return norm(x) * (1 + scale) + shift


def gated_residual(x, gate, y):
    """The residual update x + gate * y of a branch's output y, gate (B, 1, D) from the adaLN."""
    return x + gate * y


class Block(nn.Module):
    """Pre-norm transformer block with a per-block adaLN of 6 chunks. The official adaLN keeps
    PyTorch's default init (it is not DiT's adaLN-Zero) and has no SiLU: c is already SiLU'd."""

    def __init__(self, dim, num_heads, mlp_hidden, text=False):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, text)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.adaLN = nn.Linear(dim, 6 * dim)

    # block_kernel.enable() puts fused kernels of these on the instance (eager CUDA speed)
    modulate, gated_residual = staticmethod(modulate), staticmethod(gated_residual)

    def forward(self, x, c, rope=None, text=None, mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = self.gated_residual(x, gate1, self.attn(self.modulate(x, self.norm1, shift1, scale1), rope, text, mask))
        return self.gated_residual(x, gate2, self.mlp(self.modulate(x, self.norm2, shift2, scale2)))


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
        else:  # Sec. 7.2: y = RMSNorm(Linear(txt)) + learned positions, then refine blocks
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

        size=(H0, W0): arbitrary-resolution sampling (paper Fig. 3, Sec. 7.4). The transformer
        sees x resized (nearest) to H0 x W0, the token grid it was trained on; the neural field
        decodes each token at (H/H0)*p x (W/W0)*p pixels of the full-resolution x.
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
        # under autocast, as in nanoGPT): a bf16 stream would round at every block and halve the
        # accuracy of the bf16 fast path.
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
            s = F.silu(t_emb + h)  # hand-off (Sec. 2.2.10): no final norm, label not re-added
            out = self.head(s.flatten(0, 1), patchify(x, ph, pw).flatten(0, 1), ph, pw)
            v = unpatchify(out.view(B, ht * wt, ph * pw, C), ht, wt, ph, pw)
        if return_align and h_align is None:
            raise ValueError(f"align_layer {self.align_layer} is not one of the {len(self.blocks)} blocks")
        return (v, h_align) if return_align else v

    def compile_regions(self, **kwargs):
        """torch.compile each transformer block and the head in place (regional compilation):
        the blocks share one compiled graph, so compile time is that of one block, and the
        state-dict keys stay unprefixed. Shapes are static by default: sampling alternates two
        batch sizes (with and without the CFG branch), and dynamic-shape kernels run slower. Past
        torch's recompile limit (8 shapes per process) a block runs eagerly, still correct."""
        kwargs = {"dynamic": False, **kwargs}
        for block in [*self.blocks, *getattr(self, "text_blocks", [])]:
            block.compile(**kwargs)
        self.head.compile(**kwargs)
        return self


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
    """Official t2i settings (Sec. 7): SwiGLU 4D, grid RoPE, cosine encoding, W1-only norm."""
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


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------

_RENAMES = [  # (official prefix, ours), first match wins
    ("s_embedder.proj.", "patch_embed."), ("y_embedder.embedding_table.", "y_embedder."),
    ("y_embedder.proj.", "text_embed."), ("y_embedder.norm.", "text_norm."),
    ("x_embedder.embedder.0.", "head.embed."), ("final_layer.norm.", "head.norm_out."),
    ("final_layer.linear.", "head.out."), ("text_refine_blocks.", "text_blocks."),
]
_BLOCK_RENAMES = [("adaLN_modulation.0.", "adaLN."), ("attn.qkv_x.", "attn.qkv."),
                  ("attn.kv_y.", "attn.kv_text."), ("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2.")]


def convert_official(state_dict):
    """Map an official PixNerd state dict (a Lightning .ckpt, its "state_dict", with the
    `ema_denoiser.` or `denoiser.` prefix, or bare denoiser keys) to this model's keys.

    The EMA weights are taken when present. The transformer / neural-field split is read from
    the keys (transformer blocks have attention weights, neural-field blocks a parameter
    generator), so the XL tag/config mismatch (24 vs 26 blocks) cannot bite.
    """
    sd = state_dict.get("state_dict", state_dict)
    for prefix in ("ema_denoiser.", "denoiser.", ""):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if any(k.startswith(("blocks.", "s_embedder.")) for k in sub):
            break
    else:
        raise ValueError("not an official PixNerd state dict: no blocks.* / s_embedder.* keys")
    sub = {k: v for k, v in sub.items() if not k.startswith("diffusion_trainer.")}
    nerf_ids = sorted({int(k.split(".")[1]) for k in sub if ".param_generator1." in k})
    first_nerf = nerf_ids[0] if nerf_ids else None
    c2i_mlp = {k for k in sub if k.endswith("mlp.w1.weight")}

    out = {}
    for k, v in sub.items():
        new = k
        if k == "y_pos_embedding":
            new = "text_pos"
        for old, ours in _RENAMES:
            if k.startswith(old):
                new = ours + k[len(old):]
                break
        if k.startswith(("blocks.", "text_refine_blocks.")):
            i = int(k.split(".")[1])
            if k.startswith("blocks.") and first_nerf is not None and i >= first_nerf:
                new = f"head.blocks.{i - first_nerf}." + k.split(".", 2)[2]
                new = new.replace("param_generator1.0.", "generator.")
            elif k.endswith(("mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight")) and c2i_mlp:
                base = new.rsplit("mlp.", 1)[0]
                if k.endswith("w2.weight"):
                    new = base + "mlp.fc2.weight"
                elif k.endswith("w1.weight"):  # fc1 = [W1; W3]: gate first, then value
                    new, v = base + "mlp.fc1.weight", torch.cat([v, sub[k[:-len("w1.weight")] + "w3.weight"]])
                else:
                    continue  # consumed with w1
            else:
                for old, ours in _BLOCK_RENAMES:
                    new = new.replace(old, ours)
        out[new] = v
    return out


def load_weights(model, state_dict):
    """load_state_dict(strict=True) with one clear error naming the first bad key and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit this model: missing key {missing[:1]}, "
                         f"unexpected key {unexpected[:1]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in state_dict.items():
        if v.shape != own[k].shape:
            raise ValueError(f"checkpoint does not fit this model: {k} has shape {tuple(v.shape)} "
                             f"in the checkpoint but {tuple(own[k].shape)} in the model")
    model.load_state_dict(state_dict, strict=True)
    return model
