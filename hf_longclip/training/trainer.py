"""The training loop: fine-tune any registered variant with Accelerate, from one CPU to many GPU nodes.

Entry points (all the same code): ``hf-longclip train``, ``accelerate launch -m hf_longclip.train``,
``training_scripts/train.py`` and, from Python, :func:`run` (settings objects) or :func:`main` (command-line
words). See docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import (
    IterableLongCaptionDataset,
    LongCaptionDataset,
    SkipCounter,
    SkipCountingCollator,
    transform_from_processor,
    validate_records,
)
from ..data.index import is_record_index
from ..extras import require
from ..variants import get_variant
from .accumulation import average_gradients, cached_accumulation_step
from .arguments import DataArguments, ModelArguments, TrainingArguments, arguments_to_dict, parse_training_arguments
from .checkpoints import (
    RESUMABLE_CHANGES,
    check_output_dir,
    check_resume,
    checkpoint_bytes,
    read_trainer_state,
    resolve_checkpoint,
    run_fingerprint,
    save_checkpoint,
    unsafe_files,
)
from .data import (
    GlobalBatchSampler,
    SeededCollator,
    add_caption_hierarchies,
    eval_records,
    retrieval_set,
    seed_step,
    synthetic_hard_negatives,
    training_records,
)
from .optim import build_scheduler, parameter_groups, schedules_for_groups
from .setup import build_model_and_processor
from .sharding import (
    DEEPSPEED,
    FSDP2_ACCELERATE,
    FSDP2_TRAINER,
    check_deepspeed,
    check_shardable,
    deepspeed_configured,
    fill_deepspeed_config,
    fsdp2_options_from_accelerate,
    full_state_dict,
    has_sharded_state,
    is_sharded,
    load_sharded_state,
    save_sharded_state,
    shard_model,
    sharding_engine,
    zero_stage,
)

logger = logging.getLogger("hf_longclip.train")


def loss_terms(output) -> dict[str, float]:
    """Every loss term of a model output as floats (the output's own `loss_terms()`: Fix-CLIP's groups included)."""
    return {key: float(value.detach()) for key, value in output.loss_terms().items()}


@contextlib.contextmanager
def _eval_mode(model):
    """`model` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate_heldout(model, processor, dataset, batch_size: int, device) -> dict[str, float]:
    """Long-caption retrieval R@k on held-out pairs (global CLS / EOT scoring)."""
    from ..evaluation.retrieval import EvalSettings, evaluate_retrieval

    with _eval_mode(model):
        result = evaluate_retrieval(
            model, processor, dataset, settings=EvalSettings(batch_size=batch_size, device=str(device), progress=False)
        )
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and ("R@" in k or k.startswith("num_"))}


def evaluate_attribute_binding(model, processor, dataset, batch_size: int, device) -> dict[str, float]:
    """Attribute-binding hard-negative metrics (global scoring) as flat ``attribute_binding_*`` numbers: accuracy and
    chance in percent, mean rank, and the pairwise accuracy of each negative type."""
    from ..evaluation.hard_negatives import evaluate_hard_negatives
    from ..evaluation.retrieval import EvalSettings

    with _eval_mode(model):
        result = evaluate_hard_negatives(
            model, processor, dataset, settings=EvalSettings(batch_size=batch_size, device=str(device), progress=False)
        )
    flat = {f"attribute_binding_{key}": result[key] for key in ("accuracy", "chance", "mean_rank", "num_images")}
    for kind, metrics in result.get("per_type", {}).items():
        flat[f"attribute_binding_{kind}"] = metrics["accuracy"]
    return flat


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def _launched_on_cpus() -> bool:
    """True when a launcher (``accelerate launch --multi_gpu``, torchrun) started several processes on a machine
    without accelerators. accelerate then needs ``cpu=True`` to join them in a gloo process group; without it every
    process trains alone, as rank 0, into the same output folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, HPU ...
    return not (probe.is_available() if probe is not None else torch.cuda.is_available())


def _logs_above(progress):
    """While a tqdm bar is shown, route the root logger's console output through `tqdm.write`."""
    if progress is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_mixed_precision(setting: str) -> str:
    """The mixed precision a run will use (``config``: what ``accelerate launch`` / ``accelerate config`` set), or a
    `ValueError` before any work when this machine cannot run it."""
    from accelerate.utils import is_bf16_available

    mode = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") if setting == "config" else setting
    if mode == "bf16" and not is_bf16_available():
        raise ValueError(
            "bf16 mixed precision was asked for (--bf16 / mixed_precision bf16), but this machine's accelerator "
            "does not support bf16; use --fp16 or --mixed_precision no"
        )
    return mode


