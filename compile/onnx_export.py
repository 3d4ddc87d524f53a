"""Export a baked sampler to ONNX with a dynamic batch dimension, and check the graph.

We use PyTorch's TorchScript exporter (``dynamo=False``): measured here, it exported the unrolled
5-step loop over a small UNet in about 1.7 s with every weight stored once, and needs no ``onnxscript``;
the dynamo exporter took 22.7 s on the same module. Opset 17 (GroupNorm and LayerNorm patterns, einsum,
and what onnxruntime and TensorRT 8.6+ both read). Two swaps hold only while exporting: torch's RMSNorm decomposed
(opset 17 has none) and diffusers' rotary embedding split with ``unflatten`` (so Flux keeps a dynamic batch).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from autotune.errors import BackendError

OPSET = 17
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"


@contextlib.contextmanager
def _exportable_rms_norm():
    """torch.nn.RMSNorm (Flux's q/k norms) as mean / rsqrt / mul while exporting: opset 17 has no RMSNorm, and the
    TorchScript exporter refuses ``aten::rms_norm``. The same formula as torch's (eps None: the dtype's eps)."""
    original = torch.nn.RMSNorm.forward

    def decomposed(self: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        dims = tuple(range(-len(self.normalized_shape), 0))
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y * self.weight if self.weight is not None else y

    torch.nn.RMSNorm.forward = decomposed
    try:
        yield
    finally:
        torch.nn.RMSNorm.forward = original


ROTARY_MODULES = ("diffusers.models.transformers.transformer_flux",)  # modules calling apply_rotary_emb by name


@contextlib.contextmanager
def _batch_free_rotary_embedding():
    """diffusers' ``apply_rotary_emb`` (Flux's attention: q and k as pairs) with ``unflatten`` while exporting.

    It splits the head dim into pairs with ``x.reshape(*x.shape[:-1], -1, 2)``. Traced, those ``x.shape`` reads are
    ``aten::size`` calls, but the exporter writes ``aten::size`` of a value whose type it holds as static as a
    Constant, and here it does: the attention's ``query.unflatten(-1, (-1, head_dim))`` exports as a Reshape to a
    shape of unknown length (its dim index is computed in the graph), ONNX shape inference gives up on it and the
    exporter keeps the traced type (2, tokens, heads, head_dim) through the RMSNorm and ``torch.cat([encoder_q,
    q])``. So the graph reshaped to ``[2, 528, 1, -1, 2]`` (the export batch) and a batch of 1 or 3 failed in the
    rotation's broadcast. ``x.unflatten(-1, (-1, 2))`` is the same reshape, exported as ``Shape -> Slice -> Concat
    -> Reshape`` of the run-time shape. Only the ``use_real`` / unbind-dim -1 path (Flux's) is rewritten, bit-equal;
    every other call goes to diffusers' own function. Swapped in the modules that imported it by name, when they are
    loaded, and restored on exit."""
    import sys

    modules = [m for m in (sys.modules.get(name) for name in ROTARY_MODULES) if hasattr(m, "apply_rotary_emb")]
    originals = [m.apply_rotary_emb for m in modules]

    def patched(original: Any) -> Any:
        def apply_rotary_emb(x: torch.Tensor, freqs_cis: Any, use_real: bool = True, use_real_unbind_dim: int = -1,
                             sequence_dim: int = 2) -> torch.Tensor:
            if not (use_real and use_real_unbind_dim == -1 and sequence_dim in (1, 2)):
                return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
            cos, sin = freqs_cis  # (S, D)
            index = (None, slice(None), None, slice(None)) if sequence_dim == 1 else (None, None)
            cos, sin = cos[index].to(x.device), sin[index].to(x.device)
            x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
            x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
            return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)
        return apply_rotary_emb

    for module, original in zip(modules, originals):
        module.apply_rotary_emb = patched(original)
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.apply_rotary_emb = original


def export_onnx(baked: torch.nn.Module, example_inputs: dict[str, torch.Tensor], path: Path,
                input_names: list[str], output_names: list[str], opset: int = OPSET) -> dict[str, Any]:
    """Write ``baked`` as ONNX at ``path`` (batch dimension 0 of every input and output dynamic).

    Returns the facts the manifest records: opset, exporter, export seconds, initializer count.
    Raises BackendError when the export fails or ``onnx.checker`` rejects the graph.
    """
    import onnx

    args = tuple(example_inputs[n] for n in input_names)
    dynamic = {n: {0: "batch"} for n in [*input_names, *output_names]}
    started = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _exportable_rms_norm(), _batch_free_rotary_embedding():
            # the tracer warns about every Python bool / shape read in the models; the loop is fixed by design
            warnings.simplefilter("ignore")
            torch.onnx.export(baked.eval(), args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
    except Exception as e:  # the exporter raises many unrelated types; name it in one line
        raise BackendError(f"onnx export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
            from None
    seconds = time.perf_counter() - started
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise BackendError(f"{path}: onnx.checker rejects the exported graph ({str(e).splitlines()[0]})") from None
    return {
        "opset": opset,
        "exporter": EXPORTER,
        "export_s": round(seconds, 2),
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "initializers": len(proto.graph.initializer),
        "nodes": len(proto.graph.node),
    }
