"""Stage 1, files to slices: decoding (with limits), series and volumes, datasets and splits, the one
preprocessing (numpy, no torch). Import the modules themselves; this package re-exports nothing, so that
``edgekidney.sidecar`` can import ``data.preprocess`` without pulling in the dataset code. See
docs/architecture.md.
"""
