"""Data: tokenizers built locally, synthetic demo data, per-variant collators, readers, transforms and datasets."""

from .collate import LongCLIPCollator
from .collate_fixclip import FixCLIPCollator
from .collate_betaclip import BetaCLIPCollator
from .collate_mulclip import MulCLIPCollator
from .collate_finelip import FineLIPCollator
from .tokenizer import build_clip_tokenizer
from .images import BadImageError, load_image
from .transforms import EvalTransform, TrainTransform, build_transform, transform_from_processor
from .sources import (
    TrainingSourceSpec,
    load_hf_dataset,
    open_training_source,
    read_caption_table,
    read_sharegpt4v,
)
from .shards import TarShardDataset, TarShardSource, make_shards, write_shards
from .dataset import (
    BadSampleError,
    IterableLongCaptionDataset,
    LongCaptionDataset,
    SkipCounter,
    SkipCountingCollator,
    SkippedSample,
    ValidationReport,
    make_dataloader,
    validate_records,
)
from .index import RecordIndex, open_record_index

__all__ = [
    "BetaCLIPCollator",
    "FineLIPCollator",
    "FixCLIPCollator",
    "LongCLIPCollator",
    "MulCLIPCollator",
    "RecordIndex",
    "build_clip_tokenizer",
    "BadImageError",
    "BadSampleError",
    "EvalTransform",
    "IterableLongCaptionDataset",
    "LongCaptionDataset",
    "SkipCounter",
    "SkipCountingCollator",
    "SkippedSample",
    "TarShardDataset",
    "TarShardSource",
    "TrainTransform",
    "TrainingSourceSpec",
    "ValidationReport",
    "build_transform",
    "load_hf_dataset",
    "load_image",
    "make_dataloader",
    "make_shards",
    "open_record_index",
    "open_training_source",
    "read_caption_table",
    "read_sharegpt4v",
    "transform_from_processor",
    "validate_records",
    "write_shards",
]
