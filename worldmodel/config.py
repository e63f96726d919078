"""Configuration dataclasses and the size-preset registry.

Every component takes one `cfg`. The resolved configs are saved as JSON beside every checkpoint, so a
checkpoint loads with no flags (`worldmodel.checkpoint`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenizerConfig:
    """Frames (H, W, 3) uint8 <-> latent grid (C, H/f, W/f)."""

    kind: str = "vae"  # "vae": diffusers AutoencoderKL trained from scratch; "patch": pixel patches
    frame_size: tuple[int, int] = (64, 64)
    # "vae" only: the autoencoder's shape. Downsampling factor is 2 ** (len(block_out_channels) - 1).
    # 64x64 -> 8x8x16. Narrow at full resolution (16 channels) because the decoder's 64x64 layers dominate
    # its cost: ~1M parameters, a few ms to decode a frame and ~0.45 s per batch-32 training step on a
    # 2-core CPU (vs ~1.5 s and 3x the decode time for (32, 64, 64, 128)). norm_num_groups 8 keeps 2
    # channels per group at full resolution (16 groups there would be instance norm).
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_num_groups: int = 8
    # "patch" only: side of a square pixel patch; latent channels are 3 * patch**2.
    patch: int = 8
    # Per-channel affine that maps raw latents to roughly zero mean / unit variance; measured on the
    # training frames after the autoencoder is trained (identity until then).
    latent_mean: tuple[float, ...] = ()
    latent_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.frame_size = tuple(self.frame_size)
        self.block_out_channels = tuple(self.block_out_channels)
        self.latent_mean = tuple(self.latent_mean)
        self.latent_std = tuple(self.latent_std)
        if self.kind not in ("vae", "patch"):
            raise ValueError(f"tokenizer kind must be 'vae' or 'patch', got {self.kind!r}")
        f = self.downsample
        if self.frame_size[0] % f or self.frame_size[1] % f:
            raise ValueError(f"frame_size {self.frame_size} must be divisible by the downsampling factor {f}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1) if self.kind == "vae" else self.patch

    @property
    def channels(self) -> int:
        return self.latent_channels if self.kind == "vae" else 3 * self.patch**2

    @property
    def latent_size(self) -> tuple[int, int]:
        return (self.frame_size[0] // self.downsample, self.frame_size[1] // self.downsample)


PREDICTIONS = ("velocity", "x0", "edm")
X0_MIN_LEVEL = 0.05  # x0 prediction: the velocity divides by the level, clipped here (JiT's t_eps)


@dataclass
class DiTConfig:
    """The action-conditioned causal DiT. Shapes are derived from the tokenizer and the game."""

    dim: int = 256
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    # Latent grid of one frame, from the tokenizer.
    in_channels: int = 16
    latent_size: tuple[int, int] = (8, 8)
    patch_size: int = 1
    # Game: number of discrete actions. Embedding row `num_actions` is the null action (guidance).
    num_actions: int = 4
    # Frames per chunk: attention is full inside a chunk and causal between chunks.
    frames_per_chunk: int = 1
    # Long play: permanent sink chunks plus a rolling window of recent chunks (Context Forcing).
    sink_chunks: int = 1
    window_chunks: int = 15
    rope_theta: float = 10000.0
    qk_norm: bool = True
    head_hidden: int = 128  # reward / episode-end heads
    # Pixel-aligned conditioning on the previous frame (DIAMOND, GameNGen): each frame's input tokens carry
    # the latents of the frame before its chunk (the last clean frame in the context; zeros before the
    # first), concatenated channel-wise, on top of the KV cache.
    prev_frame: bool = False
    # How many frames before the chunk the input tokens carry with prev_frame (DIAMOND stacks 4): 1 is the frame
    # before; 2 adds the one before that, so a moving object's velocity lies pixel-aligned in every token, not
    # only in the cache's attention. The change target and the change gate stay relative to the frame before.
    prev_stack: int = 1
    # The network sees and predicts the change from that previous frame (Delta-IRIS's idea in diffusion
    # form): its input is x_t - (1 - t) prev, the noisy change, and its output the change's velocity (or the
    # change x0 - prev itself, with predict "x0"); prev is taken off (added back) to give the frame's. A
    # reparameterisation inside the DiT: the flow maths, the sampler and the distillation stages are unchanged.
    delta: bool = False
    # What the network's output is: "velocity" (v = eps - x0) or "x0", the clean frame, turned into the
    # velocity (x_t - x0) / max(t, X0_MIN_LEVEL) (JiT, Li & He 2025: pixel patches wider than the network
    # cannot carry the noise that a velocity holds, but the clean frame lies on a low-dimensional manifold).
    # "edm": the clean frame (or change) through EDM's preconditioning (Karras et al. 2022; DIAMOND uses it):
    # with r = sqrt(s^2 + sigma_data^2 (1 - s)^2), the network reads its noisy input scaled by 1/r and
    # predicts x0 = sigma_data^2 (1 - s) / r^2 * x_s + s sigma_data / r * F. At low noise the output is
    # anchored to the input (its error scaled by s), and the target has unit scale however small it is:
    # the change from the previous frame has a standard deviation of a few hundredths.
    predict: str = "velocity"
    sigma_data: float = 0.5  # standard deviation of the target (the frame, or the change with delta); "edm" only
    # A pixel-space refiner after the last layer (0: none; else its hidden channels). A token of pixel patches
    # holds hundreds of pixels written by one linear map of a narrow feature, so where a token is active (the
    # paddle, the ball, a brick) its errors spread over the whole token as speckle. The refiner is three 3x3
    # convolutions over each frame's pixels, reading the predicted clean frame (or change), the noisy input,
    # the previous frame and the level, and adding a correction to the prediction (DIAMOND's denoiser is
    # convolutional throughout). Its last layer starts at zero, so a refined network starts as the plain one.
    # It needs latents that are raw pixel patches (`pixel_patch`, the patch tokenizer's side) and a network
    # that predicts x0 or uses EDM's preconditioning.
    refine: int = 0
    pixel_patch: int = 0  # the latents are pixel patches of this side, 3 * p * p channels (the patch tokenizer); 0: unknown
    # The sinusoidal time embedding reads time_scale * s: its fastest feature turns time_scale radians per unit of
    # noise level. DiT's 1000 makes the network's derivative in s large, which continuous-time consistency
    # training (sCM) follows and diverges on; sCM (Lu & Song 2024) conditions on the level itself at a low
    # scale. A teacher meant for sCM distillation trains with a small one (e.g. 1 to 10); the student inherits it.
    time_scale: float = 1000.0
    # The output layer that writes each token's latents (0: DiT's linear map; else the hidden width of a
    # two-layer MLP in its place). A linear map from a dim-wide feature reaches only a dim-dimensional subspace of
    # a token's p*p*C outputs (192 of 768 with pixel patches at preset small), so a pattern outside it, such as
    # the ball's few pixels at one of the token's 256 places, is written as its projection: the right pixels
    # too faint and speckle around them. A hidden width >= p*p*C makes the map full-rank (and nonlinear), at the
    # cost of one more matrix per token. Its last layer starts at zero, as DiT's output layer does.
    out_hidden: int = 0
    # A change gate (Delta-IRIS's idea, that a frame should carry only what the previous frame cannot predict,
    # as a decision per latent cell): a head beside the output layer gives, for each cell of each frame, the
    # logit that the cell changes from the previous frame. In generation a cell whose probability is below the
    # threshold (`CausalDiT.gate_threshold`) is the previous frame's, exactly, instead of the network's
    # regression of it: the faint haze and speckle a regression leaves where nothing moves cannot enter the
    # frame, so it cannot compound in a free rollout. Trained by cross-entropy against the cells that really
    # change (train.teacher --change-gate); the flow loss is unchanged. Needs `delta` and a clean-frame output.
    change_gate: bool = False
    # The gate's grain: 1 decides per latent cell (all its channels at once); G > 1 gives each cell G decisions,
    # latent channel i following decision i % G. With the patch tokenizer's P x P pixel patches (a cell's
    # channels ordered colour, row, column), G = P * P is one decision per pixel: the still pixels of a cell that holds a small moving object
    # (the ball) are the previous frame's exactly, where a per-cell gate lets the network's speckle in around it.
    gate_channels: int = 1

    def __post_init__(self) -> None:
        self.latent_size = tuple(self.latent_size)
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")
        h, w = self.latent_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"latent_size {self.latent_size} must be divisible by patch_size {self.patch_size}")
        if self.sink_chunks < 0 or self.window_chunks < 1:
            raise ValueError("need sink_chunks >= 0 and window_chunks >= 1")
        if self.predict not in PREDICTIONS:
            raise ValueError(f"predict must be one of {PREDICTIONS}, got {self.predict!r}")
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ValueError(f"sigma_data must be a positive finite number, got {self.sigma_data}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time_scale must be a positive finite number, got {self.time_scale}")
        if self.out_hidden < 0:
            raise ValueError(f"out_hidden must be >= 0 (0: a linear output layer), got {self.out_hidden}")
        if self.refine < 0 or self.pixel_patch < 0:
            raise ValueError(f"refine and pixel_patch must be >= 0, got {self.refine} and {self.pixel_patch}")
        if self.pixel_patch and self.in_channels != 3 * self.pixel_patch**2:
            raise ValueError(f"pixel_patch {self.pixel_patch} means {3 * self.pixel_patch**2} latent channels (3 x p x p), got in_channels {self.in_channels}")
        if self.refine and not self.pixel_patch:
            raise ValueError("refine needs latents that are pixel patches (pixel_patch > 0: the patch tokenizer)")
        if self.refine and self.predict == "velocity":
            raise ValueError("refine corrects a predicted clean frame: it needs predict 'x0' or 'edm', not 'velocity'")
        if self.prev_stack < 1:
            raise ValueError(f"prev_stack must be >= 1 (the frames before the chunk that prev_frame concatenates), got {self.prev_stack}")
        if self.prev_stack > 1 and not self.prev_frame:
            raise ValueError(f"prev_stack {self.prev_stack} stacks frames that prev_frame concatenates: it needs prev_frame")
        if self.change_gate and not (self.delta and self.predict != "velocity"):
            raise ValueError("change_gate keeps cells of the previous frame: it needs delta and predict 'x0' or 'edm'")
        if self.gate_channels < 1 or self.in_channels % self.gate_channels:
            raise ValueError(f"gate_channels must be >= 1 and divide in_channels {self.in_channels}, got {self.gate_channels}")
        if self.gate_channels > 1 and not self.change_gate:
            raise ValueError(f"gate_channels {self.gate_channels} is the change gate's grain: it needs change_gate")

    @property
    def uses_prev(self) -> bool:
        """Does the network read the previous frame (kept by the KV cache at play time)?"""
        return self.prev_frame or self.delta

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid of one frame (rows, cols)."""
        return (self.latent_size[0] // self.patch_size, self.latent_size[1] // self.patch_size)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens_per_chunk(self) -> int:
        return self.tokens_per_frame * self.frames_per_chunk

    @property
    def context_chunks(self) -> int:
        """Chunks the model attends to at most: sinks, the window, and the chunk itself."""
        return self.sink_chunks + self.window_chunks + 1


SOLVERS = ("euler", "consistency")


@dataclass
class SamplingConfig:
    """How a world model samples: steps per chunk, action guidance scale, time shift, step rule, context noise.

    `solver` "euler" follows the probability-flow ODE (deterministic; the teacher's sampler); "consistency"
    predicts the clean chunk at every level and re-noises it with fresh noise to the next level (the
    multistep sampler of consistency models and DMD students). Both agree at one step.
    """

    steps: int = 8
    guidance: float = 1.0
    shift: float = 1.0
    solver: str = "euler"
    # the level each chunk enters the KV cache at, noised to it (GameNGen's context noise at play time); 0 is clean
    context_noise: float = 0.0
    # the change gate's threshold (models trained with DiTConfig.change_gate): a latent cell whose probability of
    # changing is below it is the previous frame's; 0 switches the gate off. Models without a gate ignore it.
    gate: float = 0.5
    # each generated chunk enters the context as the uint8 frames it decodes to, encoded again, as real frames do:
    # the model then conditions on exactly what the player sees. False commits the generated latents themselves,
    # whose sub-quantum, out-of-range values no real frame has (with the shipped student they freeze the picture
    # within a thousand steps; docs/ablation.md, "Long play: the context as the player sees it").
    requantize: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not (isinstance(self.steps, (int, float)) and math.isfinite(self.steps) and int(self.steps) == self.steps and self.steps >= 1):
            raise ValueError(f"denoising steps must be an integer >= 1, got {self.steps}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {SOLVERS}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"action guidance must be a finite number, got {self.guidance}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"time shift must be a finite positive number, got {self.shift}")
        if isinstance(self.context_noise, bool) or not (isinstance(self.context_noise, numbers.Real) and 0 <= self.context_noise < 1):
            raise ValueError(f"the context-noise level must be a number in [0, 1), got {self.context_noise!r}")
        self.context_noise = float(self.context_noise)
        if isinstance(self.gate, bool) or not (isinstance(self.gate, numbers.Real) and 0 <= self.gate < 1):
            raise ValueError(f"the change gate's threshold must be a probability in [0, 1) (0: off), got {self.gate!r}")
        self.gate = float(self.gate)
        if not isinstance(self.requantize, bool):
            raise ValueError(f"requantize must be true or false, got {self.requantize!r}")

    def to_json(self) -> dict[str, Any]:
        """The settings as written to a model's config.json; context_noise, gate and requantize only when not
        their defaults, so that model folders without them read the same in code that predates the fields."""
        d = to_dict(self)
        if not d["context_noise"]:
            del d["context_noise"]
        if d["gate"] == 0.5:
            del d["gate"]
        if not d["requantize"]:
            del d["requantize"]
        return d


# Size presets, one registry; the CLI reuses its keys as choices.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    # tests
    "tiny": dict(dim=32, depth=2, heads=2, head_hidden=16, patch_size=1),
    # trains on a laptop CPU: 2x2 latent patches -> 16 tokens per 64x64 frame (8x8 latent grid)
    "small": dict(dim=192, depth=6, heads=3, head_hidden=128, patch_size=2),
    # for a GPU: one token per latent cell
    "base": dict(dim=512, depth=12, heads=8, head_hidden=256, patch_size=1),
}


def dit_config(preset: str, **overrides: Any) -> DiTConfig:
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    return DiTConfig(**{**DIT_PRESETS[preset], **overrides})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict, rejecting unknown keys with a clear error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(names)}")
    return cls(**d)


__all__ = ["TokenizerConfig", "DiTConfig", "PREDICTIONS", "X0_MIN_LEVEL", "SamplingConfig", "DIT_PRESETS", "dit_config", "to_dict", "from_dict", "field"]
