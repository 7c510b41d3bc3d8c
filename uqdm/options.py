"""Names of the choices that the command line offers, importable without torch: `uqdm info` and
`uqdm truncate` must answer before PyTorch would have finished loading."""

RECONSTRUCTIONS = ("denoise", "ancestral", "flow_based")  # the pictures of a lossy truncation point
RELEASED_WEIGHTS = ("ema", "raw")  # what `uqdm import-official` takes from a released checkpoint
DEFAULT_LAYERS = 4  # quality layers per step of a `.uqdm` file (`uqdm compress --layers`)
BATCH_TILES = 4  # the codec's tiles per network call (--batch-tiles): float64 attention over 64×64 pixels is memory-bound
DEVICES = ("cpu", "cuda", "auto")  # where `uqdm compress` / `decompress` run the model (auto: cuda when available)
