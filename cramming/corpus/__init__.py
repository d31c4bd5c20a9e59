"""The prepared corpus as both sides of it see it: the shard and manifest format, the memmap dataset
and resumable loader (`shards`), and MLM masking (`masking`).

The data stage writes this format and the train stage reads it; neither imports the other, both
import this package (docs/design.md, floor 2).
"""
