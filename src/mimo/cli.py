"""The `mimo` command line: `mimo train | validate | layout | plot | export-hf | generate | eval`."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from mimo.config import LANGUAGE, ConfigFileError, LayoutError, MimoParallelismConfig, read_yaml
from mimo.grid import MESH_DIMS, ModuleGrid

LAYOUT_KEYS = ("parallelism", "world_size")


def load_layout(path: str | Path, world_size: int | None = None) -> MimoParallelismConfig:
    """Read and finalize a layout file (`parallelism:` plus optional `world_size:`)."""
    from mimo.training.run_config import SECTIONS

    data = read_yaml(path)
    allowed = [*LAYOUT_KEYS, *(k for k in SECTIONS if k not in LAYOUT_KEYS)]  # a run config is a layout too
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigFileError(f"{path}: unknown top-level key(s) {unknown}; allowed keys are {allowed}")
    if "parallelism" not in data:
        raise ConfigFileError(f"{path}: missing 'parallelism' (a mapping of module name -> layout fields)")
    config = MimoParallelismConfig.from_dict(data["parallelism"])
    world_size = world_size or data.get("world_size") or _implied_world_size(config, path)
    return config.finalize(world_size)


def _implied_world_size(config: MimoParallelismConfig, path: str | Path) -> int:
    """The end of the last span, when every module's DP size is given."""
    try:
        return config.total_world_size
    except LayoutError as e:
        raise ConfigFileError(f"{path}: {e} (--world-size N, or world_size in the file)") from None


def render_rank_map(config: MimoParallelismConfig) -> str:
    """The layout as text: modules, deployment, edges, stub ranks, and every rank's coordinates."""
    world = config.world_size
    grids = {n: ModuleGrid(n, m, rank=-1) for n, m in config.module_parallelisms.items()}
    width = max(len(n) for n in [*grids, "stub"])
    lines = [f"world size {world}, deployment {config.deployment}", "modules:"]
    lines += [f"  {n:<{width}}  {m.describe()}" for n, m in config.module_parallelisms.items()]
    edges = ", ".join(f"{s} -> {d}" for s, d in config.edges) or "none"
    stubs = config.stub_ranks(world)
    lines += [f"edges: {edges}", f"stub ranks: {', '.join(map(str, stubs)) or 'none'}", ""]
    lines.append(f"rank  {'module':<{width}}  " + "  ".join(f"{d:>2}" for d in MESH_DIMS) + "  roles")
    for rank in range(world):
        hosted = config.modules_on_rank(rank)
        if not hosted:
            lines.append(f"{rank:>4}  {'stub':<{width}}  " + "  ".join(" -" for _ in MESH_DIMS))
        for name in hosted:
            coord = grids[name].coordinates(rank)
            roles = _roles(grids[name], rank)
            lines.append(f"{rank:>4}  {name:<{width}}  " + "  ".join(f"{c:>2}" for c in coord) + f"  {roles}".rstrip())
    return "\n".join(lines)


def _roles(grid: ModuleGrid, rank: int) -> str:
    """Pipeline and bridge roles: first/last stage, embedding group, leader of its TP group (TP rank 0)."""
    first, last = grid.is_first_stage(rank), grid.is_last_stage(rank)
    roles = []
    if grid.size("pp") > 1:
        roles.append("first stage" if first else "last stage" if last else "middle stage")
        if grid.name == LANGUAGE and (first or last):
            roles.append("embd")
    if grid.is_tp_leader(rank) and grid.size("tp") > 1:
        roles.append("leader")
    return ", ".join(roles)