def run(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> dict:
    """Train as the settings say; returns a summary (steps, first and last loss terms, evaluations, skip counts,
    seconds per step, the output folder). Needs the ``train`` extra.

    Example:

    ```python
    >>> from hf_longclip.training import DataArguments, ModelArguments, TrainingArguments, run
    >>> summary = run(ModelArguments(variant="finelip", base="openai/clip-vit-base-patch16"),  # doctest: +SKIP
    ...               DataArguments(train_data="captions.jsonl"), TrainingArguments(output_dir="out", max_steps=100))
    ```
    """
    require("accelerate", "train")
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    check_mixed_precision(train_args.mixed_precision)
    if deepspeed_configured():
        require("deepspeed", "deepspeed")
    output_dir = Path(train_args.output_dir)
    check_output_dir(output_dir, resuming=train_args.resume_from_checkpoint is not None,
                     overwrite=train_args.overwrite_output_dir)
    cached = train_args.accumulation_mode == "cached" and train_args.gradient_accumulation_steps > 1
    variant = get_variant(model_args.variant)
    seed_step(train_args.seed, 0, 0)  # identical initialisation of the heads on every process
    model, processor = build_model_and_processor(model_args, seed=train_args.seed)
    accelerator = Accelerator(
        mixed_precision=None if train_args.mixed_precision == "config" else train_args.mixed_precision,
        gradient_accumulation_steps=1 if cached else train_args.gradient_accumulation_steps,
        log_with=train_args.trackers or None,
        project_dir=str(output_dir),
        # The model says whether a step can leave a trainable parameter without a gradient (no variant's default
        # configuration does: such parameters are frozen or get an exact zero gradient).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=model.ddp_find_unused_parameters)],
        # DeepSpeed only runs through accelerate's accelerator (GPU) path; cpu=True would silently drop it for DDP
        cpu=_launched_on_cpus() and not deepspeed_configured(),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise ValueError(
            f"the launcher started {launched} processes, but accelerate joined {accelerator.num_processes} "
            f"({accelerator.distributed_type}); each would train alone into the same folder. On CPUs set "
            "ACCELERATE_USE_CPU=1; otherwise check `accelerate config`"
            + (" (DeepSpeed through accelerate needs GPUs: on CPUs use DDP or FSDP2)" if deepspeed_configured() else "")
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger("hf_longclip").setLevel(logging.WARNING)
    engine = sharding_engine(accelerator)  # ddp, fsdp2 (accelerate's, GPUs), fsdp2-trainer (CPUs) or deepspeed
    if engine == DEEPSPEED:
        check_deepspeed(accelerator, save_final_model=train_args.save_final_model)
    if cached and engine == DEEPSPEED:
        raise ValueError(
            "accumulation_mode 'cached' runs several backward passes per step outside the DeepSpeed engine, which "
            "DeepSpeed does not allow; use accumulation_mode: naive, or FSDP2 (where cached accumulation works)"
        )
    if engine in (FSDP2_ACCELERATE, FSDP2_TRAINER) or zero_stage(accelerator) == 3:
        check_shardable(model)  # e.g. a data-dependent number of tower calls per step: refused before any work
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---------------------------------------------------------------- data
    with accelerator.main_process_first():
        records = training_records(data_args, output_dir)
        if variant.record_fields:
            records = add_caption_hierarchies(
                records, data_args, data_args.text_cache_dir or output_dir, accelerator.is_main_process
            )
        held_out = eval_records(data_args, output_dir)
        hard_negatives = synthetic_hard_negatives(data_args, output_dir)
    streaming = not hasattr(records, "__len__")
    if isinstance(records, list) or is_record_index(records):
        report = validate_records(records, strict=data_args.strict, check_files=data_args.strict,
                                  max_image_bytes=data_args.max_image_bytes)
        if report.num_bad:
            logger.warning("training data: %s (these samples will be skipped and counted)", report.summary())
    transform_name = variant.train_transform if data_args.transform == "auto" else data_args.transform
    transform = transform_from_processor(processor, transform_name)
    common = {"strict": data_args.strict, "max_image_pixels": data_args.max_image_pixels,
              "max_image_bytes": data_args.max_image_bytes,
              "passthrough": variant.record_fields}
    if streaming:
        if train_args.max_steps <= 0:
            raise ValueError("a streamed data set has no length: set max_steps")
        from ..data.shards import TarShardSource

        if isinstance(records, TarShardSource):  # webdataset shards: split by shard, shuffled, fast resume
            dataset = records.dataset(transform, rank=rank, world_size=world, seed=train_args.seed,
                                      shuffle_buffer=data_args.shuffle_buffer, **common)
        else:
            dataset = IterableLongCaptionDataset(records, transform, rank=rank, world_size=world, **common)
    else:
        dataset = LongCaptionDataset(records, transform, seed=train_args.seed, **common)
    collator = SeededCollator(
        variant.make_collator(processor, seed=train_args.seed, **data_args.collator_overrides()), train_args.seed
    )
    batch_collator = SkipCountingCollator(collator)

    accum = train_args.gradient_accumulation_steps
    per_device = train_args.per_device_train_batch_size
    if streaming:
        steps_per_epoch = train_args.max_steps
    else:
        batches = GlobalBatchSampler.batches_per_epoch(len(dataset), per_device, world)
        steps_per_epoch = batches // accum
        if steps_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} training samples do not fill one step of {per_device} x {world} processes x "
                f"{accum} accumulation steps"
            )
    total_steps = train_args.max_steps if train_args.max_steps > 0 else math.ceil(train_args.num_train_epochs * steps_per_epoch)
    warmup = train_args.warmup_steps or int(train_args.warmup_ratio * total_steps)

    # The run's identity comes from the whole model, before sharding leaves each process a part of it.
    settings = arguments_to_dict(model_args, data_args, train_args)
    fingerprint = run_fingerprint(settings, model, world)
    sharded = None  # FSDP2: the units are the model's own (the same on GPUs and CPUs), applied before the optimizer
    if engine in (FSDP2_ACCELERATE, FSDP2_TRAINER):
        sharded = shard_model(model, accelerator.device, **fsdp2_options_from_accelerate(accelerator))
    groups = parameter_groups(
        model, train_args.learning_rate, train_args.weight_decay, train_args.head_learning_rate,
        train_args.weight_decay_filter,
    )
    optimizer = torch.optim.AdamW(
        groups, betas=(train_args.adam_beta1, train_args.adam_beta2), eps=train_args.adam_epsilon
    )
    schedules = schedules_for_groups(
        groups, train_args.learning_rate, train_args.min_learning_rate, warmup, train_args.head_learning_rate,
        train_args.head_min_learning_rate, train_args.head_warmup_steps,
    )
    scheduler = build_scheduler(optimizer, total_steps, schedules, train_args.lr_scheduler_type)
    if engine == FSDP2_TRAINER:  # accelerate runs these as CPU processes and would wrap the model in DDP
        optimizer = accelerator.prepare(optimizer)
    else:
        if engine == DEEPSPEED:
            fill_deepspeed_config(accelerator, per_device, train_args.max_grad_norm)
        model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not registered with accelerate (which pickles it and unpickles it with weights_only=False):
    # the schedule is a function of the step, so a resumed run rebuilds it from the step in the trainer state.
    unwrapped = accelerator.unwrap_model(model)
    free = shutil.disk_usage(output_dir).free
    if free < checkpoint_bytes(output_dir, unwrapped):
        logger.warning("only %.0f MiB free in %s, less than one checkpoint (about %.0f MiB)", free / 2**20,
                       output_dir, checkpoint_bytes(output_dir, unwrapped) / 2**20)

    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "skipped": {},
             "skipped_steps": 0, "total_steps": total_steps, "fingerprint": fingerprint, "settings": settings}
    if train_args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(output_dir, train_args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info("no checkpoint in %s: starting from scratch", output_dir / "checkpoints")
        else:
            saved = read_trainer_state(checkpoint)
            check_resume(saved.get("fingerprint", {}), fingerprint, checkpoint)
            if saved.get("total_steps") != total_steps:
                raise ValueError(
                    f"{checkpoint} belongs to a run of {saved.get('total_steps')} steps; these settings give "
                    f"{total_steps}"
                )
            if "fingerprint" not in saved:
                logger.warning("%s records no run fingerprint (an earlier version wrote it): settings not compared",
                               checkpoint)
            pickled = unsafe_files(checkpoint)
            if pickled:
                raise ValueError(
                    f"{checkpoint} holds {', '.join(pickled)}: pickled objects (an earlier version's scheduler), which "
                    "are not loaded because unpickling can run code. The schedule is rebuilt from the step: delete "
                    "these files to resume from this checkpoint"
                )
            if engine == DEEPSPEED:
                raise ValueError(
                    f"{checkpoint}: resuming a DeepSpeed run is not supported: DeepSpeed's checkpoint loader "
                    "unpickles its files (torch.load with weights_only=False), which can run code. FSDP2 runs resume "
                    "from checkpoints that are only safetensors and JSON"
                )
            if has_sharded_state(checkpoint) != (sharded is not None):
                raise ValueError(
                    f"{checkpoint} was saved {'with' if has_sharded_state(checkpoint) else 'without'} FSDP2 "
                    f"sharding; resume it {'with' if has_sharded_state(checkpoint) else 'without'} FSDP2 (the same "
                    "accelerate configuration)"
                )
            try:
                if sharded is not None:  # safetensors shards and JSON only
                    load_sharded_state(model, optimizer, checkpoint)
                    _load_scaler_state(accelerator, checkpoint)
                else:
                    accelerator.load_state(str(checkpoint))
            except pickle.UnpicklingError as error:  # weights_only refused an object: never load it
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ValueError(f"{checkpoint} cannot be loaded safely (only tensors and plain data are): {first}") \
                    from None
            changed = {k: (saved.get("settings", {}).get(k), v) for k, v in settings.items()
                       if k in RESUMABLE_CHANGES and "settings" in saved and saved["settings"].get(k) != v}
            for key, (before, after) in sorted(changed.items()):
                logger.info("changed on resume (allowed): %s %r -> %r", key, before, after)
            if streaming and "num_workers" in changed:  # a stream is split over (process, worker) slots
                raise ValueError(f"{checkpoint}: a streamed data set's order depends on num_workers; resume with "
                                 f"--num_workers {changed['num_workers'][0]}")
            state.update({k: v for k, v in saved.items() if k not in ("fingerprint", "settings")})
            with warnings.catch_warnings():  # "scheduler stepped before the optimizer": intended here
                warnings.simplefilter("ignore")
                for _ in range(state["global_step"]):
                    scheduler.step()
            logger.info("resumed from %s at step %d", checkpoint, state["global_step"])
    skipped = SkipCounter(state["skipped"] if accelerator.is_main_process else None)

    if train_args.trackers:
        accelerator.init_trackers(train_args.tracker_project, config={k: v for k, v in settings.items()
                                                                      if isinstance(v, (int, float, str, bool))})
    evaluations: dict[str, dict] = {}
    eval_set = retrieval_set(held_out) if held_out else None
    can_eval = eval_set is not None
    # With parameters sharded per module (FSDP2, ZeRO-3) every forward gathers them collectively: every process
    # evaluates the same held-out set, the main one reports.
    collective_eval = sharded is not None or zero_stage(accelerator) == 3

    def evaluate(tag: str) -> None:
        if can_eval and (accelerator.is_main_process or collective_eval):
            evaluated = unwrapped
            if zero_stage(accelerator) == 3:  # a whole copy on the main process, gathered by every process
                whole = accelerator.get_state_dict(model)
                if not accelerator.is_main_process:
                    return accelerator.wait_for_everyone()
                evaluated = _unsharded_copy(unwrapped, whole, accelerator).to(accelerator.device)
            metrics = evaluate_heldout(evaluated, processor, eval_set, train_args.eval_batch_size, accelerator.device)
            binding = ""
            if hard_negatives is not None:
                metrics.update(evaluate_attribute_binding(evaluated, processor, hard_negatives,
                                                          train_args.eval_batch_size, accelerator.device))
                binding = (f"  attribute binding {metrics['attribute_binding_accuracy']:.1f}% "
                           f"(chance {metrics['attribute_binding_chance']:.1f}%)")
            if not accelerator.is_main_process:
                return accelerator.wait_for_everyone()
            evaluations[tag] = metrics
            logger.info("eval (%s, %d held-out pairs): t2i R@1 %.1f  i2t R@1 %.1f%s", tag, metrics.get("num_texts", 0),
                        metrics.get("t2i_R@1", float("nan")), metrics.get("i2t_R@1", float("nan")), binding)
            if train_args.trackers:
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state["global_step"])
        accelerator.wait_for_everyone()

    def merge_skip_counts() -> None:
        """Move every process's skip counts into the main process's counter (what checkpoints and reports hold)."""
        if world > 1:
            from accelerate.utils import gather_object

            counts = gather_object([skipped.as_dict()])
            skipped.reset()
            if accelerator.is_main_process:
                for part in counts:
                    skipped.update(part)

    def finish_gradients() -> None:
        """Before an optimiser step: the replicated parameters' gradients averaged (FSDP2 leaves 0-dim parameters to
        us), then every gradient clipped to max_grad_norm."""
        if sharded is not None:
            sharded.sync_replicated_gradients()
            if train_args.max_grad_norm > 0:
                accelerator.unscale_gradients()
                sharded.clip_grad_norm_(train_args.max_grad_norm)
        elif train_args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)

    def write_sharded_state(folder: str) -> None:
        save_sharded_state(model, optimizer, folder)
        if accelerator.is_main_process:
            _save_scaler_state(accelerator, folder)

    def checkpoint() -> None:
        merge_skip_counts()
        state["skipped"] = skipped.as_dict()
        path = save_checkpoint(accelerator, output_dir, state["global_step"], dict(state), train_args.save_total_limit,
                               needed_bytes=checkpoint_bytes(output_dir, unwrapped),
                               write_state=None if sharded is None else write_sharded_state)
        logger.info("checkpoint %s", path)

    if train_args.eval_before_training and state["global_step"] == 0:
        evaluate("before")

    # ---------------------------------------------------------------- loop
    progress = None
    if accelerator.is_main_process and not train_args.disable_progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=state["global_step"], desc=f"train {variant.name}", unit="step",
                        dynamic_ncols=True)
    stop_at = min(total_steps, train_args.stop_after_steps or total_steps)
    running: dict[str, float] = {}
    running_steps, window_samples, window_start = 0, 0, time.perf_counter()
    step_seconds: list[float] = []  # data loading + forward + backward + optimiser, per step
    first_terms: dict[str, float] = {}
    last_terms: dict[str, float] = {}
    # log lines (ours, accelerate's checkpoint messages) are printed above the bar, not through it
    with _logs_above(progress):
        model.train()
        while state["global_step"] < stop_at:
            collator.set_epoch(state["epoch"])
            dataset.set_epoch(state["epoch"])
            if streaming:
                dataset.skip_batches(state["batch_in_epoch"], per_device)  # shards: skipped without decoding
                loader = DataLoader(dataset, batch_size=per_device, collate_fn=batch_collator,
                                    num_workers=data_args.num_workers, drop_last=True)
                batches = iter(loader)
                for _ in range(state["batch_in_epoch"]):  # a stream can only be skipped by reading it
                    next(batches, None)
            else:
                sampler = GlobalBatchSampler(len(dataset), per_device, world, rank, train_args.seed, state["epoch"],
                                             start_batch=state["batch_in_epoch"])
                loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=batch_collator,
                                    num_workers=data_args.num_workers, pin_memory=torch.cuda.is_available())
                batches = iter(loader)
            exhausted = False
            while state["global_step"] < stop_at:
                step_start = time.perf_counter()
                micro = []
                for _ in range(accum):
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        break
                    if batch.get("strict_error"):  # --strict: a bad sample (read in a data worker or not)
                        raise ValueError(batch["strict_error"])
                    micro.append(batch)
                if streaming and world > 1:  # streams differ in length: every process ends the epoch together
                    flag = torch.tensor([1.0 if exhausted else 0.0], device=accelerator.device)
                    exhausted = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
                if exhausted:
                    if streaming and state["batch_in_epoch"] == 0:  # else the next epoch would be empty too
                        raise ValueError(f"the training stream gave no full batch of {per_device} in an epoch")
                    break
                for batch in micro:
                    skipped.update(batch.pop("skipped", None))
                state["batch_in_epoch"] += accum
                usable = all("pixel_values" in b for b in micro)
                if world > 1:  # every process must take the step, or none
                    flag = torch.tensor([1.0 if usable else 0.0], device=accelerator.device)
                    usable = bool(accelerator.reduce(flag, reduction="sum").item() == world)
                if not usable:
                    state["skipped_steps"] += 1
                    logger.warning("step %d skipped: a micro-batch had no usable sample", state["global_step"])
                    continue
                micro = [_to_device(b, accelerator.device) for b in micro]
                seed_step(train_args.seed, state["global_step"], rank)
                step_kwargs = unwrapped.training_loss_kwargs(state["global_step"], steps_per_epoch)

                if cached:
                    output = cached_accumulation_step(unwrapped, micro, step_kwargs, backward=accelerator.backward,
                                                      autocast=accelerator.autocast)
                    if sharded is None:  # FSDP2 reduced the units' gradients in each backward pass
                        average_gradients(unwrapped.parameters(), world)
                    finish_gradients()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    terms = loss_terms(output)
                else:
                    terms = {}
                    for batch in micro:
                        with accelerator.accumulate(model):
                            with accelerator.autocast():
                                output = model(**batch, return_loss=True, **step_kwargs)
                            accelerator.backward(output.loss)
                            if accelerator.sync_gradients:
                                finish_gradients()
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                        for key, value in loss_terms(output).items():
                            terms[key] = terms.get(key, 0.0) + value / len(micro)
                scheduler.step()
                unwrapped.after_optimizer_step()
                step_seconds.append(time.perf_counter() - step_start)
                state["global_step"] += 1
                samples = sum(b["pixel_values"].shape[0] for b in micro)
                state["samples_seen"] += samples * world
                window_samples += samples * world
                for key, value in terms.items():
                    running[key] = running.get(key, 0.0) + value
                running_steps += 1

                step = state["global_step"]
                if step % train_args.logging_steps == 0 or step == stop_at:
                    means = {k: v / running_steps for k, v in running.items()}
                    if world > 1:
                        keys = sorted(means)
                        reduced = accelerator.reduce(torch.tensor([means[k] for k in keys], device=accelerator.device),
                                                     reduction="mean")
                        means = dict(zip(keys, reduced.tolist()))
                    # means over the logging window and over processes (what a 1-process run would report)
                    last_terms = means
                    first_terms = first_terms or means
                    elapsed = time.perf_counter() - window_start
                    logs = {**{f"train/{k}": v for k, v in means.items()},
                            "train/samples_per_s": window_samples / max(elapsed, 1e-9),
                            **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups},
                            "train/skipped_samples": skipped.total}
                    if progress is not None:
                        progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items()
                                              if k.startswith("train/loss") or k.endswith("samples_per_s")})
                    if train_args.trackers:
                        accelerator.log(logs, step=step)
                    running, running_steps, window_samples, window_start = {}, 0, 0, time.perf_counter()
                if progress is not None:
                    progress.update(1)
                if train_args.save_steps and step % train_args.save_steps == 0 and step < stop_at:
                    checkpoint()
                if train_args.eval_steps and step % train_args.eval_steps == 0 and step < total_steps:
                    evaluate(f"step-{step}")
            if exhausted:  # not when stopping at stop_at: a checkpoint then keeps the place inside the epoch
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    if progress is not None:
        progress.close()

    # ---------------------------------------------------------------- the end
    finished = state["global_step"] >= total_steps
    checkpoint()
    summary = {
        "variant": variant.name,
        "global_step": state["global_step"],
        "total_steps": total_steps,
        "finished": finished,
        "first_loss_terms": first_terms,
        "last_loss_terms": last_terms,
        # distinct bad samples per reason, and how often they were drawn (a bad sample is read once per epoch)
        "skipped_samples": skipped.samples_by_reason(),
        "skipped_visits": skipped.visits_by_reason(),
        "skipped_steps": state["skipped_steps"],
        # the median step after the first (which includes warm-up work), and the throughput it gives
        "seconds_per_step": _median(step_seconds[1:] or step_seconds),
        "samples_per_second": per_device * world * accum / max(_median(step_seconds[1:] or step_seconds) or 0, 1e-9),
        "evaluations": evaluations,
        "output_dir": str(output_dir),
    }
    if skipped.total:
        logger.warning("training data: %s", skipped.summary())
    if finished:
        evaluate("after")
        summary["evaluations"] = evaluations
        if train_args.save_final_model:
            save_final(accelerator, model, processor, output_dir, settings, evaluations, model_args, data_args,
                       train_args)
    if accelerator.is_main_process:
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    accelerator.end_training()
    return summary


