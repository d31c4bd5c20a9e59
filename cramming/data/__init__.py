"""`cram data`: raw text to packed, sorted, tokenized shards (their format, the loader that reads
them and the masker live in `cramming.corpus`, which the train stage reads them through).

Submodules are imported on demand (`from cramming.data import prepare`), so that spawning
tokenizer worker processes stays cheap and `import cramming.data` pulls in neither torch nor
datasets.
"""
