"""The ``hf-longclip`` command: the ``train``, ``convert``, ``stretch``, ``export``, ``evaluate``, ``push``,
``generate``, ``make-shards`` and ``build-index`` sub-commands, and ``--version``.

Sub-commands are registered in :data:`SUBCOMMANDS`; a handler reports bad input by raising :class:`CommandError`
(one ``error: ...`` line, exit status 1). ``hf-longclip train ...`` hands its words to the training entry point
(:mod:`hf_longclip.train`, which has its own settings parser). See docs/training.md, docs/longclip.md (Command line)
and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class CommandError(Exception):
    """Bad input to a sub-command; :func:`main` prints ``error: <message>`` and exits with status 1."""


def _one_line(error: BaseException | str) -> str:
    """An exception's message on one line (transformers' loading errors span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _load_model_and_processor(source: str, revision: str | None, trust_remote_code: bool, device: str | None = None):
    """The model and processor saved at `source`, or a `CommandError` saying why they cannot be loaded."""
    import hf_longclip  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel, AutoProcessor

    if _looks_local(source) and not Path(source).is_dir():
        raise CommandError(f"--model {source!r} is not a folder")
    kwargs = {"revision": revision} if revision else {}
    try:
        model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as error:  # no config / weights / processor files, an unknown model_type
        raise CommandError(f"cannot load a model and processor from {source!r}: {_one_line(error)}") from error
    if device:
        model = model.to(device)
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------- shared checks
def _variant_names() -> list[str]:
    """The registered variants (``--variant`` choices; model types the commands accept)."""
    from .variants import VARIANTS

    return list(VARIANTS)


def _config_dict(source: str, what: str, revision: str | None = None) -> dict:
    """The ``config.json`` of a folder or Hub id, or a `CommandError` saying why there is none."""
    from transformers import PreTrainedConfig

    if _looks_local(source) and not Path(source).is_dir():
        raise CommandError(f"{what} {source!r} is not a folder")
    try:
        config, _ = PreTrainedConfig.get_config_dict(source, **({"revision": revision} if revision else {}))
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read a config for {what} {source!r}: {_one_line(error)}") from error
    if not config:
        raise CommandError(f"{what} {source!r} has no config.json")
    return config


def _looks_local(source: str) -> bool:
    """True for what can only be a path (exists, starts with . / ~, or has more than one '/'), not a Hub id."""
    return os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1


def _load_processor(source: str, max_length: int, revision: str | None = None):
    """A `LongCLIPProcessor` from the CLIP tokenizer + image processor of `source`, at `max_length` tokens."""
    from .models.processing_longclip import LongCLIPProcessor

    if _looks_local(source) and not Path(source).is_dir():
        raise CommandError(f"processor source {source!r} is not a folder")
    try:
        processor = LongCLIPProcessor.from_clip(source, max_length=max_length, **({"revision": revision} if revision else {}))
    except (OSError, ValueError, TypeError) as error:
        raise CommandError(f"cannot load a CLIP tokenizer and image processor from {source!r}: {_one_line(error)}") from error
    # CLIPTokenizer.from_pretrained on a folder (or an unreachable Hub id) without vocab.json / merges.txt /
    # tokenizer.json silently returns a tokenizer of the 2 special tokens: refuse it rather than save it.
    if len(processor.tokenizer) <= 2:
        raise CommandError(
            f"{source!r} holds no CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json); "
            "pass a CLIP checkpoint folder or Hub id that has them"
        )
    return processor


