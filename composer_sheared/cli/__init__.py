"""`composer-sheared`: one console script over the package's tools (the `python -m` forms remain).

    composer-sheared train  RECIPE [key=value ...]   a pruning or continued-pretraining run
    composer-sheared plan   RECIPE [key=value ...]   the run's dry run: shapes, tokens, FLOPs, GPU-hours
    composer-sheared export CHECKPOINT OUT_DIR ...   a pruning checkpoint -> a sliced HF directory
    composer-sheared oneshot SOURCE OUT_DIR ...      one-shot structured pruning to a target shape
    composer-sheared evaluate ...                    lm-evaluation-harness tasks over HF directories
    composer-sheared fetch  URI LOCAL_DIR            an object-store prefix -> a local directory
    composer-sheared demo [...]                      the CPU demo, outputs under ./runs/demo

RECIPE is a YAML path or a packaged recipe's name (`prune_2.7b`, `demo/prune_smollm2`; see
`composer_sheared.recipes`). Every argument after the subcommand goes to that tool unchanged,
so `composer-sheared oneshot --help` is the one-shot tool's own help.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

__all__ = ["main", "COMMANDS"]


def _train_cli() -> Callable[[list[str]], int]:
    from composer_sheared.run.recipe import cli

    return cli


def _with_recipe(argv: list[str]) -> list[str]:
    """The first argument as a recipe file when it names a packaged recipe; anything else unchanged
    (a missing file is then reported by the config loader)."""
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        from composer_sheared.recipes import recipe_path

        try:
            return [str(recipe_path(argv[0])), *argv[1:]]
        except FileNotFoundError:
            pass
    return argv


def _train(argv: list[str]) -> int:
    return _train_cli()(_with_recipe(argv))


def _plan(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: composer-sheared plan RECIPE [key=value ...]\n\nThe recipe's dry run (train with "
              "dry_run=true): source and target shapes, tokens, FLOPs and GPU-hours; no weights or data needed.")
        return 0 if argv else 2
    return _train_cli()([*_with_recipe(argv), "dry_run=true"])


def _tool(module: str) -> Callable[[list[str]], int]:
    """The `main(argv)` of a tool module, imported when its command runs (so `--help` stays quick)."""
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).main(argv) or 0
    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "run a recipe: pruning or continued pretraining (composer train.py RECIPE)"),
    "plan": (_plan, "dry-run a recipe: shapes, tokens, FLOPs and GPU-hours, no weights or data"),
    "export": (_tool("composer_sheared.cli.export"), "slice a pruning checkpoint to a plain HF directory"),
    "oneshot": (_tool("composer_sheared.cli.oneshot"), "one-shot structured pruning of a HF directory to a target shape"),
    "evaluate": (_tool("composer_sheared.cli.evaluate"), "lm-evaluation-harness tasks over HF directories"),
    "fetch": (_tool("composer_sheared.storage.fetch"), "copy an object-store prefix to a local directory (resumable)"),
    "demo": (_tool("composer_sheared.demo.pipeline"), "the CPU demo: SmolLM2-135M pruned and continued, outputs under ./runs/demo"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="composer-sheared", description=__doc__.split("\n\n")[0],
                                epilog="Run `composer-sheared COMMAND --help` for a command's arguments.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        # the tool parses its own arguments (argparse subparsers would consume its --help)
        return COMMANDS[argv[0]][0](argv[1:])
    parser = _parser()
    parser.parse_args(argv)  # --help exits 0; an unknown command exits 2 naming the choices
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
