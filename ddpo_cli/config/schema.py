"""The typed schema of every command's config, registered in Hydra's ConfigStore.

Fixed-shape sections (model, sampler, train, advantage, checkpoint, log) are dataclasses: an unknown key or a wrong
type fails at composition. Pluggable sections (algo, reward, prompts) are ``_target_`` nodes whose keys are checked
against the target's signature (:func:`ddpo_cli.config.compose.check_target`). ``ddpo sample`` and ``ddpo eval``
reuse the groups ``model``, ``sampler``, ``prompts`` and ``reward`` of ``ddpo train``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0  # scale = alpha / rank; alpha == rank matches diffusers' network_alpha=None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class TinyModelConfig:
    """A small pipeline of ``model.family`` built in code from a seed (used when ``model.builder == "tiny"``)."""

    seed: int = 0
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 2
    cross_attention_dim: int = 32
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])
    text_hidden_size: int = 32
    text_layers: int = 5
    image_size: int = 32
    transformer_layers: int = 2   # flow families (MMDiT): joint transformer blocks
    attention_heads: int = 4
    attention_head_dim: int = 8
    patch_size: int = 2


@dataclass
class ModelConfig:
    name: str = "sd15"
    family: str = "sd"  # sd | sdxl | sd3 (ddpo_cli/models/), or the dotted path of a ModelFamily subclass
    pretrained: Optional[str] = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or local pipeline folder
    revision: Optional[str] = None
    variant: Optional[str] = None
    builder: Optional[str] = None  # "tiny": build in code, materialise under cache_dir, load from there
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    cache_dir: str = "${oc.env:DDPO_CACHE,'~/.cache/ddpo_cli'}"
    use_lora: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    resolution: Optional[int] = None  # image side in pixels; None = the model's native size
    max_sequence_length: Optional[int] = None  # SD3 / FLUX: T5 tokens per prompt (zeros without a T5); None = the
    # pipeline's default (SD3 256, FLUX 512). SD3 without a T5 on diffusers < 0.36: the pipeline pads with the CLIP
    # length instead, whatever this says (the family follows the installed pipeline)
    text_cache_mb: Optional[float] = 1024  # bound on the cached prompt conditionings, on the model's device (least
    # recently used dropped; with T5 one prompt takes ~2.7 MB); null = no bound


@dataclass
class SamplerConfig:
    name: str = "ddim"            # ddim | flow_ode | flow_sde | dance_sde | flow_cps (ddpo_cli/samplers/)
    num_steps: int = 50
    eta: float = 1.0              # ddim: 0 = deterministic, 1 = DDPM-like noise
    noise_level: float = 0.7      # flow_sde / dance_sde / flow_cps: the noise of a stochastic step (0 = the ODE)
    sde_window: Optional[list[int]] = None  # [first, end) step indices that are stochastic (and trained); the
    # others are deterministic (ODE / DDIM eta 0) steps. null = all (Flow-GRPO, DDPO); a few steps = MixGRPO /
    # Flow-GRPO-Fast (flow and ddim samplers)
    sde_window_slide_every: int = 0  # > 0: move the SDE window one step later every this many epochs (wrapping)
    log_prob: str = "exact"       # of a stochastic step: exact (the Gaussian's) | unscaled (-mean((x - mean)^2), Flow-CPS's
    # code: no 1 / (2 std^2), so near-deterministic steps do not dominate the PPO ratio; not a likelihood ratio)
    guidance_scale: float = 5.0
    batch_size: int = 1           # per device
    num_batches_per_epoch: int = 2
    group_size: int = 1           # k images per prompt from the same initial noise (group advantages)
    branch: bool = False          # trajectory branching: a group shares every noise draw but one trained step's
    # (a step of the training window, one per group), and trains only that step, so the group's advantages measure
    # that step's noise alone (TempFlow-GRPO's branching; the other steps keep their noise, drawn once per group)
    antithetic: bool = False      # mirrored pairs in each group: the second image of a pair gets the negative of the
    # first's noise at the trained steps and the same noise elsewhere (variance reduction; needs an even group_size)


@dataclass
class PreserveConfig:
    """Prior preservation: keep the policy's output on other prompts at the base model's (adapter off), so that what
    a run learns on its prompts does not spill into the rest of the model. 0 = off."""
    weight: float = 0.0           # loss += weight x mean squared difference of the guided outputs, policy vs base
    prompts: Optional[str] = None  # a prompts option (conf/prompts) to draw them from; the run's own prompts are
    # left out (e.g. shapes_train: the other toy-world training combos; the held-out set is never used)
    pairs: int = 16               # (state, prompt) pairs per optimizer step: a stored state of this epoch's chains
    # at a trained step, under a prompt drawn from the set


@dataclass
class TrainConfig:
    num_epochs: int = 100
    batch_size: int = 1           # samples per device per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    num_inner_epochs: int = 1
    timestep_fraction: float = 1.0   # share of the window's steps trained per sample (a fresh random subset each)
    timestep_window: list[float] = field(default_factory=lambda: [0.0, 1.0])  # part of the chain trained:
    # 0 = the first (noisiest) step, 1 = the end. [0, 0.3] trains only the early steps that decide layout and count.
    # rwr/rwr_sparse draw their own noise levels; for them window x fraction only sets the draws per sample.
    timesteps_per_forward: int = 4  # (sample, timestep) pairs batched per denoiser call = batch_size x this
    guidance_in_training: bool = True  # recompute the policy with classifier-free guidance, as it was sampled
    lr: float = 3e-4
    lr_schedule: str = "constant"  # constant | cosine (lr -> 0 over the run's optimizer steps; a function of the
    # step, so resume is exact). Late updates of a long run then settle instead of drifting.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    nonfinite_rewards: str = "stop"  # stop: a NaN/inf reward ends the run with one line naming it; drop: train
    # without those samples (their advantage / weight is 0; counted as nonfinite_rewards in metrics.jsonl)
    preserve: PreserveConfig = field(default_factory=PreserveConfig)


@dataclass
class AdvantageConfig:
    mode: str = "per_prompt"      # per_prompt | batch | group
    buffer_size: int = 16
    min_count: int = 16
    shuffle: bool = False         # a control run: permute each epoch's advantages (or weights) across the batch; same
    # update sizes, no link to the samples (dpo: each pair's winner flipped by a coin). A learning claim must beat it.


@dataclass
class CheckpointConfig:
    every: int = 1                # epochs between checkpoints; the last epoch is always saved
    keep_last: Optional[int] = 5  # None keeps all
    best_by: Optional[str] = None  # a monitored value (e.g. gold_reward): its best check's checkpoint is kept in
    # checkpoints/best/ (besides the last ones) and named by the end summary
    best_mode: str = "max"        # max | min: which way best_by is better


@dataclass
class PairedConfig:
    """The paired measure (ddpo_cli/probe.py): policy vs base model on fixed prompts and noise, during the run."""
    every: int = 0                # epochs between measurements of the policy (0 = off); the base is scored once
    images: int = 64              # fixed (prompt, noise) pairs per prompt set; prompts cycle through the set
    heldout: Optional[str] = None  # a prompts option (conf/prompts) measured too, e.g. shapes_heldout: does the
    # gain carry over to prompts the run never trains on?
    metric: str = "reward"        # the headline of the curve and the end summary: reward or a reward-info key
    # (shapes_counting: exact = exact-count accuracy)


@dataclass
class LogConfig:
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    project: str = "ddpo-cli"
    image_every: int = 1          # epochs between image grids and reward-curve plots (the last epoch always)
    grid_images: int = 16
    async_reward: bool = True
    reward_worker_threads: int = 1  # torch CPU threads of the async reward thread (a full team slows training)
    kl_to_base_every: int = 1     # epochs between KL-to-base measurements (0 = never); ~2 extra denoiser calls each
    paired: PairedConfig = field(default_factory=PairedConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    algo: Any = MISSING
    reward: Any = MISSING
    prompts: Any = MISSING
    monitor: Any = None           # the chosen monitors (conf/monitor, one _target_ node each) beside their settings
    # (train.yaml); ddpo_cli/monitors/settings.py checks them
    seed: int = 42
    run_name: str = "run"
    resume: Optional[str] = None
    resume_allow_changes: bool = False  # resume with another algo or reward than the checkpoint's (its optimizer
    # state and statistics came from that objective): refused unless true, then the changes are listed at start-up
    device: str = "auto"          # auto | cpu | cuda   (accelerate decides under `accelerate launch`)
    precision: str = "auto"       # auto | no | fp16 | bf16 (auto: bf16 or fp16 on CUDA, fp32 on CPU; bf16 also on CPUs
    # with bf16 units). LoRA weights, the optimizer and the sampler maths stay fp32
    threads: Optional[int] = None  # torch CPU threads; None = torch default
    accelerate_config: str = "multi_gpu"  # a sweep job whose launcher asks for several GPUs runs as an accelerate
    # launch with this conf/accelerate/ file (multi_gpu | fsdp2 | deepspeed_zero2 | deepspeed_zero3) or .yaml path


@dataclass
class GenerateConfig:
    """What both commands share: which model and checkpoint, which prompts, how many images, which seeds."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # num_steps, eta, guidance; batch_size per call
    prompts: Any = MISSING
    reward: Any = None
    run: Optional[str] = None         # a run directory written by `ddpo train`
    n: int = 4                        # images per prompt
    num_prompts: Optional[int] = 8    # evenly spaced prompts of the set; null = all
    seed: int = 0                     # image (p, i) uses derive_seed(seed, p, i): the same for every checkpoint
    lora_scale: float = 1.0           # W = W0 + lora_scale * dW (0 = base model, 1 = as trained)
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto | no | fp16 | bf16 (auto: fp32 on CPU)
    threads: Optional[int] = None     # torch CPU threads; None = torch default
    trust_run: bool = False           # let the run's config name code outside ddpo_cli (its own rewards, prompts)