def _check_processor_fits(processor, model, source: str) -> None:
    """The tokenizer's ids must exist in the model's vocabulary and the image crop must match the image tower."""
    vocab = model.config.text_config.vocab_size
    if len(processor.tokenizer) > vocab:
        raise CommandError(
            f"the tokenizer of {source!r} has {len(processor.tokenizer)} tokens but the model's vocabulary has {vocab}"
        )
    image_processor = processor.image_processor
    crop = getattr(image_processor, "crop_size", None) or {}
    if getattr(image_processor, "do_center_crop", False) and crop.get("height"):
        size = model.config.vision_config.image_size
        if (crop["height"], crop["width"]) != (size, size):
            raise CommandError(
                f"the image processor of {source!r} crops to {crop['height']}x{crop['width']} but the model's image "
                f"tower takes {size}x{size}; pass a processor source matching the model (e.g. --base-processor "
                "openai/clip-vit-large-patch14-336 for a 336 px model)"
            )


def _take_special_ids(model, tokenizer) -> None:
    """Set the text config's start / end-of-text ids to the tokenizer's.

    The authors' files store no token ids; conversion takes the last two ids of the vocabulary (OpenAI's layout:
    49406 / 49407). The text tower pools at the first ``eos_token_id``, so the config must name the end-of-text id of
    the tokenizer saved with the model, or every caption is pooled at position 0.
    """
    text_config = model.config.text_config
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(text_config, name, value)
    model.text_model.eos_token_id = text_config.eos_token_id  # read once when the text tower is built


def _text_length(model) -> int:
    return model.config.text_config.max_position_embeddings


def _describe(model) -> str:
    text, vision = model.config.text_config, model.config.vision_config
    return (
        f"{type(model).__name__} ({text.max_position_embeddings} text positions, {text.num_hidden_layers}-layer "
        f"width-{text.hidden_size} text tower, ViT {vision.image_size} px / {vision.patch_size})"
    )


# ----------------------------------------------------------------------------------------------- convert
def _add_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert the authors' released .pt checkpoints (Long-CLIP, FineLIP, beta-CLIP) to a saved model folder",
        description="Reads the .pt with torch.load(weights_only=True) (no pickled code runs), recognises the layout "
        "(or takes --variant), merges the frozen and trained position tables, keeps FineLIP's aggregation heads and "
        "beta-CLIP's pooling block and temperatures, and saves the model plus a LongCLIPProcessor built from a stock "
        "CLIP's tokenizer and image processor, so AutoModel / AutoProcessor.from_pretrained(OUTPUT) work. Nothing is "
        "written when the conversion fails.",
    )
    p.add_argument("--checkpoint", required=True, help="the original .pt file")
    p.add_argument("--output", required=True, help="output folder")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--base-processor", default=None,
        help="Hub id or folder of the stock CLIP whose tokenizer / image processor to use "
        "(default: openai/clip-vit-base-patch16; openai/clip-vit-large-patch14 for longclip-L.pt)",
    )
    source.add_argument("--processor-dir", default=None, help="a local folder holding a CLIP tokenizer + image processor")
    p.add_argument("--variant", default=None, help="the checkpoint's variant (default: recognised from its keys)")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="a field of the variant's config (repeatable), e.g. --set beta_cal_mode=bce for beta-CLIP's BCE model",
    )
    p.add_argument("--keep", type=int, default=20, help="leading position rows the authors kept frozen (default 20)")
    p.add_argument("--text-heads", type=int, default=None, help="text attention heads (default: width // 64, as OpenAI)")
    p.add_argument("--vision-heads", type=int, default=None, help="image attention heads (default: width // 64)")
    p.set_defaults(handler=_run_convert)


