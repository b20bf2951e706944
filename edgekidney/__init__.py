"""edgekidney: a kidney-stone classifier for CT slices, from fine-tuning to a quantized edge engine."""

__version__ = "0.4.0"
