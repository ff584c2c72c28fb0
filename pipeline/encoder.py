"""The encoder on its device: a Hugging Face model loaded cut at the deepest layer an output needs.

Layer numbering is the one of `output_hidden_states` on the whole, uncut model: 0 is the
embedding output, i is the output of encoder layer i, so a model with N layers has N + 1 hidden
states. The deeper layers are dropped (early exit), so they are never run and their weights leave
memory. Dropping them must not change a number: models that normalise after their last layer
(pre-LayerNorm RoBERTa, XLM-R-XL, Megatron-BERT, ModernBERT's final_norm, EuroBERT's norm) report
that norm on whatever layer comes last, so a cut model's deepest hidden state is taken from the
layer's own output instead. The cut is checked on a probe sequence at load, against the uncut
model; where it would change a number the model runs whole. Only model replicas import this
module (and torch).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from pipeline.architecture import SUPPORTED, accepts, find_layers
from pipeline.errors import ModelError, described
from pipeline.model import ModelInfo, weights_file
from pipeline.spec import DeviceOptions

# a probe sequence: long enough for local attention windows and relative positions to matter, and a
# prime, so a model that can only split sequences into chunks of some size shows it at once (Reformer)
PROBE_TOKENS = 13
PADDING_PROBE = 4  # masked positions after the probe when checking that padding stays out
# how far other amounts of padding may move a hidden value, relative to the largest one, before the
# model counts as padding-dependent: rounding in 16 bits (a bf16 unit in the last place is 2^-8), in fp32
PADDING_TOLERANCE = {False: 2e-2, True: 1e-4}
PRIME_LENGTH = 97  # a longer probe, past the chunk sizes of chunked attention, that no chunk size divides
CUT_TOLERANCE = 1e-3  # relative to the largest hidden value: a misplaced norm is off by far more


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


class Encoder(nn.Module):
    """A Hugging Face encoder cut after layer `depth`; returns hidden states 0..depth, each equal
    to the uncut model's."""

    def __init__(self, model: ModelInfo, depth: int, dtype: torch.dtype, device: torch.device,
                 options: DeviceOptions = DeviceOptions()):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the pooler weights we skip are not worth a warning
        hf_logging.disable_progress_bar()  # nor is a "Loading weights" bar per replica
        path = model.path
        loaded, loading = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=options.attention,
                                                    trust_remote_code=model.trust_remote_code,
                                                    output_loading_info=True)
        # transformers fills tensors the weights lack with random values, and only logs it
        missing = sorted(key for key in loading["missing_keys"] if not key.startswith("pooler."))
        if missing:
            raise ModelError(f"cannot load the weights of {path}: {weights_file(Path(path)).name} lacks "
                             f"{len(missing)} of the model's tensors ({missing[0]}, ...); config.json describes another "
                             "model")
        num_layers = loaded.config.num_hidden_layers
        if depth > num_layers:
            raise ModelError(f"asked for layer {depth} but {path} has {num_layers} layers")
        if getattr(loaded, "pooler", None) is not None:  # never read; some models call it whatever it is
            loaded.pooler = nn.Identity()
        self.model = loaded.to(device).eval()
        self.token_type_ids = model.token_type_ids and accepts(loaded, "token_type_ids")
        self.depth = depth
        self.tap: LayerTap | None = None
        self.what = f"{path}: {type(loaded).__name__}"
        probe = _probe(loaded.config, device)
        whole = self._check_whole(probe, num_layers)
        # micro-batches of one window, where the other windows of a batch change a window's vectors;
        # of one length only, where padding does
        self.needs_one_window = _batch_mates_leak(self, probe)
        self.needs_equal_lengths = _padding_leaks(self, probe, dtype)
        self._cut(probe, whole, num_layers, max(depth, 1))  # one layer at least: hidden state 0 is its input
        self._check_length(model.max_length)
        if options.compile:  # shapes change with every micro-batch: compiled for dynamic shapes
            self.model = torch.compile(self.model, mode=options.compile, dynamic=True)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        # input_ids, attention_mask, token_type_ids: (B, T) -> depth + 1 tensors of (B, T, D)
        extra = {"token_type_ids": token_type_ids} if self.token_type_ids and token_type_ids is not None else {}
        if self.tap is not None:
            self.tap.outputs.clear()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        hidden_states = tuple(out.hidden_states)
        if self.tap is not None:  # the deepest layer's own output, before any norm the model applies last
            hidden_states = hidden_states[:-1] + (self.tap.outputs[-1],)
        return hidden_states[: self.depth + 1]

    def _check_whole(self, probe: torch.Tensor, num_layers: int) -> tuple[torch.Tensor, ...]:
        """The uncut model's hidden states of the probe, once it is clear that strata can embed
        with it: it runs, it does not change itself while it runs (BigBird switches its attention
        for good after a short sequence), it numbers its hidden states by layer, and it is not a
        decoder (custom code can bring one past the driver's checks)."""
        before = _settings(self.model)
        whole = self._run(probe)
        changed = sorted(set(_settings(self.model).items()) - set(before.items()))
        again = None if changed else self._run(probe)
        if changed or not all(torch.equal(a, b) for a, b in zip(whole, again)):
            how = f"{changed[0][0]} became {changed[0][1]!r}" if changed else "the same sequence gives other hidden " \
                                                                             "states the second time"
            raise ModelError(f"{self.what} changes itself as it runs ({how}, after a sequence of {probe.shape[1]} "
                             "tokens): its vectors would depend on the documents before them, so strata cannot embed "
                             "with it")
        self._check_positions(probe, whole)
        if len(whole) != num_layers + 1:
            raise ModelError(f"{self.what} returns {len(whole)} hidden states for the {num_layers} layers config.json "
                             "names (num_hidden_layers): strata cannot tell which hidden state is which layer")
        self._check_attention(probe, whole[-1])
        return whole

    def _check_attention(self, probe: torch.Tensor, last: torch.Tensor) -> None:
        """Earlier tokens see later ones (a decoder's do not): with the last token changed, some
        earlier token's deepest hidden state must change too."""
        changed = _with_token_changed(probe, -1)
        if not torch.equal(self._run(changed)[-1][:, :-1], last[:, :-1]):
            return
        if torch.equal(self._run(_with_token_changed(probe, 0))[-1][:, 1:], last[:, 1:]):
            how = "no token's hidden state depends on any other token"
        else:
            how = "no earlier token's hidden state changes when the last token does (a decoder's causal attention)"
        raise ModelError(f"{self.what} is no encoder for a sequence of {probe.shape[1]} tokens: {how}; strata "
                         f"embeds {SUPPORTED}")

    def _cut(self, probe: torch.Tensor, whole: tuple[torch.Tensor, ...], num_layers: int, depth: int) -> None:
        """Drop the layers past `depth`, after checking on the probe that hidden states 0..depth
        stay those of the uncut model; where they would not, the model runs whole."""
        found = find_layers(self.model, num_layers) if depth < num_layers else None
        if found is None:
            return
        holder, layers = found
        removed = list(holder[depth:]) if holder is not None else []
        if holder is not None:
            del holder[depth:]
        self.model.config.num_hidden_layers = depth  # models that loop over range(num_hidden_layers) (ALBERT)
        self.tap = LayerTap([layer for layer in layers if all(layer is not r for r in removed)])
        try:
            cut = self._run(probe)
            kept = len(cut) == depth + 1 and all(_close(a, b) for a, b in zip(cut, whole))
        except Exception:  # noqa: BLE001 - a model that cannot run cut runs whole
            kept = False
        if not kept:  # put the layers back: correct numbers first, early exit second
            self.tap.remove()
            self.tap = None
            if holder is not None:
                holder.extend(removed)
            self.model.config.num_hidden_layers = num_layers

    def _check_length(self, max_length: int) -> None:
        """Sequences of max_length tokens run, and one of a prime length in between gives a vector
        per token: a limit the driver could not see in the model's position table, or a model that
        pads inside to a multiple of a chunk (Reformer), ends here in one line, before any fragment."""
        device = next(self.model.parameters()).device
        for length in sorted({_prime_at_most(min(PRIME_LENGTH, max_length)), max_length} - {PROBE_TOKENS}):
            probe = _probe(self.model.config, device, length)
            try:
                hidden_states = self._run(probe)
            except ProbeFailed as exc:
                raise ModelError(f"{self.what} cannot run a sequence of {length} tokens ({exc.cause}), which "
                                 f"model.max_length {max_length} allows; set a smaller model.max_length") from None
            self._check_positions(probe, hidden_states)
            self._check_attention(probe, hidden_states[-1])  # a model may turn causal past some length

    def _check_positions(self, probe: torch.Tensor, hidden_states: tuple[torch.Tensor, ...]) -> None:
        lengths = sorted({int(h.shape[1]) for h in hidden_states})
        if lengths != [probe.shape[1]]:
            raise ModelError(f"{self.what} returns hidden states of {lengths[-1]} positions for a sequence of "
                             f"{probe.shape[1]} tokens: strata cannot tell which vector is which token")

    @torch.inference_mode()
    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """All hidden states of a probe; a model that cannot run it is refused in one line."""
        saved, self.depth = self.depth, 10 ** 9
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        try:
            return self.forward(input_ids, mask, torch.zeros_like(input_ids))
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the model's code raises, one line
            dtype = next(self.model.parameters()).dtype
            hint = "" if dtype == torch.float32 else f", in {str(dtype).removeprefix('torch.')}: model.dtype float32 " \
                                                     "may run it"
            raise ProbeFailed(self.what, input_ids.shape[1], described(exc) + hint) from None
        finally:
            self.depth = saved


