"""Train the toy world's tiny text-to-image model from a seed and save it as a diffusers pipeline folder.

The model is Stable-Diffusion-shaped so that it loads with plain ``StableDiffusionPipeline.from_pretrained``:
  - tokenizer: ``CLIPTokenizer`` from a BPE vocab learnt on the ~15 caption words (whole words are single tokens);
  - text encoder: ``CLIPTextModel`` (hidden 64, 2 layers, 16 positions), trained jointly with the UNet;
  - VAE: ``AutoencoderKL`` with downsampling factor 2 (32x32x3 images <-> 4x16x16 latents), trained first;
  - UNet: ``UNet2DConditionModel`` on 4x16x16 latents (channels 32/64/64, attention at 8x8 and 4x4);
  - scheduler: SD v1 DDIM config (scaled_linear 0.00085..0.012, 1000 steps, epsilon, steps_offset 1).

Stages: (1) VAE on freshly rendered images (MSE + small KL), (2) encode a fixed rendered data set to latents,
(3) UNet + text encoder on the latents (epsilon MSE, 10% empty captions for classifier-free guidance, EMA weights).
Every ``--save-every`` steps the EMA pipeline is saved to ``--out`` (atomically), evaluated with the detector
(DDIM, eta 1, 20 steps, guidance 5) and a resumable checkpoint is written to ``--work``. Re-running the same
command resumes from the last checkpoint; each step's batch and noise depend only on (seed, step).

    python scripts/train_tiny_shapes.py                       # full run (see docs/toyworld.md for time)
    python scripts/train_tiny_shapes.py --vae-steps 50 --unet-steps 50 --out /tmp/tiny --work /tmp/tiny_work
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpo_cli.models.tiny import portable_text_encoders  # noqa: E402
from ddpo_cli.toyworld.detect import check, detect  # noqa: E402
from ddpo_cli.toyworld.render import COLOURS, COUNT_WORDS, SHAPES, all_combos, caption, metadata, render_dataset  # noqa: E402

WORDS = list(COUNT_WORDS.values()) + COLOURS + SHAPES + [s + "s" for s in SHAPES]
MAX_TOKENS = 16
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                 timestep_spacing="leading")


# ----------------------------------------------------------------------------------------------------- components
def build_tokenizer(folder: Path):
    """Learn a BPE vocab on the caption words (each word becomes one token) and load it as a ``CLIPTokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(WORDS, trainer)
    model = json.loads(bpe.to_str())["model"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], indent=0, sort_keys=True))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                              pad_token="<|endoftext|>")
    assert all(len(tokenizer(w).input_ids) == 3 for w in WORDS), "every caption word must be a single token"
    return tokenizer


def build_models(tokenizer, seed: int):
    """Fresh (vae, text_encoder, unet), initialised from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=32, mid_block_add_attention=False)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    return vae, text_encoder, unet


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------- stages
def train_vae(vae, args, state: dict, log) -> None:
    """Stage 1: reconstruction MSE + ``kl_weight`` * KL (mean per latent element) on fresh rendered batches."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    if "vae_optimizer" in state:
        optimizer.load_state_dict(state["vae_optimizer"])
    vae.train()
    start, first = time.time(), state.get("vae_step", 0)
    for step in range(first, args.vae_steps):
        images, _, _ = render_dataset(args.vae_batch, seed=10_000_000 + args.seed * 100_000 + step)
        x = to_tensor(images)                                               # [B, 3, 32, 32]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(torch.Generator().manual_seed(step))).sample
        kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar).mean()
        loss = F.mse_loss(recon, x) + args.kl_weight * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            log({"stage": "vae", "step": step + 1, "loss": loss.item(), "kl": kl.item(),
                 "s_per_step": (time.time() - start) / (step + 1 - first)})
        if (step + 1) % args.save_every == 0 or step + 1 == args.vae_steps:
            state.update(vae_step=step + 1, vae=vae.state_dict(), vae_optimizer=optimizer.state_dict())
            save_state(state, args.work)
    vae.eval()


@torch.no_grad()
def rendered_latents(vae, args) -> dict:
    """``--data`` rendered images (seed ``--seed``) encoded by ``vae``: latent means / stds ``[N, 4, 16, 16]`` and
    captions, cached in ``--work/latents.pt`` (also used by train_tiny_shapes_flow.py)."""
    cache = Path(args.work) / "latents.pt"
    if cache.exists():
        return torch.load(cache)
    images, captions, _ = render_dataset(args.data, seed=args.seed)
    means, stds = [], []
    for i in range(0, args.data, 500):
        posterior = vae.encode(to_tensor(images[i:i + 500])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    data = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions}
    torch.save(data, cache)
    return data


def encode_dataset(vae, args, log) -> dict:
    """Stage 2: the rendered data's latents (:func:`rendered_latents`); sets the VAE ``scaling_factor``."""
    data = rendered_latents(vae, args)
    scale = 1.0 / (data["mean"].var() + (data["std"] ** 2).mean()).sqrt().item()
    vae.register_to_config(scaling_factor=scale)
    log({"stage": "encode", "n": len(data["captions"]), "scaling_factor": scale})
    return data


