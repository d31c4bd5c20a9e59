"""`cram data`: raw text to packed, sorted, tokenized shards, and the loader that masks them.

Submodules are imported on demand (`from cramming.data import prepare`), so that spawning
tokenizer worker processes stays cheap and `import cramming.data` pulls in neither torch nor
datasets.
"""
