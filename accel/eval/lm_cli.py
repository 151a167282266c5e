"""``accel-lm-eval``: lm-eval's own command line, with the ``accel`` model registered and accel's tasks on the
include path. It takes exactly lm-eval's arguments (``accel-lm-eval --help`` is lm-eval's help):

    accel-lm-eval --model accel --model_args pretrained=smollm2,policy=streaming,window=1024 \
        --tasks accel_niah_single,niah_single_1 --metadata '{"max_seq_lengths": [2048]}' --device cpu --limit 5

Additions, none of which changes a plain lm-eval invocation:
- ``--include_path`` gains accel's task folder (``accel_niah_single``, ``accel_vt``, ... and the tag ``accel_ruler``);
- with ``--model accel`` and a demo model or ``.gguf`` as ``pretrained``, its tokenizer is saved to a folder and
  passed to the tasks as ``--metadata tokenizer=FOLDER`` (lm-eval's RULER tasks load their tokenizer by name);
- an unknown task name lists the offline tasks that need no download.
"""

from __future__ import annotations

import sys

LM_EVAL_OFFLINE_RULER = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")


def offline_task_names() -> list[str]:
    from accel.eval.synth import OFFLINE_TASKS

    return [f"accel_{t}" for t in OFFLINE_TASKS]


def _unknown_task_hint() -> str:
    return (f"offline tasks that need no download: {', '.join(offline_task_names())} (tag accel_ruler), and "
            f"lm-eval's RULER tasks {', '.join(LM_EVAL_OFFLINE_RULER)} (give --metadata max_seq_lengths=[...]). "
            "lm-eval's tasks that read hub data (RULER essay haystacks, SQuAD, HotpotQA, LongBench) need that data "
            "in the local datasets cache (HF_DATASETS_OFFLINE=1 with a filled HF_HOME); LongBench jsonl files in a "
            "folder run through `accel-eval --longbench-dir DIR`")


def _prepare(args) -> None:
    from accel.eval.lm import is_accel_loaded, save_tokenizer, tasks_dir, tokenizer_folder

    if hasattr(args, "include_path"):
        inc = args.include_path
        if not inc:
            args.include_path = tasks_dir()
        elif isinstance(inc, str):
            args.include_path = [inc, tasks_dir()]
    if getattr(args, "model", None) != "accel":
        return
    margs = args.model_args if isinstance(args.model_args, dict) else {}
    meta = args.metadata if isinstance(getattr(args, "metadata", None), dict) else {}
    pretrained = margs.get("pretrained", "smollm2")
    if "pretrained" not in margs:
        margs["pretrained"] = pretrained
        args.model_args = margs
    if is_accel_loaded(pretrained) and "tokenizer" not in margs and "tokenizer" not in meta:
        folder = tokenizer_folder(pretrained)
        if not (folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            from accel.models import resolve_model

            source, gguf = resolve_model(pretrained)
            save_tokenizer(AutoTokenizer.from_pretrained(source, gguf_file=gguf), folder)
        args.metadata = {**meta, "tokenizer": str(folder)}


def main(argv: list[str] | None = None) -> int:
    from accel.eval import MissingExtraError, require_lm_eval

    try:
        require_lm_eval()
    except MissingExtraError as exc:
        print(f"accel-lm-eval: error: {exc}", file=sys.stderr)
        return 2
    import accel.eval.lm  # noqa: F401  (registers --model accel)
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    old = sys.argv
    sys.argv = ["accel-lm-eval", *argv]
    try:
        parser = HarnessCLI()
        parser._parser.prog = "accel-lm-eval"
        args = parser.parse_args()
    finally:
        sys.argv = old
    try:
        _prepare(args)
        parser.execute(args)
    except ValueError as exc:
        from accel.eval.lm import ContextTooLongError

        msg = str(exc)
        if isinstance(exc, ContextTooLongError):
            print(f"accel-lm-eval: error: {msg}", file=sys.stderr)
            return 2
        if "Tasks not found" in msg or "not found" in msg.lower() and "task" in msg.lower():
            print(f"accel-lm-eval: error: {msg}. {_unknown_task_hint()}", file=sys.stderr)
            return 2
        raise
    except Exception as exc:  # a model-load error from accel: one line, no traceback
        from accel.models import ModelLoadError

        if isinstance(exc, ModelLoadError):
            print(f"accel-lm-eval: error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
