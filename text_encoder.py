"""The frozen text encoder of text-to-image PixNerd (official src/models/conditioner/qwen3_text_encoder.py:
Qwen3TextEncoder).

Officially Qwen3-1.7B: right padding to max_length 128 with truncation, and the base model's
last_hidden_state (B, 128, 2048), taken as is (padded positions included), is the text feature.
The unconditional input is "" encoded the same way. The official diffusion model gets no mask;
we return it anyway so ours can optionally use it.

`TextEncoder` needs only torch: it takes a tokenizer callable and a model callable, so tests run
the very same encode/null_features code with tiny stand-ins. `load_text_encoder` adapts a local
Hugging Face directory or .gguf file to those callables; transformers is optional and imported
only there. Nothing is ever fetched from a hub.
"""
import os

import torch
import torch.nn.functional as F

from checkpoints import check_writable, save_checkpoint


class TextEncoder:
    """Prompts -> (features (B, L, d), mask (B, L) bool) with L == max_length.

    tokenizer(prompts, max_length) -> (input_ids (B, L) long, attention_mask (B, L)), right padded
    and truncated to exactly max_length. model(input_ids, attention_mask) -> last hidden state
    (B, L, d). An nn.Module model is moved to device/dtype, put in eval mode and frozen.
    embed_dim, if given, zero-pads or truncates the feature dim as the official code does.
    """

    def __init__(self, tokenizer, model, max_length=128, embed_dim=None, device="cpu", dtype=None):
        if isinstance(model, torch.nn.Module):
            model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer, self.model = tokenizer, model
        self.max_length, self.embed_dim, self.device = max_length, embed_dim, torch.device(device)
        self._null = None  # "" encoded once: the unconditional input is asked for every CFG step

    @torch.no_grad()
    def encode(self, prompts):
        prompts = list(prompts)
        ids, mask = self.tokenizer(prompts, self.max_length)
        if tuple(ids.shape) != (len(prompts), self.max_length) or ids.shape != mask.shape:
            raise ValueError(f"tokenizer gave ids {tuple(ids.shape)} / mask {tuple(mask.shape)}, "
                             f"expected ({len(prompts)}, {self.max_length}): pad and truncate to max_length")
        ids, mask = ids.to(self.device), mask.to(self.device)
        feats = self.model(ids, mask)  # padded positions kept as the model outputs them, as official
        if self.embed_dim is not None:
            d = feats.shape[-1]
            feats = F.pad(feats, (0, self.embed_dim - d)) if d < self.embed_dim else feats[..., :self.embed_dim]
        return feats, mask.bool()

    def null_features(self, batch):
        """(features, mask) of the empty prompt repeated `batch` times; the model runs only once."""
        if self._null is None:
            self._null = self.encode([""])
        feats, mask = self._null
        return feats.repeat(batch, 1, 1), mask.repeat(batch, 1)

    @property
    def dim(self):
        """Feature width seen by the diffusion model (embed_dim if given, else the encoder's)."""
        return self.embed_dim if self.embed_dim is not None else self.null_features(1)[0].shape[-1]


class _LastHidden(torch.nn.Module):
    """A Hugging Face base model (no LM head) as model(input_ids, attention_mask) -> last hidden state."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_text_encoder(path, max_length=128, embed_dim=None, device="cpu", dtype=torch.bfloat16):
    """A TextEncoder from a local HF model directory (Qwen3, BERT, ...) or a local .gguf file.

    AutoModel builds the base model, so a causal LM's hidden states come out after its final norm
    and before the LM head, as Qwen3Model's do officially. It runs in bf16 by default, as the
    official Qwen3 does; fp32 gives features without bf16 rounding (train.py --text-encoder-dtype).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--text-encoder {path!r} does not exist: pass a local Hugging Face "
                                "model directory or a .gguf file (nothing is downloaded)")
    is_gguf = path.endswith(".gguf")
    try:
        import transformers
        if is_gguf:  # transformers reads .gguf with gguf, and (since v5) refuses it without accelerate
            import accelerate  # noqa: F401
            import gguf  # noqa: F401
    except ImportError:
        raise ImportError("the text encoder is optional and needs Hugging Face transformers: "
                          "pip install transformers" + (" gguf accelerate" if is_gguf else "")) from None
    src, kw = (os.path.dirname(path) or ".", {"gguf_file": os.path.basename(path)}) if is_gguf else (path, {})
    tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True, **kw)
    tok.padding_side = "right"
    if tok.pad_token is None:  # GPT-like tokenizers (SmolLM, Llama) have none
        tok.pad_token = tok.eos_token
    # no dtype argument: transformers < 4.56 calls it torch_dtype; TextEncoder casts to dtype
    hf = transformers.AutoModel.from_pretrained(src, local_files_only=True, **kw)

    def tokenize(prompts, max_length):
        t = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return t["input_ids"], t["attention_mask"]

    return TextEncoder(tokenize, _LastHidden(hf), max_length, embed_dim, device, dtype)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the encoder's precision, by its flag's name