class ProbeFailed(ModelError):
    """The model cannot run a probe sequence: `cause` is what it raised, as one line."""

    def __init__(self, what: str, tokens: int, cause: str):
        super().__init__(f"{what} cannot run a sequence of {tokens} tokens ({cause}); strata embeds {SUPPORTED}")
        self.cause = cause


class LayerTap:
    """Forward hooks that keep what each given layer module returns, in call order (a shared
    layer, as ALBERT's, once per call). Per thread: a replica runs two fragments at once."""

    def __init__(self, layers: list[nn.Module]):
        self._local = threading.local()
        self.handles = [layer.register_forward_hook(self._keep) for layer in layers]

    @property
    def outputs(self) -> list[torch.Tensor]:
        """What the layers returned in this thread's forward passes since the last clear()."""
        if not hasattr(self._local, "outputs"):
            self._local.outputs = []
        return self._local.outputs

    def _keep(self, module, args, output) -> None:
        self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _probe(config, device: torch.device, length: int = 0) -> torch.Tensor:
    """(1, length or PROBE_TOKENS) ids spread over the vocabulary, none of them the padding id
    (RoBERTa-style positions skip padding)."""
    vocab = int(getattr(config, "vocab_size", 0) or 100)
    pad = getattr(config, "pad_token_id", None)
    ids = [(37 * k + 11) % vocab for k in range(length or PROBE_TOKENS)]
    ids = [(i + 1) % vocab if i == pad else i for i in ids]
    return torch.tensor([ids], device=device)