def _run_convert(args) -> int:
    from .conversion import convert_original_checkpoint

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise CommandError(f"checkpoint {args.checkpoint!r} is not a file")
    if args.processor_dir is not None and not Path(args.processor_dir).is_dir():
        raise CommandError(f"--processor-dir {args.processor_dir!r} is not a folder")
    processor_source = args.processor_dir or args.base_processor or "openai/clip-vit-base-patch16"
    processor = _load_processor(processor_source, 248)  # before the (slow) conversion, so a bad source fails fast
    fields = _parse_set(args.set)  # checked against the recognised variant's config by the converter
    try:
        model = convert_original_checkpoint(
            checkpoint, variant=args.variant, position_keep=args.keep, text_num_heads=args.text_heads,
            vision_num_heads=args.vision_heads, **fields,
        )
    except Exception as error:  # torch.load's refusals, missing keys, wrong shapes: all mean "not this format"
        hint = " (--text-heads / --vision-heads)" if "num_heads" in str(error) else ""
        raise CommandError(f"cannot convert {args.checkpoint!r}: {type(error).__name__}: {_one_line(error)}{hint}") from error
    processor.tokenizer.model_max_length = _text_length(model)
    _check_processor_fits(processor, model, processor_source)
    _take_special_ids(model, processor.tokenizer)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"wrote {_describe(model)} and LongCLIPProcessor (tokenizer and image processor of {processor_source}) "
          f"to {args.output}")
    return 0


# ----------------------------------------------------------------------------------------------- stretch
def _add_stretch(subparsers) -> None:
    p = subparsers.add_parser(
        "stretch",
        help="build an untrained variant model (248 text positions) from a stock CLIP and save it with its processor",
        description="Stretches the stock CLIP's text position table (Long-CLIP's knowledge-preserving stretch: rows "
        "< --keep copied, each later row interpolated into --ratio rows) and adds the variant's freshly initialised "
        "heads. Variants: " + ", ".join(_variant_names()) + ".",
    )
    p.add_argument("--base", required=True, help="a stock CLIP checkpoint: Hub id (openai/clip-vit-base-patch16) or folder")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--variant", default="longclip", help="one of: " + ", ".join(_variant_names()) + " (default longclip)")
    p.add_argument("--keep", type=int, default=20, help="leading position rows copied unchanged and frozen (default 20)")
    p.add_argument("--ratio", type=int, default=4, help="rows made from each later source row (default 4: 77 -> 248)")
    p.add_argument("--processor", default=None, help="tokenizer / image processor source (default: --base)")
    p.add_argument("--reset-logit-scale", action="store_true",
                   help="set logit_scale to 4.6052 (ln 100), as Long-CLIP's and FineLIP's training code does "
                        "(default: keep the source's, which OpenAI's CLIPs already hold)")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="a field of the variant's config (repeatable; VALUE is read as JSON, else as a string), e.g. "
        "--set num_groups=2 --set short_loss_weight=0.5",
    )
    p.add_argument("--revision", default=None, help="Hub revision of --base")
    p.set_defaults(handler=_run_stretch)


def _parse_set(pairs: list[str]) -> dict:
    """``FIELD=VALUE`` strings -> keyword arguments (VALUE read as JSON, else as a string)."""
    fields = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw
    return fields


def _config_fields(pairs: list[str], model_class) -> dict:
    """`_parse_set`, checked against the fields the variant's `from_clip` takes."""
    fields = _parse_set(pairs)
    known = set(model_class.variant_config_fields())
    for key in fields:
        if key not in known:
            raise CommandError(
                f"{model_class.config_class.__name__} has no field {key!r}; fields: {', '.join(sorted(known))}"
            )
    return fields


