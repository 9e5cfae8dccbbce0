"""The `longseq` command.

    longseq train CONFIG [key.sub=value ...]     train (or resume) a run
    longseq eval RUN_DIR                          evaluate a run's newest checkpoint
    longseq config show CONFIG [key=value ...]   print the resolved config as YAML
    longseq config keys                           list every config key with its default and meaning

Config problems are reported before anything compiles, as `config error: <dotted.key>: <what is wrong>`,
with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from longseq.config import Config, ConfigError, describe_fields, load_config, to_yaml


def resolve(config_path: str, overrides: list[str]) -> Config:
    """The config of a run: the YAML file, its overrides, and the run named after the file by default."""
    config = load_config(config_path, overrides)
    if config.train.name is None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, name=Path(config_path).stem))
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longseq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume) a run from a YAML config")
    train.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=500 model.mixer=attention")

    evaluate = commands.add_parser("eval", help="evaluate the newest checkpoint of a run directory")
    evaluate.add_argument("run_dir", help="a run directory, e.g. runs/demo")

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    config_commands.add_parser("keys", help="list every config key with its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config" and args.config_command == "show":
            print(to_yaml(resolve(args.config, args.overrides)), end="")
        elif args.command == "config" and args.config_command == "keys":
            for key, default, help in describe_fields():
                print(f"{key:40s} {default:24s} {help}")
        elif args.command == "train":
            from longseq.train import TrainingDiverged, TrainingInterrupted, train

            try:
                train(resolve(args.config, args.overrides))
            except TrainingInterrupted as stop:
                print(stop, file=sys.stderr)
                return 130
            except TrainingDiverged as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
        elif args.command == "eval":
            from longseq.train import evaluate_run

            result = evaluate_run(args.run_dir)
            print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
