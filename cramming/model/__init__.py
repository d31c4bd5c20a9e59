"""The crammed BERT model, its attention backends, random-LTD and the transformers export.

Importing this package registers `crammed-bert` with transformers' Auto* classes.
"""

from cramming.model.bert import (
    CrammedBertForMLM,
    CrammedBertForSequenceClassification,
    ModelConfig,
    count_parameters,
    training_flops_per_sequence,
)
from cramming.model.export import (
    build_model,
    load_model,
    load_tokenizer,
    register_with_transformers,
    save_pretrained,
)

register_with_transformers()

__all__ = [
    "CrammedBertForMLM",
    "CrammedBertForSequenceClassification",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "save_pretrained",
    "training_flops_per_sequence",
]