def train_unet(vae, text_encoder, unet, tokenizer, data: dict, args, state: dict, log) -> None:
    """Stage 3: epsilon-prediction MSE on scaled latents; text encoder trained jointly; EMA of both."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema = [p.detach().clone() for p in params]
    if "unet_optimizer" in state:
        optimizer.load_state_dict(state["unet_optimizer"])
        ema = state["ema"]
    captions = data["captions"]
    ids = tokenizer(captions + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids                           # [N + 1, 16]; last row = empty caption
    scale = vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    start, first = time.time(), state.get("unet_step", 0)
    for step in range(first, args.unet_steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        index = torch.randint(0, len(captions), (args.batch,), generator=g)
        latents = (data["mean"][index] + data["std"][index] * torch.randn(data["mean"][index].shape, generator=g))
        latents = latents * scale                                           # [B, 4, 16, 16], ~unit std
        drop = torch.rand(args.batch, generator=g) < args.caption_dropout
        token_ids = torch.where(drop[:, None], ids[-1], ids[index])        # [B, 16]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        pred = unet(noisy, t, text_encoder(token_ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if (step + 1) % 50 == 0:
            log({"stage": "unet", "step": step + 1, "loss": loss.item(),
                 "s_per_step": (time.time() - start) / (step + 1 - first)})
        if (step + 1) % args.save_every == 0 or step + 1 == args.unet_steps:
            state.update(unet_step=step + 1, unet=unet.state_dict(), text_encoder=text_encoder.state_dict(),
                         unet_optimizer=optimizer.state_dict(), ema=ema)
            save_state(state, args.work)
            save_pipeline(vae, text_encoder, unet, tokenizer, ema, params, args, step + 1, log)


# ----------------------------------------------------------------------------------------------------- saving
def save_state(state: dict, work: str) -> None:
    """Atomically write the resumable training state."""
    tmp = Path(work) / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, Path(work) / "state.pt")


def save_pipeline(vae, text_encoder, unet, tokenizer, ema, params, args, step: int, log) -> None:
    """Swap the EMA weights in, save the pipeline to ``--out`` (atomic rename), evaluate it, swap back."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(Path(args.work) / "tokenizer" / "vocab.json", tmp / "tokenizer" / "vocab.json")
    shutil.copy(Path(args.work) / "tokenizer" / "merges.txt", tmp / "tokenizer" / "merges.txt")
    portable_text_encoders(tmp)  # the text encoder in the key layout every supported transformers loads
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    snapshot = Path(args.work) / f"pipeline_step{step:06d}"
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(out, snapshot)
    log({"stage": "eval", "step": step, **quick_eval(pipe, args.eval_images)})
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    unet.train()
    text_encoder.train()


@torch.no_grad()
def quick_eval(pipe, per_combo: int) -> dict:
    """Generate ``per_combo`` images for each of the 48 captions (DDIM eta 1, 20 steps, CFG 5) and score them."""
    combos = all_combos() * per_combo
    results = []
    for i in range(0, len(combos), 48):
        chunk = combos[i:i + 48]
        images = pipe([caption(*c) for c in chunk], num_inference_steps=20, guidance_scale=5.0, eta=1.0,
                      generator=torch.Generator().manual_seed(i), output_type="np").images
        results += [check(detect((im * 255).round().astype(np.uint8)), metadata(*c)) for im, c in zip(images, chunk)]
    return {k: float(np.mean([r[k] for r in results]))
            for k in ("colour_correct", "shape_correct", "count_correct", "exact")}


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "ddpo_cli" / "assets" / "tiny_shapes"))
    parser.add_argument("--work", default=str(ROOT / "outputs" / "tiny_shapes_train"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--data", type=int, default=24_000, help="rendered images encoded for the UNet stage")
    parser.add_argument("--unet-steps", type=int, default=3500)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-images", type=int, default=1, help="images per caption in each quick evaluation")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "log.jsonl", "a")

    def log(record: dict) -> None:
        record = {"time": round(time.time() - started, 1), **record}
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    started = time.time()
    tokenizer = build_tokenizer(work / "tokenizer")
    vae, text_encoder, unet = build_models(tokenizer, args.seed)
    state = torch.load(work / "state.pt", weights_only=False) if (work / "state.pt").exists() else {}
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        if name in state:
            module.load_state_dict(state[name])
    log({"stage": "start", "resume": {k: state.get(k, 0) for k in ("vae_step", "unet_step")}, "args": vars(args)})
    train_vae(vae, args, state, log)
    data = encode_dataset(vae, args, log)
    train_unet(vae, text_encoder, unet, tokenizer, data, args, state, log)
    log({"stage": "done"})


if __name__ == "__main__":
    main()
