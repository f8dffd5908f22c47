"""Train the toy world's flow-matching twin ``tiny_shapes_flow`` (SD3 architecture) and save it as a diffusers folder.

The model is a ``StableDiffusion3Pipeline`` folder (loads with plain ``StableDiffusion3Pipeline.from_pretrained`` and
with ``model=tiny_shapes_flow``):
  - vae: the tiny_shapes ``AutoencoderKL`` (32x32x3 <-> 4x16x16), weights copied unchanged, its scaling_factor kept;
    no shift (written as ``shift_factor: 0.0``, see ``save_pipeline``);
  - tokenizer / tokenizer_2: the tiny_shapes ``CLIPTokenizer`` (16 positions, every caption word one token);
  - text_encoder / text_encoder_2: ``CLIPTextModelWithProjection`` (hidden 64, 2 layers, 4 heads, projection 64),
    both initialised from the tiny_shapes text encoder plus a fresh projection, trained jointly;
  - text_encoder_3 / tokenizer_3: None (the pipeline feeds ``max_sequence_length`` = 8 zero T5 tokens);
  - transformer: ``SD3Transformer2DModel`` on 16x16 latents, patch 2 (64 image tokens), joint attention dim 128
    (both CLIP penultimate states concatenated), pooled 128 (both projections);
  - scheduler: ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=--shift)``.

Stages: (1) render ``--data`` images and encode them with the (frozen) VAE, (2) transformer + both text encoders with
the rectified-flow loss: ``x_s = (1 - s) x0 + s eps``, the transformer at timestep ``1000 s`` predicts
``v = eps - x0`` (MSE), ``s`` logit-normal(0, 1) as in SD3, 10% empty captions for classifier-free guidance, EMA of
the weights. The conditioning is the pipeline's own ``encode_prompt`` on the trainable text encoders, exactly as at
inference. Every ``--save-every`` steps a resumable checkpoint is written to ``--work``, the EMA pipeline is saved to
``--out`` (atomically) and evaluated on the 48 captions (flow Euler ODE, 20 steps, CFG 4.5). Re-running the same
command resumes; each step's batch and noise depend only on (seed, step).

    python scripts/train_tiny_shapes_flow.py                         # full run (writes ddpo_cli/assets/tiny_shapes_flow)
    python scripts/train_tiny_shapes_flow.py --steps 50 --save-every 25 --out /tmp/tsf --work /tmp/tsf_work_small
    python scripts/train_tiny_shapes_flow.py --eval-only --guidance 3 4.5 5 --n 10   # detector accuracy of --out
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(ROOT / "scripts"))

from eval_tiny_shapes import KEYS, evaluate  # noqa: E402
from train_tiny_shapes import rendered_latents  # noqa: E402

from ddpo_cli.models.tiny import portable_text_encoders  # noqa: E402
from ddpo_cli.rewards.shapes_counting import ShapesCounting  # noqa: E402
from ddpo_cli.toyworld.prompts import shapes_heldout, shapes_train  # noqa: E402
from ddpo_cli.toyworld.render import all_combos, caption, metadata  # noqa: E402

SOURCE = ROOT / "ddpo_cli" / "assets" / "tiny_shapes"   # VAE, tokenizer and text-encoder init come from here
MAX_SEQUENCE_LENGTH = 8                                   # zero T5 tokens (conf/model/tiny_shapes_flow.yaml)


# ----------------------------------------------------------------------------------------------------- components
def build_pipeline(args):
    """The SD3 pipeline: tiny_shapes VAE + tokenizer, two CLIP encoders with projections, a fresh transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(SOURCE / "vae")
    vae.requires_grad_(False).eval()
    vae.register_to_config(shift_factor=0.0)   # no shift (null breaks StableDiffusion3Pipeline's decode, see save)
    tokenizer = CLIPTokenizer.from_pretrained(SOURCE / "tokenizer")
    base = CLIPTextModel.from_pretrained(SOURCE / "text_encoder")
    config = CLIPTextConfig(**{**base.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    torch.manual_seed(args.seed)
    encoders = []
    for _ in range(2):
        encoder = CLIPTextModelWithProjection(config)              # fresh projection (64 -> 64, no bias)
        if args.text_init == "tiny_shapes":
            encoder.text_model.load_state_dict(base.state_dict())
        encoders.append(encoder)
    inner = args.heads * args.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=args.layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=128,
        caption_projection_dim=inner, pooled_projection_dim=128, pos_embed_max_size=8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoders[0],
                                    tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------- stages
def encode_dataset(vae, args, log) -> dict:
    """Stage 1: render ``--data`` images and encode them with the (frozen) tiny_shapes VAE (cached in ``--work``)."""
    data = rendered_latents(vae, args)
    log({"stage": "encode", "n": len(data["captions"]), "scaling_factor": vae.config.scaling_factor})
    return data


def trainable(pipe) -> list[torch.nn.Parameter]:
    return [p for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()]


def set_train(pipe, mode: bool) -> None:
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.train(mode)


def train(pipe, data: dict, args, state: dict, log) -> None:
    """Stage 2: rectified flow matching on scaled latents; text encoders trained jointly; EMA of all three."""
    params = trainable(pipe)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema = [p.detach().clone() for p in params]
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        ema = state["ema"]
    captions = data["captions"]
    scale = pipe.vae.config.scaling_factor        # the pipeline decodes latents / scaling_factor (no shift)
    set_train(pipe, True)
    start, first = time.time(), state.get("step", 0)
    for step in range(first, args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        index = torch.randint(0, len(captions), (args.batch,), generator=g)
        mean, std = data["mean"][index], data["std"][index]
        x0 = (mean + std * torch.randn(mean.shape, generator=g)) * scale       # [B, 4, 16, 16], ~unit std
        drop = torch.rand(args.batch, generator=g) < args.caption_dropout
        prompts = ["" if d else captions[i] for d, i in zip(drop.tolist(), index.tolist())]
        eps = torch.randn(x0.shape, generator=g)
        if args.timesteps == "logit_normal":
            s = torch.sigmoid(torch.randn(args.batch, generator=g))
        else:
            s = torch.rand(args.batch, generator=g)
        x_s = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * eps
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_SEQUENCE_LENGTH)   # [B, 24, 128], [B, 128]
        pred = pipe.transformer(hidden_states=x_s, timestep=1000 * s, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(pred, eps - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if (step + 1) % 50 == 0:
            log({"stage": "train", "step": step + 1, "loss": loss.item(),
                 "s_per_step": round((time.time() - start) / (step + 1 - first), 3)})
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            state.update(step=step + 1, transformer=pipe.transformer.state_dict(),
                         text_encoder=pipe.text_encoder.state_dict(), text_encoder_2=pipe.text_encoder_2.state_dict(),
                         optimizer=optimizer.state_dict(), ema=ema)
            save_state(state, args.work)
            save_pipeline(pipe, ema, params, args, step + 1, log)


# ----------------------------------------------------------------------------------------------------- saving
def save_state(state: dict, work: str) -> None:
    """Atomically write the resumable training state."""
    tmp = Path(work) / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, Path(work) / "state.pt")


def save_pipeline(pipe, ema, params, args, step: int, log) -> None:
    """Swap the EMA weights in, save the pipeline to ``--out`` (atomic rename), evaluate it, swap back."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    set_train(pipe, False)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    portable_text_encoders(tmp)  # the text encoders in the key layout every supported transformers loads
    for name in ("vae", "tokenizer", "tokenizer_2"):   # the tiny_shapes files, byte for byte
        shutil.rmtree(tmp / name)
        shutil.copytree(SOURCE / name.removesuffix("_2"), tmp / name)
    # The VAE has no shift; StableDiffusion3Pipeline decodes ``latents / scaling_factor + shift_factor``
    # unconditionally, so a null shift_factor raises a TypeError there: 0.0 is the same no-shift, and loads everywhere.
    vae_config = json.loads((tmp / "vae" / "config.json").read_text())
    vae_config["shift_factor"] = 0.0
    (tmp / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    snapshot = Path(args.work) / f"pipeline_step{step:06d}"
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(out, snapshot)
    log({"stage": "eval", "step": step, **quick_eval(pipe, args.eval_images)})
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    set_train(pipe, True)


@torch.no_grad()
def quick_eval(pipe, per_combo: int, guidance: float = 4.5) -> dict:
    """Generate ``per_combo`` images for each of the 48 captions (Euler ODE, 20 steps, CFG 4.5) and score them."""
    reward = ShapesCounting().setup("cpu")
    combos = all_combos() * per_combo
    results = {k: [] for k in KEYS}
    for i in range(0, len(combos), 48):
        chunk = combos[i:i + 48]
        prompts = [caption(*c) for c in chunk]
        images = pipe(prompts, num_inference_steps=20, guidance_scale=guidance,
                      max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(i),
                      output_type="pt").images                                   # [48, 3, 32, 32] in [0, 1]
        _, info = reward(images, prompts, [metadata(*c) for c in chunk])
        for k in KEYS:
            results[k] += [float(v) for v in info[k]]
    return {k: round(float(np.mean(v)), 4) for k, v in results.items()}


# ----------------------------------------------------------------------------------------------------- evaluation
def eval_only(args) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(args.out, text_encoder_3=None, tokenizer_3=None)  # saved as null
    pipe.set_progress_bar_config(disable=True)
    results = {"model": args.out, "n": args.n, "steps": 20, "seed": args.eval_seed}
    for guidance in args.guidance:
        started = time.time()

        def draw(prompts, generator, guidance=guidance):   # Euler ODE, 20 steps
            return pipe(prompts, num_inference_steps=20, guidance_scale=guidance,
                        max_sequence_length=MAX_SEQUENCE_LENGTH, generator=generator, output_type="pt").images

        results[str(guidance)] = {"train": evaluate(draw, shapes_train(), args.n, args.eval_seed),
                                  "heldout": evaluate(draw, shapes_heldout(), args.n, args.eval_seed),
                                  "seconds": round(time.time() - started, 1)}
        print(json.dumps({"guidance": guidance, **results[str(guidance)]}), flush=True)
    if args.eval_out:
        Path(args.eval_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.eval_out).write_text(json.dumps(results, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "ddpo_cli" / "assets" / "tiny_shapes_flow"))
    parser.add_argument("--work", default=str(ROOT / "outputs" / "tiny_shapes_flow_train"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--shift", type=float, default=1.0, help="scheduler shift (inference sigmas only)")
    parser.add_argument("--text-init", choices=("tiny_shapes", "scratch"), default="tiny_shapes")
    parser.add_argument("--timesteps", choices=("logit_normal", "uniform"), default="logit_normal")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data", type=int, default=24_000, help="rendered images encoded for training")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-images", type=int, default=1, help="images per caption in each quick evaluation")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the pipeline in --out")
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 4.5, 5.0])
    parser.add_argument("--n", type=int, default=10, help="images per prompt in --eval-only")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--eval-out", default=None, help="also write the --eval-only JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.eval_only:
        eval_only(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "log.jsonl", "a")

    def log(record: dict) -> None:
        record = {"time": round(time.time() - started, 1), **record}
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    started = time.time()
    pipe = build_pipeline(args)
    state = torch.load(work / "state.pt", weights_only=False) if (work / "state.pt").exists() else {}
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        if name in state:
            getattr(pipe, name).load_state_dict(state[name])
    n_params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                for name in ("transformer", "text_encoder", "text_encoder_2")}
    log({"stage": "start", "resume": state.get("step", 0), "params": n_params, "args": vars(args)})
    data = encode_dataset(pipe.vae, args, log)
    train(pipe, data, args, state, log)
    log({"stage": "done"})


if __name__ == "__main__":
    main()
