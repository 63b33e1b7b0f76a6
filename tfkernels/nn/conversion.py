"""convert(model): swap every nn.TransformerEncoderLayer in a model for the fused one, in place."""
from dataclasses import dataclass, field

from torch import nn

from .encoder_layer import TransformerEncoderLayer, why_not_convertible

__all__ = ["convert", "ConvertReport"]


@dataclass
class ConvertReport:
    """What convert() did: `swapped` [(name, what)], `left_alone` [(name, type, reason)], `notes`."""
    swapped: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __str__(self):
        lines = [f"tfkernels.nn.convert: swapped {len(self.swapped)}, left {len(self.left_alone)} alone"]
        lines += [f"  swapped    {name or '<root>'}: {what}" for name, what in self.swapped]
        lines += [f"  left alone {name or '<root>'} ({kind}): {why}" for name, kind, why in self.left_alone]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def convert(model, *, attention_dropout=None):
    """Swap every nn.TransformerEncoderLayer in `model` for tfkernels.nn.TransformerEncoderLayer, in place.

    The new layers take over the old layers' Parameter objects (weights, device, dtype,
    requires_grad, optimizer references) and train/eval mode. nn.TransformerEncoder
    stacks whose layers were swapped get their nested-tensor fast path turned off (it
    would hand the layers nested tensors and drop the padding mask); they keep working
    with mask, src_key_padding_mask and is_causal. Left alone, with the reason in the
    report: subclasses and layers with unusual parts (see ConvertReport), decoder layers
    (cross-attention), and bare nn.MultiheadAttention (its forward takes separate
    query/key/value, possibly different: swapping it blindly is unsafe; use
    tfkernels.nn.SelfAttention where you know it is self-attention).

    attention_dropout: None keeps each layer's attention dropout (torch's default is the
    layer's `dropout`), which the attention kernel applies in training as torch does; a
    number replaces it (the other dropouts stay). Returns a ConvertReport;
    `print(report)` lists it all.
    """
    if isinstance(model, nn.TransformerEncoderLayer):
        raise TypeError("tfkernels.nn.convert swaps layers inside a model; for a bare layer use "
                        "tfkernels.nn.TransformerEncoderLayer.from_torch(layer)")
    report = ConvertReport()
    _convert_children(model, "", report, attention_dropout)
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(layer, TransformerEncoderLayer) for layer in module.layers):
            if getattr(module, "use_nested_tensor", False):
                report.notes.append(f"{name or '<root>'}: nn.TransformerEncoder nested-tensor fast path turned off")
            module.use_nested_tensor = False
    return report


def _convert_children(module, prefix, report, attention_dropout):
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.TransformerEncoderLayer):
            reason = why_not_convertible(child)
            if reason:
                report.left_alone.append((full, type(child).__name__, reason))
            else:
                setattr(module, name, TransformerEncoderLayer.from_torch(child, attention_dropout=attention_dropout))
                report.swapped.append((full, "nn.TransformerEncoderLayer -> tfkernels.nn.TransformerEncoderLayer"))
        elif isinstance(child, nn.TransformerDecoderLayer):
            report.left_alone.append((full, type(child).__name__, "decoder layers (cross-attention) are not supported"))
        elif isinstance(child, nn.MultiheadAttention):
            report.left_alone.append((full, type(child).__name__, "bare nn.MultiheadAttention is not swapped: its "
                                      "forward takes separate query/key/value (possibly cross-attention)"))
        else:
            _convert_children(child, full, report, attention_dropout)
