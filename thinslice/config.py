"""The one config schema of the project: every YAML in config/ is validated against it.

Unknown or misspelled keys are errors that name the key (and suggest the closest valid one),
so a typo never silently falls back to a default; a key that was renamed names its new name.

One recipe, several sizes: `config/recipe.yaml` holds what makes the model work, written once. A size file
starts with `recipe: recipe.yaml` (a path relative to itself) and sets only what SIZE_KEYS, STAGE_KEYS and
DATA_KEYS name, plus any other change declared under `differs: {dotted.key: "why"}`; load_config deep-merges
the file over its recipe (a chain of such files is followed to its root). tests/test_recipe.py holds every
shipped config to this with recipe_differences(), so what scales (cluster.yaml) is what was shown to work.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file that does not match the schema; the message names every offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThickConfig(_Strict):
    """How a thick scan is simulated from a thin one (slab average)."""

    slab_thickness_mm: float = Field(5.0, gt=0)
    slab_spacing_mm: float = Field(5.0, gt=0)


class SeriesSelection(_Strict):
    """Which series of a case count as thin (truth) and thick (input)."""

    thin_max_spacing_mm: float = Field(2.0, gt=0)
    thick_min_spacing_mm: float = Field(3.0, gt=0)
    # "auto": a real thick series when the case has one, else simulate it from the thin series.
    thick_source: Literal["auto", "paired", "simulated"] = "auto"
    # A case with thick series only is kept as `thick_kind: thick-only`: no truth to score, but its own
    # in-plane axes still give training pairs (latents.inplane); false lists it as a failure instead.
    keep_thick_only: bool = True

    @model_validator(mode="after")
    def _ordered(self):
        if self.thick_min_spacing_mm <= self.thin_max_spacing_mm:
            raise ValueError("thick_min_spacing_mm must be larger than thin_max_spacing_mm")
        return self


class SplitConfig(_Strict):
    """Patient-level split; a patient's bucket depends only on its own id, so adding cases moves nobody."""

    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    seed: str = "thinslice-split-v1"
    # Pin patients (hashed ids or the raw names the patient_regex extracts) or case ids to a split.
    fixed: dict[str, Literal["train", "val", "test"]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class PatchConfig(_Strict):
    """Where training patches are centred and how they are augmented (size: autoencoder.patch_size)."""

    # the body: autoencoder patches and the latents' pair crops are centred on voxels above this
    body_threshold_hu: float = -500.0
    flip_axes: tuple[int, ...] = (0, 1)
    jitter_hu: float = Field(10.0, ge=0)
    jitter_scale: float = Field(0.02, ge=0, lt=0.5)


class DataConfig(_Strict):
    hu_window: tuple[float, float] = (-1024.0, 2048.0)
    thick: ThickConfig = ThickConfig()
    series: SeriesSelection = SeriesSelection()
    split: SplitConfig = SplitConfig()
    # Regex with one group applied to the case id to find the patient when DICOM has no PatientID.
    patient_regex: str | None = None
    # source: cases are named after their file or folder; pseudonym: "case-" + a keyed hash of that name, for
    # exports whose folder names carry patient names (the name -> pseudonym table stays in CACHE/case_names.csv)
    case_names: Literal["source", "pseudonym"] = "source"
    patches: PatchConfig = PatchConfig()

    @model_validator(mode="after")
    def _window(self):
        if self.hu_window[1] <= self.hu_window[0]:
            raise ValueError("hu_window must be [low, high] with high > low")
        return self


class AutoencoderConfig(_Strict):
    """Patch-encoded, volume-decoded autoencoder (AutoEncoder/)."""

    compression: tuple[int, int, int] = (4, 4, 4)  # per axis (x, y, z), powers of two
    latent_channels: int = Field(8, gt=0)
    channels: tuple[int, ...] = (32, 64, 128)  # one width per resolution: log2(max(compression)) + 1
    num_res_blocks: int = Field(1, ge=1)
    encoder_attention: bool = True  # attention in the encoder's middle block (patch-local)
    regularizer: Literal["vq", "kl"] = "vq"
    codebook_size: int = Field(1024, gt=1)
    commitment: float = Field(0.25, ge=0)
    ema_decay: float = Field(0.99, gt=0, lt=1)
    dead_code_threshold: float = Field(0.01, ge=0)  # EMA usage under which a code is restarted
    restart_every: int = Field(50, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    patch_size: tuple[int, int, int] = (64, 64, 64)  # patch-wise encoding of whole volumes
    encode_overlap: float = Field(0.25, ge=0, lt=1)
    decode_chunk: tuple[int, int, int] = (64, 64, 64)  # latent voxels per decoded chunk
    # latent context per side of a decoded chunk, >= the decoder's receptive radius: decoding in chunks is then
    # exact (training, validation; interpolation may trade some of it for speed: interpolate.decode_halo)
    decode_halo: int = Field(12, ge=0)

    @model_validator(mode="after")
    def _levels(self):
        for c in self.compression:
            if c < 1 or c & (c - 1):
                raise ValueError(f"compression factors must be powers of two, got {self.compression}")
        levels = max(self.compression).bit_length()  # log2 + 1
        if len(self.channels) != levels:
            raise ValueError(f"channels needs {levels} widths for compression {self.compression}, got {len(self.channels)}")
        for p, c in zip(self.patch_size, self.compression):
            if p % c:
                raise ValueError(f"patch_size {self.patch_size} must be a multiple of compression {self.compression}")
        return self


class LossConfig(_Strict):
    l1_weight: float = Field(1.0, ge=0)
    perceptual_weight: float = Field(0.1, ge=0)
    perceptual_weights: str = "pretrained/medicalnet_resnet10_23datasets.pth"
    adv_weight: float = Field(0.05, ge=0)
    adv_start_step: int = Field(2000, ge=0)
    adv_criterion: Literal["hinge", "least_squares"] = "hinge"
    feature_matching_weight: float = Field(0.0, ge=0)
    disc_channels: int = Field(32, gt=0)
    disc_layers: int = Field(3, ge=1)


class TrainingLoop(_Strict):
    """Settings every trainer's loop has; batch_size is per rank (global = batch x ranks x grad_accum)."""

    batch_size: int = Field(2, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(20000, gt=0)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(500, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # precision is set per command (each trainer here, interpolate.bf16 for inference): a size choice, made where
    # the command runs
    bf16: bool = True  # false: fp32 everywhere; true: thinslice.precision decides from the hardware
    cpu_bf16: bool | None = None  # None: bf16 on CPU only with AMX / AVX-512-BF16; true/false forces it
    seed: int = 0
    num_workers: int = Field(2, ge=0)
    log_every: int = Field(10, gt=0)
    val_every: int = Field(1000, gt=0)
    val_max_cases: int = Field(4, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)


class AETrainConfig(TrainingLoop):
    """One stage of autoencoder training; stage 2 names the stage-1 checkpoint in init_from."""

    stage: Literal[1, 2] = 1
    init_from: str | None = None
    crop_size: tuple[int, int, int] | None = None  # stage 2: None = whole volumes
    disc_lr: float = Field(1e-4, gt=0)
    image_every: int = Field(500, gt=0)
    # the splits whose cases the autoencoder trains on (its validation is always the val split): the shipped CPU
    # autoencoder also trained on the U-Net's val chest, which is not the model being validated there
    train_splits: tuple[Literal["train", "val"], ...] = ("train",)

    @model_validator(mode="after")
    def _stage(self):
        if self.stage == 2 and not self.init_from:
            raise ValueError("stage 2 needs init_from: the stage-1 checkpoint")
        return self


class UNetConfig(_Strict):
    """Transformer-augmented latent U-Net (ddpm/unet.py); latent channels come from the latents."""

    model_channels: int = Field(64, gt=0)
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = Field(2, ge=1)
    attention_levels: tuple[int, ...] = (1,)
    window: int = Field(4, gt=0)  # intra-patch attention over window^3 latent tokens
    dit_depth: int = Field(1, ge=1)
    heads: int = Field(4, gt=0)
    global_depth: int = Field(2, ge=0)  # inter-patch (global) attention blocks at the bottleneck
    grad_checkpoint: bool = False
    # Also give the network the cubic volume itself, rearranged space-to-depth onto the latent grid (one channel
    # per image voxel of a latent voxel): the condition latent is lossy, this is not.
    cond_image: bool = False

    @model_validator(mode="after")
    def _levels(self):
        bad = [a for a in self.attention_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside the {len(self.channel_mult)} levels of channel_mult")
        for m in self.channel_mult:
            if (self.model_channels * m) % self.heads:
                raise ValueError(f"width {self.model_channels * m} is not divisible by heads={self.heads}")
        return self


class DiffusionConfig(_Strict):
    num_steps: int = Field(1000, gt=1)
    prediction: Literal["eps", "v", "x0"] = "v"
    min_snr_gamma: float | None = Field(5.0, gt=0)
    # Diffuse thin - condition (the detail the thick scan lacks) instead of the thin latent itself.
    residual: bool = True
    # How every sample is drawn: the U-Net's validation during training and the interpolation both read these from
    # the config they are given (interpolation: --config, else the defaults; --steps overrides sample_steps), so the
    # best.pt a run keeps is chosen on the samples it will be used with.
    sampler: Literal["ddim", "ddpm"] = "ddim"
    # 1: one DDIM step from noise, i.e. the U-Net's posterior-mean estimate of the thin latent: with the shipped
    # weights it scores above 25-step samples on held-out chest (33.50 vs 33.18 dB on a test block; samples add
    # detail that is not the truth's) at 1/25 of the cost. Use --samples N with more steps for a std map.
    sample_steps: int = Field(1, gt=0)
    eta: float = Field(0.0, ge=0)


class LatentsConfig(_Strict):
    """Extra training pairs per case for the latent dataset (train/generate_training_latent.py).

    Besides each case's own (thin, cond) pair, `pairs_per_case`-many random crops are cut from pairs
    made on the fly: z pairs re-thicken the thin series at every slab in `z_slabs_mm` and several
    slab phases; in-plane pairs (SMORE) make an in-plane axis of the thick scan the slice axis, so
    thick-only cases train too. Crops, not volumes, are encoded, so the cost per case is bounded."""
    z_slabs_mm: tuple[float, ...] = (3.0, 5.0, 7.0)  # slab thickness = spacing of the simulated thick scans
    z_phases: int = Field(2, ge=1)  # slab phases per thickness (offsets of the first slab, in thin slices)
    inplane: bool = True  # in-plane pairs from every case's thick scan (the only pairs of a thick-only case)
    inplane_phases: int = Field(2, ge=1)
    output_spacing_mm: float = Field(1.0, gt=0)  # the thin spacing in-plane pairs are box-averaged to
    crop: tuple[int, int, int] = (64, 64, 32)  # image voxels per encoded crop, multiples of the compression
    crops_per_pair: int = Field(4, ge=0)  # 0: no extra pairs, only each case's own (thin, cond)
    # false: a training case's own whole-volume pair is not encoded (only its crops are; what unet.cond_image
    # trains on), which keeps the cost bounded on large scans; val and test cases are always encoded whole
    whole_train_cases: bool = True
    # > 0, the cascade (issue 26): every training pair's condition is its cubic refined by a per-scan adapter
    # (ddpm/adapt.py) fitted for this many steps on that pair's own thick input, as interpolation refines a scan
    # before the U-Net; a U-Net trained on such latents is then conditioned on the adapted volume. 0: on cubic
    cond_adapt_steps: int = Field(0, ge=0)
    seed: int = 0


class UNetTrainConfig(TrainingLoop):
    """Latent U-Net training (train/train_unet_latent.py)."""

    crop_size: tuple[int, int, int] = (32, 32, 16)  # latent voxels, multiples of the U-Net's size multiple
    samples_per_case: int = Field(64, gt=0)  # random crops per training case per epoch
    # share of each batch trained at the last timestep (t = T-1): the step a 1-step sample starts from, where
    # the network's x0 is its posterior-mean estimate given the condition; 0: uniform t only
    final_step_fraction: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(4, gt=0)
    max_steps: int = Field(100000, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(1000, ge=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    log_every: int = Field(50, gt=0)
    val_every: int = Field(2000, gt=0)
    val_max_cases: int = Field(2, gt=0)
    val_crop: tuple[int, int, int] | None = (32, 32, 16)  # latent crop at each val case's centre; None = whole
    checkpoint_every: int = Field(2000, gt=0)
    # start from the EMA weights and latent scaling of this U-Net (a run's checkpoint or an exported file such as
    # pretrained/unet.pt) with a fresh optimiser and schedule: fine-tuning on one's own latents, which must come
    # from the autoencoder that U-Net was trained with; a resumed run ignores it
    init_from: str | None = None


class InterpolateConfig(_Strict):
    """evaluation/interpolate.py: which weights, which output grid, how to sample."""

    autoencoder: str = "pretrained/autoencoder.pt"
    unet: str = "pretrained/unet.pt"
    spacing_mm: float = Field(1.0, gt=0)  # output slice spacing
    # (the sampler and its steps: diffusion.sampler and diffusion.sample_steps of this config)
    samples: int = Field(1, gt=0)  # > 1: mean as output, per-voxel std as an uncertainty map
    seed: int = 0
    # latent sliding window, multiples of the U-Net's size multiple; None: the crop the U-Net was trained on, so its
    # global attention sees as many tokens as in training
    window: tuple[int, int, int] | None = None
    overlap: float = Field(0.25, ge=0, lt=1)
    sw_batch_size: int = Field(4, gt=0)
    consistency: bool = True  # project the output so each slab's average equals the thick slice
    # residual: output = cubic + D(z_thin) - D(z_cubic), so the autoencoder's own reconstruction error cancels
    # and only what the U-Net changed in latent space reaches the image; direct: output = D(z_thin)
    decode: Literal["residual", "direct"] = "residual"
    # as in the trainers: thinslice.precision decides from the hardware unless forced. Not one knob with the trainers':
    # where and how a model is trained (a cluster's GPUs) and where it is used (a hospital's CPU) differ
    bf16: bool = True
    cpu_bf16: bool | None = None
    # peak memory (GiB) the interpolation plans for: the decoder's chunk shrinks to fit it (the decoder at full
    # resolution is what grows with a chunk; the latent and a few output-sized arrays are what grows with a scan)
    max_memory_gb: float = Field(8.0, gt=1)
    # latent context per side of a decoded chunk (at most the autoencoder's decode_halo; None: that): 6 decodes
    # the shipped autoencoder within 1.0 HU max, 0.008 HU mean of one unchunked pass (fp32), 12 costs 2-3x more.
    # Residual decoding decodes D(sample) and D(condition) chunk by chunk with the same context, so their seams
    # cancel: 3 gives the held-out PSNR of 6 to 0.001 dB (benchmarks/results/speed_quality.json), 24 % less work.
    # Not the same knob as autoencoder.decode_halo: that one is the model's exact context (stored with its weights,
    # used in training and validation), this one the interpolation's trade of that exactness for speed
    decode_halo: int | None = Field(3, ge=0)
    # thick slices per tile for scans without truth (each computed with a halo as deep as the decoder sees);
    # None: whole scans that fit half of max_memory_gb, tiles sized from it otherwise
    tile_slices: int | None = Field(None, gt=0)
    # > 0: fit a small 2D CNN for this many steps on the input scan's own in-plane pairs and refine the
    # cubic volume with it before the U-Net's change is added (ddpm/adapt.py); needs decode: residual.
    # 600: about 1 min on a 2-core CPU, +1.3..+1.5 dB over cubic + consistency on three held-out chest crops
    adapt_steps: int = Field(600, ge=0)
    adapt_crop: int = Field(64, ge=16)
    # the latent model and the adapter work on the body's bounding box (voxels above -500 HU, widened by this many
    # voxels in-plane); outside it the output is cubic (air), then projected like everything else. None: the whole
    # field of view. The body of a chest CT fills about half of it
    body_margin: int | None = Field(32, ge=0)
    # patch overlap of the condition's encoding (None: the autoencoder's own encode_overlap, 0.25 for the shipped one).
    # 0 encodes 2.4x fewer patches for -0.02..-0.03 dB on held-out crops (benchmarks/results/speed_quality.json)
    encode_overlap: float | None = Field(0.0, ge=0, lt=1)
    # > 0: before sampling, train a copy of the U-Net this many steps on the input's own in-plane pairs
    # (ddpm/scan_tune.py; issue 26's per-scan latent tuning, off until validation scans show it pays)
    unet_tune_steps: int = Field(0, ge=0)
    unet_tune_lr: float = Field(1e-4, gt=0)

    @model_validator(mode="after")
    def _adapt(self):
        if self.adapt_steps and self.decode != "residual":
            raise ValueError("adapt_steps needs decode: residual (the adapted volume replaces cubic as the base)")
        return self


class Config(_Strict):
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    loss: LossConfig = LossConfig()
    ae_train: AETrainConfig = AETrainConfig()
    latents: LatentsConfig = LatentsConfig()
    unet: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    unet_train: UNetTrainConfig = UNetTrainConfig()
    interpolate: InterpolateConfig = InterpolateConfig()


# Old names of knobs that now have one name: the old name is an error that names the new one (a config that set it
# would otherwise be refused as unknown without a hint, or silently lose the setting).
RENAMED = {
    "unet_train.val_sample_steps": ("diffusion.sample_steps", "validation samples as interpolation does"),
    "interpolate.sample_steps": ("diffusion.sample_steps", "one name for the steps of every sample; --steps "
                                                           "overrides it on the command line"),
    "interpolate.sampler": ("diffusion.sampler", "one name for how every sample is drawn"),
    "latents.body_threshold_hu": ("data.patches.body_threshold_hu", "one body threshold for autoencoder patches "
                                                                     "and pair crops"),
}

# The top-level keys of a size file that are not config sections.
INCLUDE, DIFFERS = "recipe", "differs"

# What a size file may change: how big the networks, crops and batches are, how long and how parallel the runs are,
# how often they log and save, and the precision. Everything else is the recipe (config/recipe.yaml); a size file
# declares any other change under `differs:` with its reason. A dotted name covers the keys under it.
_LOOP = ("batch_size", "grad_accum", "max_steps", "lr", "warmup_steps", "bf16", "cpu_bf16", "num_workers", "log_every",
         "val_every", "val_max_cases", "checkpoint_every", "keep_last")
SIZE_KEYS = frozenset({
    "autoencoder.channels", "autoencoder.num_res_blocks", "autoencoder.encoder_attention", "autoencoder.patch_size",
    "autoencoder.decode_chunk", "autoencoder.decode_halo",  # the halo follows the decoder's depth (its receptive radius)
    "loss.disc_channels", "loss.disc_layers", "loss.adv_start_step",
    *(f"ae_train.{k}" for k in _LOOP + ("disc_lr", "image_every")),
    "latents.crop", "latents.crops_per_pair",
    "unet.model_channels", "unet.channel_mult", "unet.num_res_blocks", "unet.attention_levels", "unet.window",
    "unet.dit_depth", "unet.heads", "unet.global_depth", "unet.grad_checkpoint",
    *(f"unet_train.{k}" for k in _LOOP + ("crop_size", "samples_per_case", "ema_decay", "val_crop")),
    "interpolate.window", "interpolate.sw_batch_size", "interpolate.max_memory_gb", "interpolate.tile_slices",
    "interpolate.bf16", "interpolate.cpu_bf16",
})
# Which of the autoencoder's two stages a file runs: the trainer reads one ae_train section, so stage 2 is its own
# file (`recipe:` the stage-1 file of the same size) that sets these.
STAGE_KEYS = frozenset({"ae_train.stage", "ae_train.init_from", "ae_train.crop_size"})
# Which cases: how a dataset's patients are named and split. They describe the user's data, not how the model is made.
DATA_KEYS = frozenset({"data.split", "data.patient_regex", "data.case_names"})


def _known_path(dotted: str) -> bool:
    """Whether `dotted` names a section or key of the schema (a dict-valued key may be followed by any entry)."""
    model: type[BaseModel] | None = Config
    for part in dotted.split("."):
        if model is None:
            return False
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif getattr(ann, "__origin__", None) is dict:
            return True  # e.g. data.split.fixed.<patient>
        else:
            model = None
    return True


def _describe(err: dict, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        if loc in RENAMED:
            new, why = RENAMED[loc]
            return f"{loc}: renamed to {new} ({why})"
        parent = model
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            ann = getattr(field, "annotation", None)
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if parent is None:
                break
        known = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{loc}: unknown key{hint}"
    return f"{loc or '<root>'}: {err['msg']}"


def parse_config(raw: dict | None, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw or {})
    except ValidationError as e:
        lines = [_describe(err, Config) for err in e.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def from_stored(raw: dict) -> Config:
    """The config a checkpoint stored (every key written out): keys of an older schema that were renamed are dropped,
    since the full dump always holds their new name too, so weights trained before a rename still load."""
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for old in RENAMED:
        section, key = old.split(".", 1)
        if isinstance(raw.get(section), dict):
            raw[section].pop(key, None)
    return parse_config(raw, "the checkpoint's config")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def load_layers(path: str | Path) -> list[tuple[Path, dict]]:
    """The file and every file it names with `recipe:`, the recipe first (the root of the chain), raw as read."""
    layers: list[tuple[Path, dict]] = []
    path = Path(path)
    while True:
        if any(path.resolve() == p.resolve() for p, _ in layers):
            raise ConfigError(f"{layers[0][0]}: `recipe:` files name each other in a circle ({path})")
        raw = _read(path)
        layers.append((path, raw))
        parent = raw.get(INCLUDE)
        if parent is None:
            return layers[::-1]
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: recipe: must be a path to a YAML file (relative to {path.name}'s folder)")
        if not (path.parent / parent).is_file():
            raise ConfigError(f"{path}: recipe: {parent} not found (looked at {path.parent / parent})")
        path = path.parent / parent


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings are merged key by key, anything else (lists too) replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve(path: str | Path) -> tuple[dict, dict[str, str], list[tuple[Path, dict]]]:
    """(the merged sections, the declared differences with their reasons, the layers) of a config file."""
    layers = load_layers(path)
    merged: dict = {}
    differs: dict[str, str] = {}
    for where, raw in layers:
        declared = raw.get(DIFFERS) or {}
        if not isinstance(declared, dict):
            raise ConfigError(f"{where}: differs: must map dotted keys to the reason for each difference")
        for key, why in declared.items():
            if not _known_path(str(key)):
                raise ConfigError(f"{where}: differs: {key}: unknown key")
            if not isinstance(why, str) or not why.strip():
                raise ConfigError(f"{where}: differs: {key}: say why (a non-empty reason)")
            differs[str(key)] = why
        merged = _merge(merged, {k: v for k, v in raw.items() if k not in (INCLUDE, DIFFERS)})
    return merged, differs, layers


def add_set_argument(parser) -> None:
    """`--set SECTION.KEY=VALUE` (repeatable) on a command line: any key of the schema, over the config file."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key with a YAML value, over --config (repeatable), e.g. "
                             "--set interpolate.body_margin=16; python -m thinslice.config shows the result")


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """`SECTION.KEY=VALUE` strings (YAML values) as nested sections; an unknown key is an error that names it."""
    nested: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. interpolate.body_margin=16")
        if key in RENAMED:
            raise ConfigError(f"--set {key}: renamed to {RENAMED[key][0]} ({RENAMED[key][1]})")
        if not _known_path(key):
            parent, _, last = key.rpartition(".")
            known = _section_keys(parent)
            close = difflib.get_close_matches(last, known, n=1)
            raise ConfigError(f"--set {key}: unknown key" + (f" (did you mean '{parent}.{close[0]}'?)" if close else ""))
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return nested


def _section_keys(dotted: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in dotted.split(".") if dotted else []:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read and validate a YAML config, merged over the recipe it names (`recipe:`), then the command line's
    `--set` overrides; no file gives the defaults (and the overrides)."""
    merged, layers = {}, []
    if path is not None:
        merged, _, layers = resolve(path)
    extra = parse_overrides(overrides)
    merged = _merge(merged, extra)
    try:
        return Config.model_validate(merged)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            line = _describe(err, Config)
            setters = [p for p, raw in layers if _has(raw, err["loc"])]
            if _has(extra, err["loc"]):
                line += " (set by --set)"
            elif setters and setters[-1] != layers[-1][0]:
                line += f" (set in {setters[-1]})"
            lines.append(line)
        raise ConfigError(f"{path or 'the defaults'}: " + "; ".join(lines)) from None


def _has(raw, loc) -> bool:
    for part in loc:
        if not isinstance(raw, dict) or part not in raw:
            return False
        raw = raw[part]
    return True


def _leaves(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def recipe_differences(path: str | Path, recipe: str | Path) -> list[str]:
    """How a config departs from `recipe` beyond SIZE_KEYS, STAGE_KEYS, DATA_KEYS and its declared `differs`:
    one line per problem (empty: it runs the recipe). A file must descend from `recipe` through `recipe:`, and a
    declared difference that does not differ is a problem too (a stale reason misleads the reader)."""
    recipe = Path(recipe)
    _, differs, layers = resolve(path)
    if not any(p.resolve() == recipe.resolve() for p, _ in layers):
        return [f"{path}: does not descend from {recipe} (add `recipe: {recipe.name}` or a size file that has it)"]
    ours = _leaves(load_config(path).model_dump(mode="json"))
    base = _leaves(load_config(recipe).model_dump(mode="json"))
    allowed = SIZE_KEYS | STAGE_KEYS | DATA_KEYS
    problems = []
    for key in sorted(set(ours) | set(base)):
        if ours.get(key) != base.get(key) and not _covered(key, allowed) and not _covered(key, differs):
            problems.append(f"{path}: {key} is {ours.get(key)!r}, the recipe's is {base.get(key)!r}: not a size key; "
                            f"declare it under differs: with the reason, or drop it")
    for key, why in differs.items():
        if all(ours.get(k) == base.get(k) for k in set(ours) | set(base) if _covered(k, [key])):
            problems.append(f"{path}: differs: {key} ({why}) is declared but equals the recipe")
    return problems


def _print_resolved(argv: list[str]) -> int:
    """`python -m thinslice.config FILE`: what a run with FILE will use, every default filled in, as JSON."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m thinslice.config",
                                description="Print a config file resolved and validated, as JSON: merged over the "
                                            "recipe it names (recipe:), defaults filled in.")
    p.add_argument("config", nargs="?", type=Path, help="YAML file (none: the defaults)")
    p.add_argument("--section", help="print only this section (data, autoencoder, loss, ae_train, latents, unet, "
                                     "diffusion, unet_train, interpolate)")
    add_set_argument(p)
    args = p.parse_args(argv)
    try:
        resolved = load_config(args.config, args.overrides).model_dump(mode="json")
        if args.section:
            if args.section not in resolved:
                raise ConfigError(f"no section {args.section!r}; sections: {', '.join(resolved)}")
            resolved = resolved[args.section]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(resolved, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_print_resolved(sys.argv[1:]))