def cmd_layout(args: argparse.Namespace) -> int:
    """Validate a layout file and print its rank map."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_layout(args.config, args.world_size)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"layout {args.config}")
    print(render_rank_map(config))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Validate the run config and layout, then train: in place under torchrun/srun, else on own workers."""
    from mimo.training.plan import plan_run
    from mimo.training.run_config import load_run_config
    from mimo.training.run_dir import claim_run_dir, run_identity

    started = time.monotonic()  # train.exit_duration_in_mins counts the checks below (a resume's hashes) too
    if args.adopt and not args.resume:
        raise ConfigFileError("--adopt takes another run's checkpoint on --resume; add --resume (or drop --adopt)")
    if not _launched():
        from mimo.launch import hang_seconds

        hang_seconds()  # MIMO_HANG_S=abc or 0: one line now, not a traceback (or every rank killed) later
    config = load_run_config(args.config, args.set)
    world = int(os.environ["WORLD_SIZE"]) if _launched() else args.nproc_per_node or config.world_size
    plan = plan_run(config, world)
    rank_map = render_rank_map(config.layout)
    owner = not _launched() or os.environ["RANK"] == "0"  # under torchrun, rank 0 claims the run directory
    lock = claim_run_dir(config.run_dir, config.checkpoint_dir, resume=args.resume, restart=args.restart) \
        if owner else None
    try:
        resume_from = _resumable(plan, report=owner, adopt=args.adopt) if args.resume else None
        if owner:
            run_identity(config.run_dir, create=True)  # the run this directory holds, recorded in its checkpoints
        kwargs = {"resume": args.resume, "resume_from": resume_from, "quiet": args.quiet, "rank_map": rank_map,
                  "started": started}
        for line in plan.fp8_lines if owner else ():  # the linear layers each fp8 module converts
            print(line, flush=True)
        if _launched():
            from mimo.training.deadline import end_as_signalled
            from mimo.training.loop import run_training

            run_training(plan, **kwargs)
            end_as_signalled()  # a rank stopped by SIGTERM dies of it (the kernel frees its locks): no agent wait
            return 0
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
        from mimo.launch import launch

        return launch(plan, world, **kwargs)
    finally:
        if lock is not None:
            lock.release()


