"""deepsail.compress: quantization applied from outside the model — int8, int4 and dynamic int8 layers, their saved
format (`ds.from_pretrained` reads it back, no flag), and quantization-aware training (`qat.py`)."""

from deepsail.compress.quantize import (
    METHODS,
    QuantConfig,
    QuantExperts,
    QuantLinear,
    load_quantized,
    quant_layers,
    quantization_config_of,
    quantize,
    save_quantized,
)

__all__ = [
    "METHODS",
    "QuantConfig",
    "QuantExperts",
    "QuantLinear",
    "load_quantized",
    "quant_layers",
    "quantization_config_of",
    "quantize",
    "save_quantized",
]
