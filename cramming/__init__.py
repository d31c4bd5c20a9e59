"""cramming: pretrain a BERT-style masked language model on one GPU within a wall-clock budget."""

__version__ = "0.1.0"
