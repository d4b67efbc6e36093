"""The ``hf-longclip`` command.

Sub-commands are registered in :data:`SUBCOMMANDS` (name -> function adding its parser); each parser sets
``handler``, a function taking the parsed namespace and returning an exit status. Add a sub-command by writing
``_add_<name>(subparsers)`` and listing it there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence


def _load_model_and_processor(source: str, revision: str | None, trust_remote_code: bool, device: str | None = None):
    import hf_longclip  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel, AutoProcessor

    kwargs = {"revision": revision} if revision else {}
    model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    if device:
        model = model.to(device)
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(subparsers) -> None:
    from .evaluation.runner import BENCHMARKS

    p = subparsers.add_parser(
        "evaluate",
        help="score a model on retrieval / FG-OVD / zero-shot benchmarks and write a JSON results file",
        description="Benchmarks: " + ", ".join(BENCHMARKS) + " (or 'all'). Layouts under --data-root: docs/evaluation.md.",
    )
    p.add_argument("--model", required=True, help="a saved model folder or a Hub id")
    p.add_argument("--benchmarks", default="urban1k", help="comma-separated names, or 'all'")
    p.add_argument("--data-root", required=True, help="folder holding the benchmarks in their documented layouts")
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

    from .evaluation import BenchmarkLayoutError, EvalSettings, evaluate, parse_benchmarks

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    try:
        benchmarks = parse_benchmarks(args.benchmarks)
        settings = EvalSettings(
            batch_size=args.batch_size, device=device, dtype=dtype, num_workers=args.num_workers, progress=not args.no_progress
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    model, processor = _load_model_and_processor(args.model, args.revision, args.trust_remote_code, device)
    splits = args.fgovd_splits.split(",") if args.fgovd_splits else None
    try:
        report = evaluate(
            model, processor, benchmarks, args.data_root, scoring=args.scoring, settings=settings,
            fgovd_splits=splits, zeroshot_templates=args.templates, output=args.output, model_name=args.model,
        )
    except (BenchmarkLayoutError, ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from error
    for name, metrics in report["benchmarks"].items():
        shown = {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float) and ("R@" in k or "top" in k or "accuracy" in k)}
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
    p.add_argument("--export-clip", action="store_true", help="also upload a stock CLIPModel export under clip/")
    p.add_argument(
        "--export-diffusers-text-encoder", action="store_true", help="also upload text_encoder/ + tokenizer/ (diffusers)"
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
    from .hub import push_to_hub

    model, processor = _load_model_and_processor(args.model, None, args.trust_remote_code)
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
    print(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
    return 0


#: Sub-command name -> function adding its parser to the sub-parsers action.
SUBCOMMANDS: dict[str, Callable] = {
    "evaluate": _add_evaluate,
    "push": _add_push,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-longclip", description="Long-context CLIP models on Hugging Face")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-longclip`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