def is_deepspeed_zero3_enabled() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled as enabled
    except ImportError:
        return False
    return bool(enabled())


def _unsharded_copy(model, state_dict: dict[str, torch.Tensor], accelerator):
    """A plain model of `model`'s variant and config holding the gathered `state_dict` (every tensor of the whole
    model, loaded strictly), built by this process alone."""
    import copy

    zero3 = is_deepspeed_zero3_enabled()
    if zero3:  # transformers would build it under deepspeed.zero.Init, partitioned by a collective of all processes
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    try:
        whole = get_variant(model).model_class(copy.deepcopy(model.config))
    finally:
        if zero3:
            accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
    whole.load_state_dict(model.merge_frozen_rows(dict(state_dict)))
    return whole


def _save_scaler_state(accelerator, folder: str) -> None:
    """The fp16 loss scaler's state (plain numbers) as JSON next to a sharded checkpoint."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        state = {k: v for k, v in scaler.state_dict().items() if isinstance(v, (int, float, bool))}
        (Path(folder) / "scaler.json").write_text(json.dumps(state), encoding="utf-8")


def _load_scaler_state(accelerator, folder) -> None:
    scaler, file = getattr(accelerator, "scaler", None), Path(folder) / "scaler.json"
    if scaler is not None and file.is_file():
        scaler.load_state_dict(json.loads(file.read_text(encoding="utf-8")))


def save_final(accelerator, model, processor, output_dir: Path, settings, evaluations, model_args, data_args,
               train_args) -> None:
    """``save_pretrained`` of the model (safetensors + config + code for remote loading), the processor, a model
    card draft with the run's settings and held-out results, and the optional Hub push."""
    from ..hub import push_to_hub, save_for_hub

    # every process takes part in gathering sharded weights (FSDP2 units, ZeRO-3 partitions) to the main one
    state_dict = full_state_dict(model) if is_sharded(model) else accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    if is_sharded(unwrapped) or zero_stage(accelerator) == 3:  # it holds shards: save a whole copy
        unwrapped = _unsharded_copy(unwrapped, state_dict, accelerator)
    else:
        unwrapped.load_state_dict(state_dict)
    results = None
    if evaluations.get("after"):
        results = {"model": str(output_dir), "benchmarks": {"heldout": evaluations["after"]}}
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    base = model_args.base if model_args.base.count("/") == 1 else None
    datasets = [data_args.train_data] if data_args.train_data.count("/") == 1 else None
    recipe = {k: v for k, v in settings.items() if v is not None}
    save_for_hub(unwrapped.eval(), processor, output_dir, training_recipe=recipe, base_model=base, datasets=datasets,
                 results=results, repo_id=train_args.hub_model_id)
    logger.info("saved %s model, processor and model card to %s", model_args.variant, output_dir)
    if train_args.push_to_hub:
        info = push_to_hub(unwrapped, processor, train_args.hub_model_id, results=results, base_model=base,
                           datasets=datasets, private=train_args.hub_private or None, revision=train_args.hub_revision,
                           training_recipe=recipe)
        logger.info("pushed to %s", getattr(info, "commit_url", train_args.hub_model_id))


def main(argv: list[str] | None = None) -> dict:
    """Parse command-line words (``--config RECIPE --setting value ...``; ``sys.argv[1:]`` when None) and train.

    Bad settings end the program with one ``error: ...`` line (`SystemExit`); errors found later (bad data under
    ``strict``, a checkpoint of another run) are raised as `ValueError`, which the command-line entry points
    (:func:`hf_longclip.train.main`) print as one line too. Returns :func:`run`'s summary.
    """
    try:
        model_args, data_args, train_args = parse_training_arguments(argv)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return run(model_args, data_args, train_args)


__all__ = ["check_mixed_precision", "evaluate_attribute_binding", "evaluate_heldout", "loss_terms", "main", "run", "save_final"]
