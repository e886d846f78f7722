"""QuantLinear: a drop-in for nn.Linear holding one-byte weights and per-channel scales."""
from __future__ import annotations

import torch
from torch import nn

from engine.quant import reference

# Method name -> (weight format, per-channel scales?)
METHODS = {
    "int8": ("int8", True),
    "fp8": ("fp8", True),
    "fp8_tensor": ("fp8", False),
}


class QuantLinear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias. `use_triton` picks the fused Triton kernel
    (CUDA); `cpu_loop` the cpu backend's numba loop over int8 weights (cpu_ops.quant_linear,
    decode-sized batches); otherwise the weight is dequantized per call and multiplied by
    torch (the reference)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 method: str, use_triton: bool, cpu_loop: bool = False):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.method, self.use_triton, self.cpu_loop = method, use_triton, cpu_loop
        if cpu_loop:   # resolved once, not per call (engine.kernels imports engine.quant)
            from engine.kernels.cpu_ops import quant_linear as cpu_quant_linear
            self._cpu_quant_linear = cpu_quant_linear
        # Buffers, not parameters: nothing trains them, and .to()/state_dict still carry them.
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, method: str,
                    use_triton: bool, cpu_loop: bool = False) -> "QuantLinear":
        """Quantize a [out_features, in_features] matrix; `weight` itself is left as it is
        (the tied logits projection quantizes a copy of the embedding table this way)."""
        if method not in METHODS:
            raise ValueError(f"quantization must be one of {sorted(METHODS)}, got {method!r}")
        fmt, per_channel = METHODS[method]
        w = weight.detach()
        q, scale = reference.quantize_int8(w) if fmt == "int8" else reference.quantize_fp8(w, per_channel)
        bias = None if bias is None else bias.detach().clone()
        return cls(q.contiguous(), scale, bias, method, use_triton, cpu_loop)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, use_triton: bool,
                    cpu_loop: bool = False) -> "QuantLinear":
        return cls.from_weight(linear.weight, linear.bias, method, use_triton, cpu_loop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_loop:   # falls back to the reference where it cannot run
            return self._cpu_quant_linear(x, self.qweight, self.scale, self.bias)
        if not self.use_triton:
            return reference.quant_linear(x, self.qweight, self.scale, self.bias)
        from engine.quant.triton_kernels import quant_linear
        lead = x.shape[:-1]
        y = quant_linear(x.reshape(-1, self.in_features), self.qweight, self.scale, self.bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, method={self.method}, triton={self.use_triton}"
                f"{', cpu_loop=True' if self.cpu_loop else ''}")