def _resumable(plan, report: bool, adopt: bool = False) -> str | None:
    """Before any worker starts: the newest complete checkpoint that verifies (sizes and hashes), None if there
    is none; a damaged newest one is named (if `report`) and an earlier one used, or a one-line error if none
    is left; then it must be this run's (or `adopt`; checked by the owner of the run directory, `report`), and its
    data position must fit this run's batches (another batch, seed or dataset: one line). Under torchrun every
    rank decides so (the same files, the same answer), rank 0 alone says it."""
    from mimo.training.checkpoint import Checkpointer, newest_intact, open_checkpoint
    from mimo.training.loop import check_resume_fits
    from mimo.training.run_dir import check_owner

    say = (lambda line: print(line, flush=True)) if report else (lambda line: None)
    path = newest_intact(Checkpointer(plan.config.checkpoint_dir), report=say)
    if path is None:
        return None
    if report:
        check_owner(path, open_checkpoint(path, verify=False)[1]["extra"].get("run"), plan.config.run_dir, adopt)
    check_resume_fits(plan, path)  # another batch, seed or dataset: refused here, not by the workers
    return str(path)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a run config (keys, types, layout for its world size) and the whole data file, without starting
    anything; print what the data check found (rows, images, bad rows by reason, the length histogram)."""
    from mimo.training.plan import BadDataError, plan_run
    from mimo.training.run_config import load_run_config

    config = load_run_config(args.config, args.set)
    try:
        plan = plan_run(config, args.nproc_per_node or config.world_size)
    except BadDataError as e:  # what was found, then the one line
        print(e.scan.summary(), flush=True)
        raise
    if plan.data_scan is not None:
        print(plan.data_scan.summary())
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for line in plan.fp8_lines:
        print(line)
    print(f"{args.config}: valid; {config.layout.deployment} on {config.layout.world_size} ranks")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot loss and throughput of one or more run directories."""
    from mimo.plot import default_output, plot_runs

    runs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else default_output(runs)
    with warnings.catch_warnings(record=True) as caught:  # bad records: skipped, one line per file
        warnings.simplefilter("always")
        out = plot_runs(runs, out)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    """Write a checkpoint of any layout as a Hugging Face directory of its family (transformers loads it)."""
    from mimo.hf.shards import check_new_directory

    check_new_directory(Path(args.out_dir))  # before the model is built: a refusal costs nothing
    model, plan = _checkpoint_model(Path(args.checkpoint), args.set)
    if plan.family.export is None:
        raise ConfigFileError(f"checkpoint {args.checkpoint}: the {plan.family.name} family has no Hugging Face "
                              f"form to export to")
    with warnings.catch_warnings(record=True) as caught:  # e.g. a tokenizer that cannot take the image token
        warnings.simplefilter("always")
        out, kind = plan.family.export(model, plan.config.model, plan.config.data, plan.provider, Path(args.out_dir))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {out} ({kind})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the greedy continuation of a prompt about an image, from a Hugging Face directory or a checkpoint."""
    from mimo.families.registry import GenerationRequest

    model, section, family, provider, data, _ = _generation_model(args)
    if family.generate is None:
        instead = "; export it (mimo export-hf) and generate with transformers" if family.export else ""
        raise ConfigFileError(f"mimo generate does not serve the {family.name} family (yet){instead}")
    request = GenerationRequest(tuple(Path(p) for p in args.image), args.prompt, args.max_new_tokens, data)
    with warnings.catch_warnings(record=True) as caught:  # e.g. stopped at max_seq_len: said after the text
        warnings.simplefilter("always")
        text = family.generate(model, section, provider, request)
    print(text, flush=True)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Answer every question of a held-out file (batched greedy decoding with a KV cache, one process), write the
    answers as JSONL and print the scores."""
    import torch

    from mimo.families.registry import EvalRequest
    from mimo.training.evaluate import answer_questions

    if bool(args.checkpoint) == bool(args.hf):
        raise ConfigFileError("give a checkpoint directory or --hf DIR (one of the two)")
    data = Path(args.data)
    if not data.is_file():
        raise ConfigFileError(f"--data: {data} is not a file (a LLaVA-format JSON or JSONL file of questions and "
                              f"reference answers)")
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        raise ConfigFileError(f"--image-folder: {args.image_folder} is not a directory")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, section, family, provider, run_data, opened = _generation_model(args)
    if family.questions is None:
        raise ConfigFileError(f"mimo eval does not serve the {family.name} family (yet)")
    request = EvalRequest(data, Path(args.image_folder) if args.image_folder else None, args.template, run_data)
    dtype = next(model.parameters()).dtype
    held_out = family.questions(section, opened, provider, request, dtype)
    answers = answer_questions(model.to(device), held_out, args.max_new_tokens, args.batch_size)
    out = Path(args.out) if args.out else Path(f"{data.stem}.answers.jsonl")
    answers.write(out)
    print(f"{answers.summary(str(data))}; answers in {out}", flush=True)
    return 0


def _generation_model(args: argparse.Namespace):
    """(the whole model in one process, its model section, family, provider, the data section it was trained
    with, and what the family opened): a Hugging Face directory's (`--hf`, its family read from its config.json;
    no data section) or a checkpoint's."""
    if args.hf:
        if args.set:
            raise ConfigFileError(f"--set {args.set[0]}: --set re-points a checkpoint's Hugging Face directories; "
                                  f"with --hf, name the directory there")
        import torch

        from mimo.families.registry import BuildSettings, family_of_directory

        family = family_of_directory(args.hf)
        section = family.section(**{family.hf_settings[0]: args.hf})
        settings = BuildSettings(None, torch.float32, seed=0)  # the directory's own values, nothing seeded used
        opened = family.open(section)
        provider = family.provider(section, opened, settings)
        return provider.provide(), section, family, provider, None, opened
    model, plan = _checkpoint_model(Path(args.checkpoint), args.set)
    return model, plan.config.model, plan.family, plan.provider, plan.config.data, plan.opened


