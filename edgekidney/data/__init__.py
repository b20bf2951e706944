"""Reading CT slices and datasets (no torch)."""

from edgekidney.data.dataset import Dataset, Sample, SplitConfig, discover, read_manifest, split_dataset, write_manifest
from edgekidney.data.decode import decode_slice, load_slice

__all__ = ["Dataset", "Sample", "SplitConfig", "decode_slice", "discover", "load_slice", "read_manifest",
           "split_dataset", "write_manifest"]