def _run_stretch(args) -> int:
    import hf_longclip
    from transformers import CLIPModel

    from .models.configuration_longclip import validate_stretch

    try:
        cls = hf_longclip.get_variant(args.variant).model_class
    except ValueError as error:
        raise CommandError(str(error)) from None
    fields = _config_fields(args.set, cls)
    config = _config_dict(args.base, "--base", args.revision)
    model_type = config.get("model_type")
    if model_type != "clip":
        kind = f"a {model_type!r} model" if model_type else "not a transformers model (no model_type)"
        hint = " (already long: fine-tune or export it instead)" if model_type in _variant_names() else ""
        raise CommandError(f"--base {args.base!r} is {kind}{hint}; stretch takes a stock CLIP checkpoint (model_type 'clip')")
    source_rows = config.get("text_config", {}).get("max_position_embeddings", 77)
    try:
        validate_stretch(source_rows, args.keep, args.ratio)
    except ValueError as error:
        raise CommandError(_one_line(error)) from error
    rows = args.keep + args.ratio * (source_rows - args.keep)
    processor_source = args.processor or args.base
    processor = _load_processor(processor_source, rows, args.revision if args.processor is None else None)
    try:
        clip = CLIPModel.from_pretrained(args.base, **({"revision": args.revision} if args.revision else {}))
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load the CLIP weights of {args.base!r}: {_one_line(error)}") from error
    try:
        model = cls.from_clip(
            clip, position_keep=args.keep, position_ratio=args.ratio, reset_logit_scale=args.reset_logit_scale, **fields
        )
    except (ValueError, TypeError) as error:  # config validation, e.g. Fix-CLIP groups that do not divide the layers
        raise CommandError(f"cannot build a {cls.__name__} from {args.base!r}: {_one_line(error)}") from error
    _check_processor_fits(processor, model, processor_source)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"wrote untrained {_describe(model)} stretched from {args.base} ({source_rows} -> {rows} positions, keep "
          f"{args.keep}, ratio {args.ratio}) and LongCLIPProcessor to {args.output}")
    return 0