def _checkpoint_model(path: Path, moved: Sequence[str] = ()):
    """(the whole model in one process, its `RunPlan` for one process) of a checkpoint, from the run config the
    checkpoint carries (its directories re-pointed by `moved`, `--set model.KEY=PATH` items whose KEY is one of
    its family's `hf_settings`: nothing else of a checkpoint's config may change); the parts it leaves
    out come from that config's Hugging Face directories, which must match the recorded fingerprints."""
    import torch

    from mimo.families.registry import family_named
    from mimo.training.checkpoint import HF_WEIGHTS, CheckpointError, load_model_only, omitted_prefixes, open_checkpoint
    from mimo.training.plan import plan_model
    from mimo.training.run_config import RunConfigError, overridden, parse_run_config

    _, info = open_checkpoint(path)  # every file's hash verified: the one read of it before loading
    if not isinstance(info["extra"].get("config"), dict):
        raise CheckpointError(f"checkpoint {path} carries no run config (written by mimo train?); cannot tell "
                              f"which model it holds")
    try:
        config = parse_run_config(info["extra"]["config"])
    except RunConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its run config no longer parses: {e}") from None
    movable = [f"model.{key}" for key in family_named(config.model.family).hf_settings]
    for item in moved:
        if "=" not in item or item.split("=", 1)[0].strip() not in movable:
            raise ConfigFileError(f"--set {item}: a checkpoint's run config takes only KEY=PATH with KEY one of "
                                  f"{', '.join(movable) or 'none (its family reads no Hugging Face directory)'} "
                                  f"(where its Hugging Face directories are now), e.g. --set model.hf=/new/place")
    if moved:
        try:
            config = parse_run_config(overridden(info["extra"]["config"], moved))
        except RunConfigError as e:  # the checkpoint's own config parsed: the --set items are at fault
            raise ConfigFileError(f"--set {' '.join(moved)}: {e}") from None
    plan = plan_model(config, lambda parts: omitted_prefixes(path, info, parts))  # refused before any reading
    plan.provider = plan.whole_model_provider(torch.device("cpu"))
    if not info[HF_WEIGHTS]:  # the checkpoint's values replace everything: read no Hugging Face weights
        plan.provider.initial_weights = None
    model = plan.provider.provide()
    load_model_only(path, model, plan.hf_parts, verify=False)
    return model, plan


WORLD_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what a launcher sets for env:// rendezvous