@dataclass
class SampleConfig(GenerateConfig):
    checkpoint: Optional[str] = "latest"  # latest | none | <epoch number> | epoch_XXXX | a checkpoint folder


@dataclass
class EvalConfig(GenerateConfig):
    num_prompts: Optional[int] = 16
    sweep: Optional[str] = None       # a multirun directory: summarise its jobs instead of evaluating a run
    checkpoints: Any = "latest"       # latest | all | a list of epochs / epoch_XXXX names / checkpoint folders
    rewards: Dict[str, Any] = field(default_factory=dict)  # extra rewards: name -> reward option or _target_ node
    gold: Optional[str] = None        # which reward judges over-optimisation; null = rewards.gold or the first extra
    grid_prompts: int = 4             # prompts shown in the side-by-side grid (comparison.png)
    grid_images: int = 4              # images per prompt and model in that grid (the same seeds for every model)
    diversity_size: int = 32          # images are downsampled to this side before the pairwise distance
    overopt_threshold: float = 1.0    # a change counts when |mean| > threshold x its paired standard error


@dataclass
class RewardServerConfig:
    host: str = "127.0.0.1"           # 0.0.0.0 to serve other machines
    port: int = 8100
    accelerator: str = "auto"         # auto | cpu | cuda
    devices: Any = "auto"             # GPUs to use (one reward model each), or auto (all; 1 on a CPU)
    workers_per_device: int = 1       # reward model instances per device
    max_batch_requests: int = 8       # requests merged into one scoring call (dynamic batching)
    batch_timeout: float = 0.01       # seconds a scoring call waits for more requests to merge
    batch_size: int = 32              # images per reward forward pass
    max_images_per_request: int = 256
    max_request_mb: float = 64.0      # a larger request body is refused (HTTP 413)
    max_pending: int = 64             # requests in flight at once; more are refused with HTTP 503 (clients retry)
    timeout: float = 300.0            # seconds a request may wait and run before HTTP 504


@dataclass
class ServeRewardConfig:
    reward: Any = MISSING
    server: RewardServerConfig = field(default_factory=RewardServerConfig)
    threads: Optional[int] = None     # torch CPU threads of each worker; None = torch default


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(name="serve_reward_schema", node=ServeRewardConfig)
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="eval_schema", node=EvalConfig)


register_configs()
