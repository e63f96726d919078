"""Rollout recordings: a video to watch plus the exact arrays and metadata, for any env here.

A recording at PATH is three files, each written atomically (a temp file, then a rename):

    PATH.mp4    the frames as video (OpenCV mp4v, scaled up `scale`x nearest-neighbour), at `fps`
    PATH.npz    the arrays, one row per frame:
                  frames      (T, H, W, 3) uint8
                  actions     (T,) int64    the action that produced frames[i]; -1 on a (re)start frame
                  rewards     (T,) float32  the reward of that step (0 on a start frame)
                  terminated  (T,) bool     the episode ended at this step
                  truncated   (T,) bool     a time limit ended it at this step
    PATH.json   metadata: what the caller passed (game, env id, model, seed, ...) plus fps, scale, rows,
                steps, package versions and the creation time

Alignment (as in docs/data_format.md, with -1 marking "no action led here"): row 0 is the frame the
recording starts from (the reset frame) with action -1; each env step then adds its frame(s) with the
action that produced them. So `(frames[i-1], actions[i]) -> frames[i], rewards[i], terminated[i]` for every
i >= 1 with actions[i] >= 0, and a recording of T steps from a reset has T + 1 rows. A model with F > 1
frames per chunk adds F rows per step, all with the step's action; the step's reward, terminated and
truncated go on the last of them (0 / False on the others). A reset within a recording adds another row
with action -1.

    rec = RolloutRecorder("out/run", meta={"game": "Breakout"})
    rec.add(obs, -1)                                   # the reset frame
    rec.add(info["frames"], action, reward, terminated, truncated)
    rec.close()                                        # writes out/run.mp4, .npz, .json
    load_recording("out/run").actions

`RecordRollouts` wraps any env here (a world-model env, or the real game from `envs.games.make_game`
with frames as observations) and records every episode to `{directory}/episode_{k:04d}`; it refuses a
directory that already holds episodes, which it would overwrite in part.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import zipfile
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

import cv2
import gymnasium as gym
import numpy as np

SUFFIXES = (".mp4", ".npz", ".json")
START_ACTION = -1  # the action of a row no action produced: the reset frame
PACKAGES = ("worldmodel", "torch", "gymnasium", "ale-py", "numpy", "opencv-python")
ARRAYS = {"frames": np.uint8, "actions": np.int64, "rewards": np.float32, "terminated": np.bool_, "truncated": np.bool_}


@dataclasses.dataclass
class Recording:
    """A recording read back: arrays of T rows (see the module docstring for the alignment) and its metadata."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    actions: np.ndarray  # (T,) int64, -1 on start rows
    rewards: np.ndarray  # (T,) float32
    terminated: np.ndarray  # (T,) bool
    truncated: np.ndarray  # (T,) bool
    meta: dict[str, Any]

    @property
    def steps(self) -> int:
        """Env steps recorded (rows with an action)."""
        return int((self.actions >= 0).sum())


def existing_episodes(directory: str | os.PathLike) -> list[Path]:
    """The path stems of the `RecordRollouts` episodes already in `directory` (episode_0000, ...), sorted; [] if none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted({recording_path(f) for f in directory.glob("episode_*") if f.suffix in SUFFIXES and f.is_file()})


def recording_path(path: str | os.PathLike) -> Path:
    """'out/run', 'out/run.npz', 'out/run.mp4' -> Path('out/run') (the stem the three files share)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in SUFFIXES else path


