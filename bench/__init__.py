"""Benchmarks: `speed` (the speed harness), `soak` (long play without resets), `rates` (rewards and ends against the real game), `vector_throughput`; `memory` reads process memory; `model_info` reads a world-model folder for their CLIs."""


def model_info(parser, label: str, path) -> dict:
    """The config.json of the world-model folder `path`, or parser.error (exit 2) naming `label` (the flag) and
    what is wrong: no checkpoint there, or a folder that is not a world model."""
    from worldmodel.checkpoint import CheckpointError, read_config

    try:
        info = read_config(path)
    except CheckpointError as e:
        parser.error(f"{label}: {e}")
    if info.get("kind") != "world_model":
        parser.error(f"{label}: {str(path)!r} is not a world-model folder (config.json kind is {info.get('kind')!r})")
    return info
