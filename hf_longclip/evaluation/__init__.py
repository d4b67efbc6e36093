"""Evaluation on the standard long-text, short-text, fine-grained and zero-shot benchmarks.

>>> from hf_longclip.evaluation import evaluate, EvalSettings
>>> report = evaluate(model, processor, "urban1k,coco", "/data/benchmarks", output="results.json")
>>> evaluate_hard_negatives(model, processor, "hard_negatives.jsonl")["accuracy"]  # attribute binding, %

See ``docs/evaluation.md`` for each benchmark's expected local layout.
"""

from .fgovd import evaluate_fgovd, evaluate_fgovd_split, region_features, roi_weights
from .hard_negatives import (
    HARD_NEGATIVE_PREFIX,
    HardNegativeSet,
    evaluate_hard_negatives,
    hard_negative_accuracy,
    hard_negative_ranks,
    read_hard_negatives,
)
from .metrics import DEFAULT_KS, pairwise_accuracy, recall_at_k, retrieval_ranks, topk_accuracy
from .readers import (
    FGOVD_SPLITS,
    LAYOUTS,
    RETRIEVAL_READERS,
    BenchmarkLayoutError,
    ClassificationSet,
    FGOVDBox,
    FGOVDSet,
    RetrievalSet,
    read_class_folders,
    read_coco,
    read_coco_val2017,
    read_dci,
    read_docci,
    read_fgovd,
    read_flickr30k,
    read_sharegpt4v_1k,
    read_urban1k,
    read_zeroshot,
)
from .retrieval import EvalSettings, encode_images, encode_texts, evaluate_retrieval, score_matrix
from .runner import BENCHMARKS, LONG_TEXT_BENCHMARKS, evaluate, needs_data_root, parse_benchmarks
from .zeroshot import DEFAULT_TEMPLATES, class_embeddings, evaluate_zeroshot, load_templates

__all__ = [
    "BENCHMARKS",
    "DEFAULT_KS",
    "DEFAULT_TEMPLATES",
    "FGOVD_SPLITS",
    "HARD_NEGATIVE_PREFIX",
    "LAYOUTS",
    "LONG_TEXT_BENCHMARKS",
    "RETRIEVAL_READERS",
    "BenchmarkLayoutError",
    "ClassificationSet",
    "EvalSettings",
    "FGOVDBox",
    "FGOVDSet",
    "HardNegativeSet",
    "RetrievalSet",
    "class_embeddings",
    "encode_images",
    "encode_texts",
    "evaluate",
    "evaluate_fgovd",
    "evaluate_fgovd_split",
    "evaluate_hard_negatives",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "hard_negative_accuracy",
    "hard_negative_ranks",
    "load_templates",
    "needs_data_root",
    "pairwise_accuracy",
    "parse_benchmarks",
    "read_class_folders",
    "read_coco",
    "read_coco_val2017",
    "read_dci",
    "read_docci",
    "read_fgovd",
    "read_hard_negatives",
    "read_flickr30k",
    "read_sharegpt4v_1k",
    "read_urban1k",
    "read_zeroshot",
    "recall_at_k",
    "region_features",
    "retrieval_ranks",
    "roi_weights",
    "score_matrix",
    "topk_accuracy",
]
