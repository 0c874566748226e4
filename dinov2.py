"""The frozen REPA target: DINOv2 ViT-B/14 without registers (official src/models/encoder.py: DINOv2, used by
src/diffusion/flow_matching/training_repa.py: REPATrainer).

Our own small copy of the facebookresearch/dinov2 torch-hub `dinov2_vitb14`, so the released
`dinov2_vitb14_pretrain.pth` loads under its own key names and nothing is ever downloaded or
fetched from a hub at run time. The hub builds it with img_size 518 (a 37x37 position table),
patch 14, LayerScale, unchunked blocks, LayerNorm eps 1e-6, GELU MLP x4 and qkv bias.
Imports only torch.
"""
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, as DINOv2
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio)), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """ViT-B/14 by default; smaller sizes only for tests. Parameter names match the checkpoint."""

    def __init__(self, embed_dim=768, depth=12, num_heads=12, patch_size=14, img_size=518, mlp_ratio=4.0):
        super().__init__()
        self.patch_size, self.grid, self.embed_dim = patch_size, img_size // patch_size, embed_dim
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, embed_dim, patch_size, patch_size)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # iBOT training only; kept for strict loading
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # the input normalisation, as buffers so that it moves with the model: a constant made from a
        # Python list on each call would be a blocking host-to-device copy, a sync in every step
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def pos_embed_for(self, gh, gw):
        """Resize the 37x37 table to a gh x gw token grid exactly as DINOv2 does: bicubic, no
        antialias, driven by scale_factor (g + 0.1) / 37 rather than by the output size. The 0.1 is
        DINO's historical guard against rounding; the kernel samples at (i + 0.5) / scale - 0.5, so
        it shifts the samples slightly, and the released features were computed with it."""
        M = self.grid
        if gh == M and gw == M:
            return self.pos_embed
        table = self.pos_embed[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, scale_factor=((gh + 0.1) / M, (gw + 0.1) / M), mode="bicubic", antialias=False)
        assert table.shape[-2:] == (gh, gw), table.shape
        return torch.cat([self.pos_embed[:, :1], table.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)], 1)

    def forward_patch_tokens(self, x):
        """x: (B, 3, H, W), ImageNet-normalised, H and W multiples of 14 -> x_norm_patchtokens
        (B, H/14 * W/14, D), row-major over the token grid."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"DINOv2 input {H}x{W} is not a multiple of its patch size {p}")
        x = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], 1)
        x = x + self.pos_embed_for(H // p, W // p).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


def load_dinov2(path, **arch):
    """Build ViT-B/14 (or `arch`), load a local DINOv2 state dict strictly, freeze it."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"DINOv2 checkpoint {path!r} not found: pass --repa-encoder /path/to/dinov2_vitb14_pretrain.pth "
            "(the facebookresearch/dinov2 torch-hub file; it is never downloaded)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("teacher", "model", "state_dict"):  # training checkpoints nest the backbone
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a DINO teacher: keep the backbone, drop the heads
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}  # block_chunks > 0
    model = DINOv2(**arch)
    want = model.state_dict()
    bad = sorted(set(want) ^ set(sd)) or [k for k in want if want[k].shape != sd[k].shape]
    if bad:
        k = bad[0]
        why = ("missing" if k not in sd else "unexpected" if k not in want
               else f"shape {tuple(sd[k].shape)}, expected {tuple(want[k].shape)}")
        raise ValueError(f"{path} is not a DINOv2 ViT-B/14 (no registers) state dict: key {k!r} is {why} "
                         f"({len(bad)} bad keys)")
    model.load_state_dict(sd, strict=True)
    return model.requires_grad_(False).eval()


@torch.no_grad()
def repa_target(encoder, images, ht, wt):
    """DINOv2 features aligned with a ht x wt denoiser token grid: (B, ht*wt, D).

    images: clean training images in [-1, 1]. As the official code: back to [0, 1], ImageNet-
    normalise, THEN bicubic-resize (no antialias) to 14 px per denoiser token, i.e.
    (14 H/16, 14 W/16) for patch 16, so both token grids coincide."""
    images = images.float()  # the official normalises the fp32 [0, 1] image
    x = ((images + 1) / 2 - encoder.mean.float()) / encoder.std.float()
    x = F.interpolate(x, size=(encoder.patch_size * ht, encoder.patch_size * wt), mode="bicubic")
    return encoder.forward_patch_tokens(x)