class RolloutRecorder:
    """Collects the rows of one recording in memory; `close()` writes PATH.mp4, PATH.npz and PATH.json."""

    def __init__(self, path: str | os.PathLike, fps: float = 15, meta: dict[str, Any] | None = None, scale: int = 4) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
            raise ValueError(f"scale must be an integer >= 1 (video pixels per frame pixel), got {scale!r}")
        self.path = recording_path(path)
        self.fps, self.scale = float(fps), int(scale)
        self.meta = dict(meta or {})
        json.dumps(self.meta)  # fail now, not at close, if the metadata cannot be written
        self.frames: list[np.ndarray] = []
        self.rows: list[tuple[int, float, bool, bool]] = []  # (action, reward, terminated, truncated) per row
        self.closed = False

    def __len__(self) -> int:
        return len(self.frames)

    def add(self, frames: np.ndarray, action: int, reward: float = 0.0, terminated: bool = False, truncated: bool = False) -> None:
        """Add one step: its frame (H, W, 3) or chunk (F, H, W, 3) uint8 and the action that produced it
        (-1 for a start frame), with the step's reward and episode-end flags."""
        if self.closed:
            raise RuntimeError(f"recording {str(self.path)!r} is closed")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"a recorded frame must be uint8 (H, W, 3) or a chunk (F, H, W, 3), got {frames.dtype} {frames.shape}")
        if self.frames and frames.shape[1:] != self.frames[0].shape:
            raise ValueError(f"frames of one recording must share a size: {self.frames[0].shape} so far, got {frames.shape[1:]}")
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)) or action < START_ACTION:
            raise ValueError(f"action must be an integer >= 0, or {START_ACTION} for a start frame, got {action!r}")
        if not self.frames and action != START_ACTION:
            raise ValueError(f"a recording starts from a frame no action produced: the first add() takes action {START_ACTION}")
        if action == START_ACTION and (reward != 0 or terminated or truncated):
            raise ValueError("a start frame (action -1) has reward 0 and no episode end")
        for i, frame in enumerate(frames):
            last = i == len(frames) - 1
            self.frames.append(frame.copy())
            self.rows.append((int(action), float(reward) if last else 0.0, bool(terminated) and last, bool(truncated) and last))

    def close(self) -> Path | None:
        """Write the three files (nothing when no frame was added); returns the path stem, or None."""
        if self.closed:
            return None
        self.closed = True
        if not self.frames:
            return None
        frames = np.stack(self.frames)
        actions, rewards, terminated, truncated = (np.array(col, dtype=ARRAYS[k]) for k, col in zip(list(ARRAYS)[1:], zip(*self.rows)))
        meta = {**self.meta, "fps": self.fps, "scale": self.scale, "rows": len(frames), "steps": int((actions >= 0).sum()),
                "frame_shape": list(frames.shape[1:]), "versions": package_versions(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "alignment": "row i: frames[i] and the action that produced it (-1: a start frame), that step's reward, terminated, truncated"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path.with_suffix(".npz"), lambda f: np.savez_compressed(f, frames=frames, actions=actions, rewards=rewards, terminated=terminated, truncated=truncated))
        _write_atomic(self.path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
        _write_atomic(self.path.with_suffix(".mp4"), lambda f: write_video(f, frames, self.fps, self.scale), by_name=True)
        return self.path


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, scale: int = 1) -> None:
    """frames (T, H, W, 3) uint8 RGB -> an mp4v video, each frame scaled up `scale`x nearest-neighbour."""
    T, H, W, _ = frames.shape
    size = (W * scale, H * scale)  # OpenCV takes (W, H)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise OSError(f"OpenCV could not open a video writer for {str(path)!r}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(cv2.resize(frame, size, interpolation=cv2.INTER_NEAREST), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def _write_atomic(path: Path, write, by_name: bool = False) -> None:
    """Write through a temp file in the same folder, then rename it over `path`. `write` gets an open binary
    file, or with `by_name` the temp file's name (for writers that open the file themselves; the temp name
    keeps `path`'s suffix, which OpenCV reads the container from)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if by_name:
            write(tmp)
        else:
            with open(tmp, "wb") as f:
                write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = pkg_metadata.version(name)
        except pkg_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def load_recording(path: str | os.PathLike) -> Recording:
    """Read a recording back from PATH (or PATH.npz / .json / .mp4): the arrays of PATH.npz, checked, and the
    metadata of PATH.json ({} when that file is missing: an .npz alone is still a recording)."""
    stem = recording_path(path)
    npz, js = stem.with_suffix(".npz"), stem.with_suffix(".json")
    if not npz.is_file():
        raise FileNotFoundError(f"no recording at {str(stem)!r}: {str(npz)!r} does not exist")
    if not zipfile.is_zipfile(npz):  # else numpy tries it as a pickle and reports "pickled data"
        raise ValueError(f"recording {str(npz)!r} is not an npz archive (a zip of .npy arrays, as np.savez writes)")
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"recording {str(npz)!r} is corrupt: {e}") from None
    for k, a in arrays.items():
        if not isinstance(a, np.ndarray):  # np.load hands back the raw bytes of a member that is no .npy
            raise ValueError(f"recording {str(npz)!r} is corrupt: {k!r} is not an array")
    missing = set(ARRAYS) - set(arrays)
    if missing:
        raise ValueError(f"recording {str(npz)!r} lacks {sorted(missing)} (has {sorted(arrays)})")
    try:
        meta = json.loads(js.read_text()) if js.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"recording metadata {str(js)!r} is corrupt: {e}") from None
    arrays = {k: arrays[k] for k in ARRAYS}
    check_arrays(arrays, str(npz))
    return Recording(**arrays, meta=meta)


def check_arrays(arrays: dict[str, np.ndarray], name: str) -> None:
    frames = arrays["frames"]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"recording {name!r}: frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} {frames.shape}")
    for key, dtype in list(ARRAYS.items())[1:]:
        a = arrays[key]
        if a.dtype != dtype or a.shape != (len(frames),):
            raise ValueError(f"recording {name!r}: {key} must be {np.dtype(dtype)} of shape ({len(frames)},) (one per frame), got {a.dtype} {a.shape}")
    actions = arrays["actions"]
    if actions[0] != START_ACTION or actions.min() < START_ACTION:
        raise ValueError(f"recording {name!r}: actions must be >= 0, or {START_ACTION} on start rows, and row 0 is a start row; got {actions[:8].tolist()}...")


class RecordRollouts(gym.Wrapper):
    """Record every episode of `env` to `{directory}/episode_{k:04d}` (.mp4, .npz, .json; see `RolloutRecorder`).

    Frames come from `info["frames"]` when the env gives them (the world-model env: the whole generated
    chunk), else from the observation ((H, W, 3) uint8, or a frame stack (S, H, W, 3) whose newest frame is
    taken). An episode is written when it ends, when `reset` interrupts it, or at `close`. `meta` is added to
    every episode's JSON, with the env id, the episode index and the reset seed.
    """

    def __init__(self, env: gym.Env, directory: str | os.PathLike, fps: float = 15, scale: int = 4, meta: dict[str, Any] | None = None) -> None:
        super().__init__(env)
        self.directory = Path(directory)
        earlier = existing_episodes(self.directory)
        if earlier:
            raise FileExistsError(f"{str(self.directory)!r} already holds {len(earlier)} recorded episode(s) ({earlier[0].name}, ...), "
                                  "which recording there would overwrite in part; record to another directory")
        self.fps = fps
        self.scale = scale
        self.extra_meta = dict(meta or {})
        self.episode = 0
        self.paths: list[Path] = []  # recordings written so far
        self._recorder: RolloutRecorder | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self.end_episode()
        obs, info = self.env.reset(seed=seed, options=options)
        meta = {"env_id": self.env.spec.id if self.env.spec is not None else None, "episode": self.episode, "seed": seed, **self.extra_meta}
        model = getattr(self.env.unwrapped, "model_path", None)  # world-model envs only
        if model is not None:
            meta.setdefault("model", str(model))
        self._recorder = RolloutRecorder(self.directory / f"episode_{self.episode:04d}", self.fps, meta, self.scale)
        self._recorder.add(self._frames(obs, info)[-1], START_ACTION)  # the newest frame: where play starts
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._recorder is not None:
            self._recorder.add(self._frames(obs, info), int(action), float(reward), bool(terminated), bool(truncated))
            if terminated or truncated:
                self.end_episode()
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        self.end_episode()
        super().close()

    def end_episode(self) -> None:
        """Write the episode in progress now (it is also written when it ends, at reset and at close)."""
        if self._recorder is not None:
            path = self._recorder.close()
            if path is not None:
                self.paths.append(path)
                self.episode += 1
            self._recorder = None

    @staticmethod
    def _frames(obs: Any, info: dict[str, Any]) -> np.ndarray:
        """The frames a reset or step showed, (F, H, W, 3) uint8."""
        if "frames" in info:
            frames = np.asarray(info["frames"])  # a generated chunk (F, H, W, 3)
        else:
            obs = np.asarray(obs)
            frames = obs[None] if obs.ndim == 3 else obs[-1:]  # a frame (H, W, 3), or the newest of a stack
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"RecordRollouts records RGB frames: info['frames'] (F, H, W, 3) or observations (H, W, 3) "
                             f"or (S, H, W, 3), all uint8; got {frames.dtype} {frames.shape} (for a game whose observations "
                             f"are not frames, wrap it in envs.games.FrameObservation)")
        return frames
