"""open_clip's own trainer on longcap exports, in longcap's environment:
`python -m workflows.open_clip_main --train-data 'runs/demo/export/{00000..00001}-000.tar' ...` takes exactly
open_clip_train.main's arguments (see `--help`) and runs it unchanged but for one fix.

Why the fix: open_clip_train groups tar members with its own `group_by_keys_nothrow`, written before webdataset
(0.2.87 and later; 0.2.111 here, inside img2dataset's range `<0.3`) began yielding an empty end-of-shard
marker `{}` after every shard; it reads `filesample["fname"]` from that marker and fails with KeyError 'fname'.
open_clip's training requirements pin webdataset<=0.2.86, which longcap's own loader (and newer img2dataset
releases) cannot use, so instead of pinning an old webdataset this entry point drops the marker before open_clip
groups. Samples of two shards are still told apart by their keys, which are unique in an export.
The export's `sizes.json` gives open_clip the sample count, so `--train-num-samples` is not needed.
"""

from __future__ import annotations

import sys


def without_end_markers(expander):
    """webdataset's tar_file_expander with the end-of-shard markers left out."""
    def expand(*args, **kwargs):
        return (sample for sample in expander(*args, **kwargs) if sample)
    return expand


def patch_open_clip_train() -> None:
    """Make open_clip_train.data read shards from this webdataset (idempotent; DataLoader workers forked after
    this call inherit it)."""
    import open_clip_train.data as data

    if not getattr(data.tar_file_expander, "longcap_patched", False):
        data.tar_file_expander = without_end_markers(data.tar_file_expander)
        data.tar_file_expander.longcap_patched = True


def main(argv: list[str] | None = None):
    patch_open_clip_train()
    from open_clip_train.main import main as open_clip_main

    return open_clip_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