def _with_token_changed(probe: torch.Tensor, position: int) -> torch.Tensor:
    changed = probe.clone()
    other = position + 1 if position >= 0 else position - 1
    changed[0, position] = probe[0, other] if probe[0, other] != probe[0, position] else probe[0, other - 1]
    return changed


def _batch_mates_leak(encoder: Encoder, probe: torch.Tensor) -> bool:
    """Whether a window's hidden states depend on the other windows of its micro-batch: the probe
    beside two different sequences of its length must give bitwise the same hidden states (same
    shapes, same kernels: no tolerance needed)."""
    first = encoder._run(torch.cat([probe, probe.flip(1)]))
    second = encoder._run(torch.cat([probe, probe.roll(3, dims=1)]))
    return not all(torch.equal(a[:1], b[:1]) for a, b in zip(first, second))


def _padding_leaks(encoder: Encoder, probe: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether padding reaches the real positions: what stands in the masked positions (a
    convolution or a Fourier transform across the sequence: ConvBERT, FNet, YOSO, MobileBERT's
    trigram embeddings; compared bitwise, same shapes and kernels), or how many there are (a
    length-dependent position scaling; other shapes round otherwise, so compared within
    PADDING_TOLERANCE of the largest value)."""
    config, (_, n) = encoder.model.config, probe.shape
    pad = int(getattr(config, "pad_token_id", None) or 0)

    def padded(fill: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ids = torch.cat([probe, fill.view(1, -1)], dim=1)
        mask = torch.ones_like(ids)
        mask[0, n:] = 0
        return tuple(h[:, :n] for h in encoder._run(ids, mask))

    pads = torch.full((PADDING_PROBE,), pad, device=probe.device)
    first, second = padded(pads), padded(probe[0, :PADDING_PROBE])
    if not all(torch.equal(a, b) for a, b in zip(first, second)):
        return True
    longer = padded(pads.repeat(4))
    tolerance = PADDING_TOLERANCE[dtype == torch.float32]
    return not all(float((a.float() - b.float()).abs().max()) <= tolerance * max(1.0, float(b.float().abs().max()))
                   for a, b in zip(longer, first))


def _prime_at_most(n: int) -> int:
    return next(k for k in range(n, 1, -1) if all(k % d for d in range(2, int(k ** 0.5) + 1))) if n > 2 else n


def _settings(model: nn.Module) -> dict[str, object]:
    """The public string and flag attributes of every module ("encoder.attention_type"): how a
    module computes. Numbers are left out: caches keep lengths there (rotary embeddings' seen length)."""
    return {f"{name}.{key}".lstrip("."): value for name, module in model.named_modules()
            for key, value in vars(module).items()
            if not key.startswith("_") and key != "training" and isinstance(value, (str, bool))}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool((a - b).abs().max() <= CUT_TOLERANCE * max(1.0, float(b.abs().max())))