def _launched() -> bool:
    """True under torchrun / our launcher / srun-with-env: the world is described by the environment (RANK and
    WORLD_SIZE set); a LaunchError if it is described only in part (a stray RANK/WORLD_SIZE in a shell, say), which
    torch's rendezvous would report as a traceback."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    missing = [k for k in WORLD_ENV if not os.environ.get(k)]
    numbers = [k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT") if k not in missing and
               not os.environ[k].strip().isdigit()]
    if missing or numbers:
        from mimo.launch import LaunchError

        given = " ".join(f"{k}={os.environ[k]}" for k in WORLD_ENV if os.environ.get(k))
        wrong = f"{', '.join(missing)} not set" if missing else f"{', '.join(numbers)} not a whole number"
        raise LaunchError(f"the environment describes a launched rank only in part ({given}; {wrong}): a launcher "
                          f"(torchrun, srun) sets all of {', '.join(WORLD_ENV)}; unset RANK and WORLD_SIZE to let mimo "
                          f"start its own workers")
    return True


MOVED_HELP = ("a Hugging Face directory of the checkpoint's run moved elsewhere, e.g. --set model.language_hf="
              "/new/place (a key of the model section naming a directory; its weights must be the ones recorded; "
              "repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from mimo import __version__

    parser = argparse.ArgumentParser(prog="mimo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mimo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, run, text in (("train", cmd_train, "train a multimodal model from a YAML run config"),
                            ("validate", cmd_validate, "check a run config, its layout and its whole data file")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="a YAML run config (see examples/llava_digits.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any key, e.g. --set train.steps=50 (repeatable)")
        p.add_argument("--nproc-per-node", type=positive_int, default=None,
                       help="worker processes (default: the layout's world size)")
        p.set_defaults(run=run)
        if name == "train":
            start = p.add_mutually_exclusive_group()
            start.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
            start.add_argument("--restart", action="store_true",
                               help="move the run already in log.dir aside (renamed, never deleted) and start over")
            p.add_argument("--adopt", action="store_true",
                           help="with --resume: continue from a checkpoint another run (another log.dir) wrote into "
                                "checkpoint.dir; its later checkpoints are this run's")
            p.add_argument("--quiet", action="store_true", help="plain progress lines, no config dump")
    plot = sub.add_parser("plot", help="plot loss and throughput of run directories")
    plot.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    plot.add_argument("--out", default=None, help="the PNG to write")
    plot.set_defaults(run=cmd_plot)
    export = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face directory of its family")
    export.add_argument("checkpoint", help="a checkpoint directory (runs/NAME/checkpoints/step_N)")
    export.add_argument("out_dir", help="a new directory for config.json, safetensors and tokenizer files")
    export.add_argument("--set", action="append", default=[], metavar="KEY=PATH", help=MOVED_HELP)
    export.set_defaults(run=cmd_export_hf)
    gen = sub.add_parser("generate", help="greedy generation about an image (one process)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="a Hugging Face LLaVA, Qwen2.5-VL or Qwen3-VL directory")
    source.add_argument("--checkpoint", help="a mimo checkpoint directory (runs/NAME/checkpoints/step_N)")
    gen.add_argument("--image", required=True, action="append", help="an image file (repeatable: one per <image>)")
    gen.add_argument("--prompt", required=True,
                     help="the text about the image(s): <image> where each goes, or none (the image(s) first)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32, help="at most this many tokens (32)")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=PATH", help=MOVED_HELP)
    gen.set_defaults(run=cmd_generate)
    ev = sub.add_parser("eval", help="answer a held-out file's questions and score them (one process)")
    ev.add_argument("checkpoint", nargs="?", help="a mimo checkpoint directory (runs/NAME/checkpoints/step_N)")
    ev.add_argument("--hf", help="a Hugging Face LLaVA directory instead of a checkpoint")
    ev.add_argument("--data", required=True, help="a LLaVA-format JSON / JSONL file: questions and reference answers")
    ev.add_argument("--image-folder", default=None,
                    help="the folder the file's image paths are relative to (default: the run's data.image_folder, "
                         "else the file's folder)")
    ev.add_argument("--template", choices=("chat", "plain", "vicuna_v1"), default=None,
                    help="how conversations are rendered (default: the run's data.template, else chat)")
    ev.add_argument("--out", default=None, help="the answers' JSONL file (default: DATA_STEM.answers.jsonl here)")
    ev.add_argument("--max-new-tokens", type=positive_int, default=32, help="at most this many tokens (32)")
    ev.add_argument("--batch-size", type=positive_int, default=32, help="questions decoded together (32)")
    ev.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=PATH", help=MOVED_HELP)
    ev.set_defaults(run=cmd_eval)
    layout = sub.add_parser("layout", help="validate a parallel layout and print its rank map")
    layout.add_argument("config", help="a YAML file with a 'parallelism' section")
    layout.add_argument("--world-size", type=positive_int, default=None,
                        help="number of ranks (default: the file's world_size, or the end of the last span)")
    layout.set_defaults(run=cmd_layout)
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (benchmarks take it too)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; a bad file or layout is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (LayoutError, ConfigFileError, *_input_errors()) as e:  # the user's input, not a bug: no traceback
        print(f"mimo {args.command}: error: {e}", file=sys.stderr)
        return 2


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (config, checkpoint, run directory), reported in one line."""
    from mimo.hf.config import HFConfigError
    from mimo.hf.image import ImageConfigError
    from mimo.hf.load import HFLoadError
    from mimo.hf.prompt import PromptError
    from mimo.hf.shards import ExportError
    from mimo.launch import LaunchError
    from mimo.plot import PlotError
    from mimo.training.checkpoint import CheckpointError
    from mimo.training.evaluate import HeldOutError
    from mimo.training.run_config import RunConfigError
    from mimo.training.run_dir import RunDirError

    return (RunConfigError, CheckpointError, PlotError, RunDirError, HFConfigError, HFLoadError, ExportError,
            ImageConfigError, PromptError, LaunchError, HeldOutError)


if __name__ == "__main__":
    sys.exit(main())