# ----------------------------------------------------------------------------------------------- export
EXPORT_FORMATS = ("clip", "text", "text-with-projection", "diffusers-text-encoder", "single-file")
_EXPORT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a saved hf_longclip model as stock transformers CLIP folders, the diffusers text-encoder layout "
        "or one .safetensors file",
        description="Formats: clip (CLIPModel + CLIPProcessor), text (CLIPTextModel + tokenizer), "
        "text-with-projection (CLIPTextModelWithProjection + tokenizer), diffusers-text-encoder (text_encoder/ + "
        "tokenizer/ for StableDiffusionPipeline.from_pretrained(base, text_encoder=..., tokenizer=...)), "
        "single-file (one .safetensors file of the text encoder with transformers text_model.* names plus "
        "text_projection.weight, the layout ComfyUI's CLIP loaders read; --output must end in .safetensors). "
        "Folder formats write safetensors weights under names that transformers 4.x and 5 both load without "
        "missing or unexpected keys, and a tokenizer with tokenizer.json, vocab.json and merges.txt, so the slow "
        "and the fast CLIPTokenizer of both versions load it. Every tokenizer has model_max_length equal to the "
        "model's text length (248). The variant's training heads are dropped; the result loads without "
        "hf_longclip. See docs/diffusion.md (Export).",
    )
    p.add_argument("--model", required=True, help="a saved hf_longclip model folder (or Hub id) with its processor")
    p.add_argument("--output", required=True, help="output folder (single-file: the .safetensors file to write)")
    p.add_argument("--format", required=True, help="one of: " + ", ".join(EXPORT_FORMATS))
    p.add_argument(
        "--pad-with", default="longclip", choices=["longclip", "eos", "base"],
        help="diffusers-text-encoder: pad token of the saved tokenizer (longclip: id 0 as the authors' SD code; eos; "
        "base: keep the tokenizer's); see docs/diffusion.md",
    )
    p.add_argument(
        "--no-projection", action="store_true",
        help="single-file: leave out text_projection.weight (default: included, the names of a "
        "CLIPTextModelWithProjection)",
    )
    p.add_argument(
        "--dtype", default=None, choices=sorted(_EXPORT_DTYPES),
        help="single-file: store the tensors in this precision (default: the model's dtype)",
    )
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    from .models.modeling_longclip import LongCLIPModel

    if args.format not in EXPORT_FORMATS:
        raise CommandError(f"unknown format {args.format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    single = args.format == "single-file"
    if single and not args.output.endswith(".safetensors"):
        raise CommandError(
            f"--format single-file writes one .safetensors file; --output {args.output!r} must end in .safetensors"
        )
    if not single and (args.no_projection or args.dtype):
        raise CommandError("--no-projection and --dtype apply to --format single-file only")
    if single and Path(args.output).is_dir():
        raise CommandError(f"--output {args.output!r} is a folder; pass the path of the .safetensors file to write")
    model_type = _config_dict(args.model, "--model", args.revision).get("model_type")
    if model_type not in _variant_names():
        hint = " (stretch it first: hf-longclip stretch --base ...)" if model_type == "clip" else ""
        raise CommandError(
            f"--model {args.model!r} is not an hf_longclip model (model_type {model_type!r}){hint}; expected one of "
            f"{', '.join(_variant_names())}"
        )
    try:
        model, processor = _load_model_and_processor(args.model, args.revision, args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load {args.model!r}: {_one_line(error)}") from error
    if not isinstance(model, LongCLIPModel):
        raise CommandError(f"--model {args.model!r} loaded as {type(model).__name__}, not an hf_longclip model")
    from .export import save_clip_processor, save_model, save_single_file, save_tokenizer

    tokenizer = processor.tokenizer
    tokenizer.model_max_length = _text_length(model)
    output = Path(args.output)
    try:
        if args.format == "clip":
            exported = model.to_clip_model()
            save_model(exported, output)
            save_clip_processor(processor.image_processor, tokenizer, output)
            what = "CLIPProcessor"
        elif args.format in ("text", "text-with-projection"):
            exported = model.to_text_model(with_projection=args.format == "text-with-projection")
            save_model(exported, output)
            save_tokenizer(tokenizer, output)
            what = "CLIPTokenizer"
        elif single:
            import torch

            exported = model.to_text_model(with_projection=not args.no_projection)
            dtype = getattr(torch, _EXPORT_DTYPES[args.dtype]) if args.dtype else None
            save_single_file(exported, output, with_projection=not args.no_projection, dtype=dtype)
        else:
            from .diffusion import export_text_encoder

            exported = model.to_text_model()
            export_text_encoder(exported, output, tokenizer, pad_with=args.pad_with)
            what = "tokenizer/"
    except NotImplementedError as error:  # Fix-CLIP's prompted image tower has no stock equivalent
        raise CommandError(_one_line(error)) from error
    if single:
        keys = "text_model.* + text_projection.weight" if not args.no_projection else "text_model.*"
        print(f"wrote {type(exported).__name__} weights ({keys}, {_text_length(model)} positions"
              f"{', ' + args.dtype if args.dtype else ''}) exported from {type(model).__name__} to {output}")
        return 0
    where = f"{output / 'text_encoder'} and {output / 'tokenizer'}" if args.format == "diffusers-text-encoder" else str(output)
    print(f"wrote stock {type(exported).__name__} ({_text_length(model)} text positions) + {what} "
          f"({tokenizer.model_max_length}-token) exported from {type(model).__name__} to {where}; loads under "
          "transformers 4.x and 5")
    return 0


# ----------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(subparsers) -> None:
    from .evaluation.runner import BENCHMARKS

    p = subparsers.add_parser(
        "evaluate",
        help="score a model on retrieval / FG-OVD / zero-shot benchmarks and write a JSON results file",
        description="Benchmarks: " + ", ".join(BENCHMARKS) + " (or 'all'), and hardneg:<file.jsonl> for an "
        "attribute-binding hard-negative file. Layouts under --data-root: docs/evaluation.md.",
    )
    p.add_argument("--model", required=True, help="a saved model folder or a Hub id")
    p.add_argument(
        "--benchmarks", default="urban1k",
        help="comma-separated names, or 'all'; hardneg:<file.jsonl> scores a hard-negative file (path as given, else "
        "under --data-root)",
    )
    p.add_argument(
        "--data-root", default=None,
        help="folder holding the benchmarks in their documented layouts (not needed for hardneg: files alone)",
    )
    p.add_argument("--output", default="eval_results.json", help="results JSON path")
    p.add_argument("--scoring", default="global", help="retrieval scoring mode of the model (global, fused, tci, ...)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--fgovd-splits", default=None, help="comma-separated FG-OVD splits (default: all found)")
    p.add_argument("--templates", default=None, help="zero-shot prompt templates file (one '{}' template per line)")
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args) -> int:
    import torch

    from .evaluation import BenchmarkLayoutError, EvalSettings, evaluate, needs_data_root, parse_benchmarks
    from .evaluation.runner import check_output_path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    try:  # everything checkable is checked before the model is loaded
        benchmarks = parse_benchmarks(args.benchmarks)
        if args.data_root is None and needs_data_root(benchmarks):
            raise ValueError("--data-root is required for " + ", ".join(b for b in benchmarks if needs_data_root([b])))
        settings = EvalSettings(
            batch_size=args.batch_size, device=device, dtype=dtype, num_workers=args.num_workers, progress=not args.no_progress
        )
    except ValueError as error:
        raise CommandError(_one_line(error)) from error
    try:
        check_output_path(args.output)
    except ValueError as error:
        raise CommandError(f"--output: {_one_line(error)}") from error
    model, processor = _load_model_and_processor(args.model, args.revision, args.trust_remote_code, device)
    splits = args.fgovd_splits.split(",") if args.fgovd_splits else None
    try:
        report = evaluate(
            model, processor, benchmarks, args.data_root, scoring=args.scoring, settings=settings,
            fgovd_splits=splits, zeroshot_templates=args.templates, output=args.output, model_name=args.model,
        )
    except (BenchmarkLayoutError, ValueError, TypeError, OSError) as error:  # OSError: writing the results file
        raise CommandError(_one_line(error)) from error
    for name, metrics in report["benchmarks"].items():
        shown = {k: round(v, 2) for k, v in metrics.items()
                 if isinstance(v, float) and ("R@" in k or "top" in k or "accuracy" in k or k in ("chance", "mean_rank"))}
        print(f"{name}: {json.dumps(shown)}")
    print(f"results written to {args.output}")
    return 0


# ----------------------------------------------------------------------------------------------- push
def _add_push(subparsers) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload a saved model, its processor and a generated model card to the Hub in one commit",
    )
    p.add_argument("--model", required=True, help="a saved model folder (with its processor)")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--results", default=None, help="evaluation results JSON (from `hf-longclip evaluate`) for the card")
    p.add_argument("--base-model", default=None, help="the CLIP checkpoint the model was fine-tuned from")
    p.add_argument("--dataset", action="append", default=None, help="training data set id (repeatable)")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument(
        "--export-clip", action="store_true",
        help="also upload a stock CLIPModel + CLIPProcessor export under clip/ (as `export --format clip`: loads "
        "under transformers 4.x and 5)",
    )
    p.add_argument(
        "--export-diffusers-text-encoder", action="store_true",
        help="also upload text_encoder/ + tokenizer/ for diffusers (as `export --format diffusers-text-encoder`: "
        "loads under transformers 4.x and 5, slow and fast CLIPTokenizer)",
    )
    p.add_argument("--commit-message", default=None)
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--token", default=None)
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(handler=_run_push)