def caption_features(captions, encoder=None, max_length=128, cache=None, device="cpu", batch_size=256, dtype=None):
    """Features of every caption, and of "" in the last row: fp16 (N+1, L, d) and mask (N+1, L)
    on the CPU. The encoder is frozen, so they are computed once: with `cache` (a .pt file) only
    the captions it lacks are encoded, and added to it. So sampling new prompts with the training
    run's cache keeps the training captions' rows, which a resumed run needs. dtype ("bf16", the
    official, or "fp32"): the encoder's precision; the cache records it, and None takes the cache's."""
    want = list(captions) + [""]
    saved = {"captions": [], "encoder": encoder, "dtype": dtype or "bf16"}
    if cache and os.path.exists(cache):
        try:
            saved = {"dtype": "fp32", **torch.load(cache, weights_only=True)}  # caches without a dtype: fp32's
            length, dim = saved["features"].shape[1:]
            finite = bool(torch.isfinite(saved["features"]).all())
        except Exception as e:  # a truncated file, another kind of .pt
            raise SystemExit(f"--text-cache {cache}: not a caption feature cache ({type(e).__name__}: {e})")
        if length != max_length:
            raise SystemExit(f"--text-cache {cache}: holds features of {length} tokens, not {max_length}: "
                             "pass another --text-cache")
        if not finite:
            raise SystemExit(f"--text-cache {cache}: holds features that are NaN or inf: pass another --text-cache")
        if dtype and dtype != saved["dtype"]:
            raise SystemExit(f"--text-cache {cache}: holds features encoded in {saved['dtype']}, not "
                             f"--text-encoder-dtype {dtype}: pass that, or another --text-cache")
    have = set(saved["captions"])
    new = [s for s in dict.fromkeys(want) if s not in have]
    if new:
        if encoder is None:
            raise SystemExit(f"no text features for these {len(new)} captions in --text-cache {cache}: "
                             "give --text-encoder PATH to compute them")
        if cache:  # before the encoding, which may take long
            check_writable("--text-cache", cache)
        try:
            enc = load_text_encoder(encoder, max_length, device=device, dtype=DTYPES[saved["dtype"]])
            feats, masks = zip(*(enc.encode(new[i: i + batch_size]) for i in range(0, len(new), batch_size)))
        except (FileNotFoundError, ImportError) as e:  # their messages name the flag or the package
            raise SystemExit(str(e))
        except Exception as e:  # a truncated file, a quantisation transformers cannot read, no tokenizer
            raise SystemExit(f"--text-encoder {encoder}: could not be loaded or run ({type(e).__name__}: {e})")
        feats, masks = torch.cat(feats).half().cpu(), torch.cat(masks).cpu()
        if saved["captions"]:  # appended: the rows already there stay as they are
            if feats.shape[2] != dim:
                raise SystemExit(f"--text-cache {cache}: holds features {dim} wide, --text-encoder {encoder} "
                                 f"gives {feats.shape[2]}: pass another --text-cache")
            old = saved["features"][saved["captions"].index("")].float()  # every cache holds ""
            if not torch.allclose(enc.encode([""])[0][0].half().float().cpu(), old, rtol=1e-2, atol=1e-2):
                raise SystemExit(f"--text-cache {cache}: made by another encoder than --text-encoder {encoder} "
                                 "(the empty prompt's features differ): pass another --text-cache")
            feats, masks = torch.cat([saved["features"], feats]), torch.cat([saved["mask"], masks])
        saved = {**saved, "captions": saved["captions"] + new, "features": feats, "mask": masks}
        if not torch.isfinite(feats).all():  # an encoder that overflows fp16, or a broken one
            raise SystemExit(f"--text-encoder {encoder}: gives features that are NaN or inf (beyond fp16's range?)")
        if cache:  # write_atomic's temporary name is this process's own: all ranks of a run may write at once
            save_checkpoint(saved, cache, f"--text-cache {cache}")
    index = {s: i for i, s in enumerate(saved["captions"])}
    rows = torch.tensor([index[s] for s in want])
    return saved["features"][rows], saved["mask"][rows]