def _run_push(args) -> int:
    from .hub import check_push_inputs, push_to_hub

    try:  # offline mode, the repository id and the results file: before the model is even loaded
        check_push_inputs(args.repo_id, args.results)
    except (OSError, ValueError) as error:
        raise CommandError(_one_line(error)) from error
    model, processor = _load_model_and_processor(args.model, None, args.trust_remote_code)
    try:
        info = push_to_hub(
            model,
            processor,
            args.repo_id,
            results=args.results,
            base_model=args.base_model,
            datasets=args.dataset,
            license=args.license,
            export_clip=args.export_clip,
            export_diffusers_text_encoder=args.export_diffusers_text_encoder,
            commit_message=args.commit_message,
            revision=args.revision,
            private=args.private or None,
            create_pr=args.create_pr,
            token=args.token,
            endpoint=args.endpoint,
        )
    except (OSError, ValueError, TypeError) as error:  # the Hub's answers, no network, a card that cannot render
        raise CommandError(f"push to {args.repo_id!r} failed: {_one_line(error)}") from error
    print(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
    return 0


# ----------------------------------------------------------------------------------------------- generate
def _add_generate(subparsers) -> None:
    from .generate import add_arguments

    p = subparsers.add_parser(
        "generate",
        help="images from long prompts with an SD / SDXL / SD3 / Flux pipeline whose CLIP encoders read 248 tokens",
        description="Build the long-prompt pipeline for SD 1.x/2.x, SDXL, SD3/3.5 or Flux (recognised from its "
        "components), encode every prompt at 248 tokens (windows past that where the pipeline reads per-token "
        "embeddings) and write 00000.png, ... and generate.json (settings, token counts, seeds, timings) to --out. "
        "Offline demo: --tiny sd|sdxl|sd3|flux.",
    )
    add_arguments(p)
    p.set_defaults(handler=_run_generate)


def _run_generate(args) -> int:
    from .extras import require
    from .generate import run_from_args

    require("diffusers", "diffusion", "hf-longclip generate")
    try:
        run_from_args(args)
    except (ValueError, OSError) as error:
        raise CommandError(_one_line(error)) from error
    return 0


# ----------------------------------------------------------------------------------------------- make-shards
def _add_make_shards(subparsers) -> None:
    p = subparsers.add_parser(
        "make-shards",
        help="write a ShareGPT4V JSON or a caption table (JSONL/JSON/CSV/TSV) as webdataset tar shards for training",
        description="Reads the captions as training does (a ShareGPT4V file gives its --split, by default the "
        "entries after the --holdout head), leaves out records with a bad caption or id or a missing, empty or "
        "oversized image file (counted per reason), shuffles them (--seed; --no-shuffle keeps the order) and writes "
        "OUT/00000.tar, 00001.tar, ... (each written under a temporary name, then renamed) holding <key>.<image "
        "ext> (the file's bytes), <key>.txt and <key>.json (caption, id, short caption; beta-CLIP's parsed "
        "hierarchy with --parse-hierarchy). Prints the shards, samples and skips, and the --train_data value.",
    )
    p.add_argument("--input", required=True, help="ShareGPT4V JSON, or a .jsonl / .json / .csv / .tsv caption table")
    p.add_argument("--format", default="auto", choices=["auto", "sharegpt4v", "jsonl", "json", "csv", "tsv"],
                   help="format of --input (default: from its name and content)")
    p.add_argument("--image-root", default=None, help="folder relative image paths start from (default: the file's)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--samples-per-shard", type=int, default=10000,
                   help="the most samples in a shard; samples are spread evenly over the shards (default 10000)")
    p.add_argument("--split", default="train", choices=["train", "holdout", "all"],
                   help="ShareGPT4V: which entries (default train: all but the --holdout head, as training reads it)")
    p.add_argument("--holdout", type=int, default=1000, help="ShareGPT4V: size of the held-out head (default 1000)")
    p.add_argument("--image-column", default="image", help="caption tables: image column (default image)")
    p.add_argument("--caption-column", default="caption", help="caption tables: caption column (default caption)")
    p.add_argument("--short-caption-column", default="short_caption", help="caption tables: short caption column")
    p.add_argument("--parse-hierarchy", action="store_true",
                   help="parse beta-CLIP's sentences and phrases once with spaCy and store them (needs [text])")
    p.add_argument("--workers", type=int, default=1, help="spaCy processes for --parse-hierarchy (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--max-image-bytes", type=int, default=256 * 1024 * 1024,
                   help="image files larger than this are left out (default 256 MiB)")
    p.set_defaults(handler=_run_make_shards)


def _run_make_shards(args) -> int:
    from .data.shards import make_shards

    if args.samples_per_shard < 1 or args.workers < 1 or args.holdout < 0:
        raise CommandError("--samples-per-shard and --workers must be >= 1 and --holdout >= 0")
    try:
        report = make_shards(
            args.input, args.out, args.samples_per_shard, data_format=args.format, image_root=args.image_root,
            split=args.split, holdout=args.holdout, image_column=args.image_column,
            caption_column=args.caption_column, short_caption_column=args.short_caption_column or None,
            parse_hierarchy=args.parse_hierarchy, workers=args.workers,
            shuffle_seed=None if args.no_shuffle else args.seed, overwrite=args.overwrite,
            max_image_bytes=args.max_image_bytes, progress=sys.stderr.isatty(),
        )
    except (ValueError, OSError, ImportError) as error:  # ImportError: --parse-hierarchy without the text extra
        raise CommandError(_one_line(error)) from error
    print(report.summary())
    if not report.samples:
        raise CommandError(f"no sample of {args.input} could be written")
    return 0


# ----------------------------------------------------------------------------------------------- build-index
def _add_build_index(subparsers) -> None:
    p = subparsers.add_parser(
        "build-index",
        help="build (or check) the memory-mapped record index of a ShareGPT4V JSON or caption table before training",
        description="Reads the file as training does and writes its record index to the cache (docs/data.md, Large "
        "data sets: the record index), so the first run on a new machine or a multi-node launch does not wait for "
        "it. Prints the index file, the number of records and the time; an index that is already up to date is "
        "only opened.",
    )
    p.add_argument("--input", required=True, help="ShareGPT4V JSON, or a .jsonl / .json / .csv / .tsv caption table")
    p.add_argument("--format", default="auto", choices=["auto", "sharegpt4v", "jsonl", "json", "csv", "tsv"],
                   help="format of --input (default: from its name and content)")
    p.add_argument("--index-dir", default=None,
                   help="cache folder (default: $HF_LONGCLIP_INDEX_DIR or ~/.cache/hf_longclip/index)")
    p.add_argument("--image-column", default="image", help="caption tables: image column (default image)")
    p.add_argument("--caption-column", default="caption", help="caption tables: caption column (default caption)")
    p.add_argument("--short-caption-column", default="short_caption", help="caption tables: short caption column")
    p.add_argument("--rebuild", action="store_true", help="build again even if an up-to-date index exists")
    p.set_defaults(handler=_run_build_index)


def _run_build_index(args) -> int:
    from .data.index import open_record_index

    try:
        index = open_record_index(
            args.input, None if args.format == "auto" else args.format, image_column=args.image_column,
            caption_column=args.caption_column, short_caption_column=args.short_caption_column or None,
            index_dir=args.index_dir, rebuild=args.rebuild,
        )
    except (ValueError, OSError, ImportError) as error:
        raise CommandError(_one_line(error)) from error
    info = index.info
    print(f"{'built' if info['built'] else 'up to date'}: {index.file} ({len(index)} records, "
          f"{info['bytes'] / 2**20:.1f} MiB; {info['seconds']:.1f} s)")
    return 0


# ----------------------------------------------------------------------------------------------- train
def _add_train(subparsers) -> None:
    # Listed here for `hf-longclip --help`; `main` hands everything after "train" to the trainer's own parser.
    subparsers.add_parser(
        "train", add_help=False,
        help="fine-tune a variant (settings: hf-longclip train --help; same as accelerate launch -m hf_longclip.train)",
    )


#: Sub-command name -> function adding its parser to the sub-parsers action.
SUBCOMMANDS: dict[str, Callable] = {
    "train": _add_train,
    "convert": _add_convert,
    "stretch": _add_stretch,
    "export": _add_export,
    "evaluate": _add_evaluate,
    "push": _add_push,
    "generate": _add_generate,
    "make-shards": _add_make_shards,
    "build-index": _add_build_index,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-longclip", description="Long-context CLIP models on Hugging Face")
    parser.add_argument("--version", action="version", version=_version_line())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def _version_line() -> str:
    import torch
    import transformers

    from . import __version__

    return f"hf-longclip {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-longclip`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train import main as train

        train(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
